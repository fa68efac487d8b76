"""Local training without autograd for stacks of Linear and ReLU layers (the paper's 2NN).

Why hand-written: at the paper's B=10 the 2NN's step is bound by per-operation dispatch, not
arithmetic (22 % of this machine's matmul rate, `bench/bench_limit.py`); autograd's graph, its
backward nodes and the optimizer's per-parameter loop are most of the operations. The backward
of Linear + ReLU + cross-entropy is short enough to write out, which does the same arithmetic in
about half the operations. The result equals `client.train`'s to float tolerance (the products
are the same, their summation order may differ); the data order, the SGD rule (weight decay,
momentum, its first step) and a client algorithm's gradient correction are exactly those of
`client.train`, so `tests/test_trainers.py` compares the two on every setting.

With plain SGD (no momentum, weight decay or correction) the step goes straight into the weights
(`addmm_` with α = −lr): no gradient tensor is written and there is no separate update pass.
Several clients at once (this arithmetic over stacked weights) is `tinyfed.vectorized`, faster
at small batches (docs/benchmarks.md, section 4).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from tinyfed.client import Shard, TrainSettings


def unfusable(model: nn.Module) -> str | None:
    """Why `train_fused` cannot train this model, or None if it can. Types are matched
    exactly: a subclass may change what forward does."""
    if type(model) is not nn.Sequential:
        return f"the model is a {type(model).__name__}, not an nn.Sequential"
    layers = list(model)
    if not layers:
        return "it has no layers"
    if type(layers[0]) is not nn.Flatten or (layers[0].start_dim, layers[0].end_dim) != (1, -1):
        return f"layer 0 is {type(layers[0]).__name__}, not nn.Flatten()"
    if next(model.buffers(), None) is not None:
        return "it has buffers (running statistics)"
    linear = 0
    for i, layer in enumerate(layers[1:], 1):
        if layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks:
            return f"layer {i} has hooks"
        if type(layer) is nn.Linear:
            if layer.weight.dtype != torch.float32:
                return f"layer {i} is {layer.weight.dtype}, not float32"
            linear += 1
        elif type(layer) is nn.ReLU:
            if type(layers[i - 1]) is not nn.Linear:
                return f"layer {i} (ReLU) does not follow a Linear"
        else:
            return f"layer {i} is {type(layer).__name__}"
    if not linear:
        return "it has no Linear layer"
    if any(not p.requires_grad for p in model.parameters()):
        return "some parameters are frozen"
    return None


def linear_layers(model: nn.Sequential) -> list[tuple]:
    """Per Linear: weight, its transpose (a view: it follows the in-place updates), bias,
    whether its input came out of a ReLU (its backward masks by that input), and whether a
    ReLU follows it."""
    mods = list(model)[1:]
    return [(m.weight, m.weight.t(), m.bias, i > 0 and type(mods[i - 1]) is nn.ReLU,
             i + 1 < len(mods) and type(mods[i + 1]) is nn.ReLU)
            for i, m in enumerate(mods) if type(m) is nn.Linear]


def sgd_step(params: list[torch.Tensor], grads: list[torch.Tensor],
             buffers: list[torch.Tensor], lr: float, mu: float, wd: float
             ) -> list[torch.Tensor]:
    """torch.optim.SGD's rule (weight decay; momentum whose first step is the gradient), one
    foreach call per line instead of one call per tensor. `buffers` is empty before the first
    step; returns the momentum buffers to pass next time."""
    if wd:
        torch._foreach_add_(grads, params, alpha=wd)
    if mu:
        if buffers:
            torch._foreach_mul_(buffers, mu)
            torch._foreach_add_(buffers, grads)
        else:
            buffers = [grad.clone() for grad in grads]
        grads = buffers
    torch._foreach_add_(params, grads, alpha=-lr)
    return buffers


@torch.no_grad()
def train_fused(model: nn.Module, shard: Shard, settings: TrainSettings, seed: int,
                correct: Callable[[], None] | None = None) -> dict[str, float]:
    """`client.train` for a model `unfusable` accepts, with the backward written out. SGD only
    (momentum, weight decay); the caller checks both."""
    start = time.perf_counter()
    n = len(shard)
    batch = settings.batch_for(n)
    gen = torch.Generator().manual_seed(seed)
    layers = linear_layers(model)
    params = [p for w, _, b, _, _ in layers for p in (w, b) if p is not None]
    buffers: list[torch.Tensor] = []
    lr, mu, wd = settings.lr, settings.momentum, settings.weight_decay
    plain = settings.plain_sgd and correct is None  # w -= lr·∇, fused into ∇'s product
    x = shard.x.reshape(n, -1)
    eye = torch.eye(layers[-1][0].shape[0])  # one-hot rows for the last layer's outputs
    loss_sum = torch.zeros(())
    steps = 0
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=gen)
        xs, hot = x[order], eye[shard.y[order]]  # one gather per epoch, then views
        loss_sum.zero_()
        for lo in range(0, n, batch):
            a = xs[lo : lo + batch]
            target = hot[lo : lo + batch]
            acts = []
            for _w, wt, b, _, relu in layers:
                acts.append(a)
                a = torch.addmm(b, a, wt) if b is not None else a @ wt
                if relu:
                    a.relu_()
            logp = a.log_softmax(1)
            loss_sum.sub_(torch.vdot(logp.view(-1), target.view(-1)))  # Σ cross-entropies
            g = logp.exp_().sub_(target).div_(a.shape[0])  # d(batch-mean loss)/d(logits)
            grads: list[torch.Tensor] = []
            for (w, _, b, masked, _), a in zip(reversed(layers), reversed(acts)):
                g_in = g @ w if a is not acts[0] else None  # before this layer's update
                if plain:  # the SGD step straight into the weights: no gradient tensor
                    if b is not None:
                        b.add_(g.sum(0), alpha=-lr)
                    w.addmm_(g.t(), a, alpha=-lr)
                else:
                    if b is not None:
                        grads.append(g.sum(0))
                    grads.append(g.t() @ a)
                if g_in is not None:
                    g = torch.ops.aten.threshold_backward(g_in, a, 0) if masked else g_in
            steps += 1
            if plain:
                continue
            grads.reverse()  # now (weight, bias) per layer, in `params` order
            if correct is not None:
                for p, grad in zip(params, grads):
                    p.grad = grad
                correct()
                grads = [p.grad for p in params]
            buffers = sgd_step(params, grads, buffers, lr, mu, wd)
    if correct is not None:
        for p in params:
            p.grad = None
    return {
        "train_loss": float(loss_sum) / max(n, 1),
        "steps": steps,
        "train_seconds": time.perf_counter() - start,
    }
