"""Several clients of a round trained as one batched computation (stacked weights, `bmm`).

Why: one client's step on the 2NN at B=10 is a handful of small matrix products, bound by
per-operation cost and too small for a second thread to help (`bench/bench_vectorized.py`); the
same step for ten clients stacked is one set of batched products: 1.22× one by one on one
thread, 1.92× on two. At larger batches one client's products are big enough on their own
(B=50: 0.99× on one thread, 1.09× on two), so `trainers.choose` stacks only at small batches
(`stacking_pays`).

What each client keeps: its own data order (its own seed, one permutation per epoch, as in
`client.train`), its own shard size (shards are padded to the longest; padded rows weigh 0 in
the gradient, a short client stops stepping when its batches run out: the clients are sorted by
their number of steps, so the ones still stepping are always a prefix of the stack), and its
own SGD state. The arithmetic is `fused.train_fused`'s, so the updates equal training the
clients one by one to float tolerance (`tests/test_vectorized.py`), and a run is bit-identical
run to run. Clients are stacked only when they share their settings (lr, epochs, batch size,
momentum, weight decay): callers group them by settings.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence

import torch
from torch import nn

from tinyfed.client import Shard, TrainSettings
from tinyfed.fused import linear_layers, sgd_step, train_fused
from tinyfed.models import state_of

Tensors = dict[str, torch.Tensor]
# A round's clients are stacked in chunks: as many as keep the state every step touches
# (weights, gradients, momentum, one step's activations) within about this machine's last-level
# cache (32 MiB; ten 2NN clients, 16 MB, measured fastest: thirty at once were 0.77–1.0× one by
# one, docs/benchmarks.md section 4), and whatever fits `MEMORY` with `BLOCK` steps of batches.
CACHE = 16 * 2**20
MEMORY = 128 * 2**20
# Steps whose batches are gathered at once: a client's memory follows this, not its shard size
# (a whole epoch of a 6,000-example client was 19 MB, per child of the process runtime too).
BLOCK = 64
# The largest batch at which stacking beats one client at a time, on one thread and on more:
# at larger batches one client's products are big enough on their own.
STACK_MAX_BATCH = {1: 20, 2: 50}


def stacking_pays(threads: int, batch_size: int) -> bool:
    """Whether stacking beats one client at a time, as measured on the 2NN (docs/benchmarks.md,
    section 4): on one thread 1.26× at B=5, 1.23× at B=10, 1.10× at 20, 1.01× at 50; on two
    1.95× at B=10, 1.09× at 50; FedSGD (B = the whole shard) 0.78–0.95×."""
    return 0 < batch_size <= STACK_MAX_BATCH[min(threads, 2)]


def _steps(n: int, settings: TrainSettings) -> tuple[int, int]:
    """(batch size, steps per epoch) for a shard of n examples: `client.train`'s batching."""
    batch = settings.batch_for(n)
    return batch, math.ceil(n / batch)


def footprint(model: nn.Module, shards: Sequence[Shard], settings: TrainSettings
              ) -> tuple[int, int]:
    """Bytes one client adds to a stacked computation: (the state every step touches: its
    weights, gradients, momentum and one step's activations; `BLOCK` steps of its batches
    padded to the widest batch, with their one-hot targets and row weights)."""
    params = sum(p.numel() for p in model.parameters())
    widths = [w.shape[0] for w, *_ in linear_layers(model)]
    features = linear_layers(model)[0][0].shape[1]
    shapes = [_steps(len(s), settings) for s in shards]
    batch = max(b for b, _ in shapes)
    steps = max(s for _, s in shapes)
    slots = 3 if settings.momentum else 2
    return (4 * (params * slots + 3 * batch * sum(widths)),
            4 * min(steps, BLOCK) * batch * (features + widths[-1] + 1))


def chunk_size(model: nn.Module, shards: Sequence[Shard], settings: TrainSettings) -> int:
    """Clients per stacked computation: within `CACHE` and `MEMORY`, at least one."""
    hot, data = footprint(model, shards, settings)
    return max(1, min(CACHE // hot, MEMORY // (hot + data)))


@torch.no_grad()
def train_stacked(model: nn.Module, starts: Sequence[Tensors], shards: Sequence[Shard],
                  settings: TrainSettings, seeds: Sequence[int],
                  chunk: int | None = None) -> list[tuple[Tensors, dict[str, float]]]:
    """Train each client from its start weights (`model`'s state-dict names; `model` itself
    is not changed) on its shard with `client.train`'s data order and SGD rule; return each
    client's weights and metrics, in the order given. The clients are stacked `chunk` at a time
    (default: `chunk_size`). `train_seconds` is the chunk's wall time shared equally: stacked
    clients have no time of their own."""
    order = sorted(range(len(shards)), key=lambda i: -_steps(len(shards[i]), settings)[1])
    out: list[tuple[Tensors, dict[str, float]] | None] = [None] * len(shards)
    size = chunk or chunk_size(model, shards, settings)
    train = _train_chunk if size > 1 else _train_alone  # alone, the one-client trainer is faster
    for part in (order[i : i + size] for i in range(0, len(order), size)):
        results = train(model, [starts[i] for i in part], [shards[i] for i in part],
                        settings, [seeds[i] for i in part])
        for i, result in zip(part, results):
            out[i] = result
    return out  # type: ignore[return-value]


def _train_alone(model: nn.Module, starts: Sequence[Tensors], shards: Sequence[Shard],
                 settings: TrainSettings, seeds: Sequence[int]) -> list[tuple[Tensors, dict]]:
    """Clients one at a time with `fused.train_fused`, on a copy of `model`."""
    alone = copy.deepcopy(model)
    out = []
    for start, shard, seed in zip(starts, shards, seeds):
        alone.load_state_dict(start)
        metrics = train_fused(alone, shard, settings, seed)
        out.append((state_of(alone), metrics))
    return out


def _padded(rows: torch.Tensor, length: int) -> torch.Tensor:
    """`rows` followed by zero rows up to `length`."""
    if len(rows) == length:
        return rows
    out = rows.new_zeros((length, *rows.shape[1:]))
    out[: len(rows)] = rows
    return out


def _gather(xs: torch.Tensor, hot: torch.Tensor, weigh: torch.Tensor, eye: torch.Tensor,
            flat: Sequence[torch.Tensor], shards: Sequence[Shard],
            orders: Sequence[torch.Tensor], shapes: Sequence[tuple[int, int]],
            first: int) -> None:
    """Fill the block of steps from `first`: each client's batches in its epoch order (inputs,
    one-hot targets, and each row's 1/len of its batch), zeros past its batches and steps."""
    for buf in (xs, hot, weigh):
        buf.zero_()
    span, features, classes = xs.shape[0], xs.shape[3], hot.shape[3]
    for i, (shard, order, (b, n_steps)) in enumerate(zip(shards, orders, shapes)):
        t = min(n_steps - first, span)  # this client's steps in the block
        if t <= 0:
            continue
        rows = order[first * b : (first + t) * b]
        xs[:t, i, :b] = _padded(flat[i][rows], t * b).view(t, b, features)
        hot[:t, i, :b] = _padded(eye[shard.y[rows]], t * b).view(t, b, classes)
        sizes = torch.full((t, 1), float(b))
        if first + t == n_steps:  # its last, maybe short, batch
            sizes[-1] = len(shard) - b * (n_steps - 1)
        weigh[:t, i, :b, 0] = _padded(torch.ones(len(rows)), t * b).view(t, b) / sizes


def _names(model: nn.Module) -> list[tuple[str, str | None]]:
    """State-dict names of (weight, bias) per Linear, in `linear_layers` order."""
    return [(f"{i}.weight", f"{i}.bias" if m.bias is not None else None)
            for i, m in enumerate(model) if type(m) is nn.Linear]


class _Prefix:
    """Views of the stacked tensors for the first `m` clients (those still stepping)."""

    def __init__(self, weights, biases, params, loss_sum, m: int) -> None:
        self.weights = [w[:m] for w in weights]
        self.transposed = [w.transpose(1, 2) for w in self.weights]
        self.bias_rows = [b[:m] if b is not None else None for b in biases]
        self.biases = [b[:, None] if b is not None else None for b in self.bias_rows]
        self.params = [p[:m] for p in params]
        self.loss = loss_sum[:m]


def _train_chunk(model: nn.Module, starts: Sequence[Tensors], shards: Sequence[Shard],
                 settings: TrainSettings, seeds: Sequence[int]) -> list[tuple[Tensors, dict]]:
    """One stacked computation; `shards` sorted by steps per epoch, longest first."""
    start = time.perf_counter()
    k = len(shards)
    layers = linear_layers(model)
    names = _names(model)
    relu_in = [masked for *_, masked, _ in layers]
    relu_out = [relu for *_, relu in layers]
    weights = [torch.stack([s[w] for s in starts]) for w, _ in names]
    biases = [torch.stack([s[b] for s in starts]) if b else None for _, b in names]
    params = [p for w, b in zip(weights, biases) for p in (w, b) if p is not None]
    shapes = [_steps(len(s), settings) for s in shards]
    batch = max(b for b, _ in shapes)
    steps = shapes[0][1]
    active = [sum(1 for _, n in shapes if n > s) for s in range(steps)]  # a prefix per step
    classes = weights[-1].shape[1]
    features = weights[0].shape[2]
    eye = torch.eye(classes)
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]
    lr, mu, wd = settings.lr, settings.momentum, settings.weight_decay
    plain = settings.plain_sgd  # the step is w -= lr·∇: fused into the gradient's product
    buffers: list[torch.Tensor] = []
    loss_sum = torch.zeros(k)
    views: dict[int, _Prefix] = {}
    span = min(steps, BLOCK)
    xs = torch.empty(span, k, batch, features)
    hot = torch.empty(span, k, batch, classes)
    weigh = torch.empty(span, k, batch, 1)  # 1/len of a row's batch; 0 for padding
    flat = [shard.x.reshape(len(shard), -1) for shard in shards]
    for _ in range(settings.epochs):
        orders = [torch.randperm(len(shard), generator=gen) for shard, gen in zip(shards, gens)]
        loss_sum.zero_()
        for first in range(0, steps, span):
            _gather(xs, hot, weigh, eye, flat, shards, orders, shapes, first)
            for s in range(first, min(first + span, steps)):
                m = active[s]
                if m not in views:  # the first `m` clients' slices, made once per prefix length
                    views[m] = _Prefix(weights, biases, params, loss_sum, m)
                v = views[m]
                a, target = xs[s - first, :m], hot[s - first, :m]
                acts = []
                for li, (wt, bias) in enumerate(zip(v.transposed, v.biases)):
                    acts.append(a)
                    a = torch.baddbmm(bias, a, wt) if bias is not None else a @ wt
                    if relu_out[li]:
                        a.relu_()
                logp = a.log_softmax(2)
                v.loss.sub_((logp * target).sum((1, 2)))
                g = logp.exp_().sub_(target).mul_(weigh[s - first, :m])
                grads: list[torch.Tensor] = []
                for li in reversed(range(len(weights))):
                    x_in = acts[li]
                    g_in = g @ v.weights[li] if li else None  # before this layer's update
                    if plain:  # the SGD step straight into the weights: no gradient tensor
                        if biases[li] is not None:
                            v.bias_rows[li].add_(g.sum(1), alpha=-lr)
                        v.weights[li].baddbmm_(g.transpose(1, 2), x_in, alpha=-lr)
                    else:
                        if biases[li] is not None:
                            grads.append(g.sum(1))
                        grads.append(g.transpose(1, 2) @ x_in)
                    if g_in is not None:
                        g = (torch.ops.aten.threshold_backward(g_in, x_in, 0)  # ReLU's backward
                             if relu_in[li] else g_in)
                if plain:
                    continue
                grads.reverse()
                # the first step has every client stepping (m = k): its buffers are whole stacks
                made = sgd_step(v.params, grads, [buf[:m] for buf in buffers], lr, mu, wd)
                buffers = buffers or made
    seconds = (time.perf_counter() - start) / k
    results = []
    for i, shard in enumerate(shards):
        state: Tensors = {}
        for (wname, bname), w, bias in zip(names, weights, biases):
            state[wname] = w[i].clone()
            if bname is not None:
                state[bname] = bias[i].clone()
        results.append((state, {"train_loss": float(loss_sum[i]) / max(len(shard), 1),
                                "steps": settings.epochs * shapes[i][1],
                                "train_seconds": seconds}))
    return results
