"""The limit: what fraction of this machine's fp32 matmul rate client training reaches.

Measures, on one torch thread (and on all cores for the matmul), the sustained rate of a
1024×1024 fp32 matmul, then for each model and batch size the training throughput of one client
(forward + backward + SGD step, as `client.train` runs it) in samples/s, the FLOPs of forward +
backward per sample (counted by torch's own `FlopCounterMode`), and their product as a
fraction of the matmul rate. It also trains N clients of the same shape as one stacked
computation (per-client weights in a batch dimension: `bmm` for linear layers, a grouped
convolution for conv layers; autograd as usual), the vectorization issue 14 proposes, and
reports its throughput beside the one-by-one loop's, alternating the two, min/median/max; for
models the fused trainer takes (`tinyfed.fused`: no autograd), its throughput and fraction too,
and for conv models whose layers are all known, tinyfed's autograd path (channels-last
convolutions, linear layers stepped in their backward: `trainers.train_known_sequential`).

    PYTHONPATH=src python bench/bench_limit.py [--repeats 5] [--clients 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tinyfed.client import Shard, TrainSettings
from tinyfed.fused import train_fused, unfusable
from tinyfed.layout import channels_last_safe
from tinyfed.models import build_model
from tinyfed.trainers import train_known_sequential


def matmul_rate(threads: int, size: int = 1024, seconds: float = 1.0) -> float:
    """Sustained GFLOP/s of size×size fp32 matmuls on `threads` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * size ** 3 * n / (time.perf_counter() - t0) / 1e9


def flops_per_sample(model: nn.Module, shape: tuple[int, ...], batch: int) -> float:
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def one_by_one(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, batch: int) -> None:
    """N clients, one after another, each a plain SGD loop over its samples."""
    for x, y in zip(xs, ys):
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for lo in range(0, len(y), batch):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[lo:lo + batch]), y[lo:lo + batch]).backward()
            opt.step()


def stacked_forward(model: nn.Sequential, params: dict, x: torch.Tensor) -> torch.Tensor:
    """The model applied by N clients at once: x is [N, B, ...], params [N, ...] each."""
    n = x.shape[0]
    for name, layer in model.named_children():
        if isinstance(layer, nn.Flatten):
            x = x.reshape(n, x.shape[1], -1)
        elif isinstance(layer, nn.Linear):
            w, b = params[f"{name}.weight"], params[f"{name}.bias"]
            x = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
        elif isinstance(layer, nn.ReLU):
            x = torch.relu(x)
        elif isinstance(layer, nn.Conv2d):
            bsz, c, h, wd = x.shape[1:]
            w, b = params[f"{name}.weight"], params[f"{name}.bias"]
            out = F.conv2d(x.transpose(0, 1).reshape(bsz, n * c, h, wd),
                           w.reshape(n * w.shape[1], *w.shape[2:]), b.reshape(-1),
                           layer.stride, layer.padding, layer.dilation, groups=n)
            x = out.reshape(bsz, n, w.shape[1], *out.shape[2:]).transpose(0, 1)
        elif isinstance(layer, nn.MaxPool2d):
            s = x.shape
            out = F.max_pool2d(x.reshape(s[0] * s[1], *s[2:]), layer.kernel_size, layer.stride)
            x = out.reshape(s[0], s[1], *out.shape[1:])
        else:
            raise TypeError(f"no stacked form for {type(layer).__name__}")
    return x


def stacked(model: nn.Sequential, xs: torch.Tensor, ys: torch.Tensor, batch: int) -> None:
    """The same N clients' SGD as one computation per step."""
    n = xs.shape[0]
    params = {k: v.detach().expand(n, *v.shape).clone().requires_grad_(True)
              for k, v in model.named_parameters()}
    for lo in range(0, ys.shape[1], batch):
        out = stacked_forward(model, params, xs[:, lo:lo + batch])
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), ys[:, lo:lo + batch].reshape(-1),
                               reduction="sum") / out.shape[1]
        for p in params.values():
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for p in params.values():
                p.sub_(p.grad, alpha=0.01)


def fused(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, batch: int) -> None:
    """N clients one after another on tinyfed's fused trainer (no autograd; Linear/ReLU only)."""
    settings = TrainSettings(epochs=1, batch_size=batch, lr=0.01)
    for i, (x, y) in enumerate(zip(xs, ys)):
        train_fused(model, Shard(x, y), settings, seed=i)


def known(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, batch: int) -> None:
    """N clients one after another on tinyfed's autograd path for a conv Sequential whose layers
    are all known (`trainers.train_known_sequential`: channels-last convolutions, linear layers
    stepped in their backward, plain SGD without torch.optim)."""
    settings = TrainSettings(epochs=1, batch_size=batch, lr=0.01)
    for i, (x, y) in enumerate(zip(xs, ys)):
        train_known_sequential(model, Shard(x, y), settings, seed=i)


EXTRA = {"fused": "fused:", "known": "tinyfed autograd:"}  # contestants beside the plain loop


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--clients", type=int, default=10)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    print(f"machine: {cores} cores, torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.2f}")
    peak_all = matmul_rate(cores)
    peak = matmul_rate(1)
    print(f"fp32 matmul 1024²: {peak:.1f} GFLOP/s on 1 thread, {peak_all:.1f} on {cores}")
    print(f"{'model':5} {'B':>4} {'MFLOP/sample':>12} {'samples/s 1-by-1 (min/med/max)':>32} "
          f"{'% of peak':>9} {'stacked N=' + str(args.clients) + ' samples/s':>26} "
          f"{'stacked/1-by-1':>14}")
    torch.set_num_threads(1)
    for name, per_client, batches in (("mlp", 600, (10, 50, 600)), ("cnn", 100, (10, 50))):
        model = build_model(name, (1, 28, 28), 10, 0)
        for batch in batches:
            flops = flops_per_sample(model, (1, 28, 28), batch)
            xs = torch.randn(args.clients, per_client, 1, 28, 28)
            ys = torch.randint(0, 10, (args.clients, per_client))
            samples = args.clients * per_client
            contestants = {"one": one_by_one, "stacked": stacked}
            if unfusable(model) is None:
                contestants["fused"] = fused
            if channels_last_safe(model):
                contestants["known"] = known
            rates = {key: [] for key in contestants}
            for fn in contestants.values():  # warm up every path
                fn(model, xs[:2], ys[:2], batch)
            for _ in range(args.repeats):
                for key, fn in contestants.items():
                    t0 = time.perf_counter()
                    fn(model, xs, ys, batch)
                    rates[key].append(samples / (time.perf_counter() - t0))
            one = sorted(rates["one"])
            st = sorted(rates["stacked"])
            frac = statistics.median(one) * flops / 1e9 / peak
            print(f"{name:5} {batch:4d} {flops / 1e6:12.3f} "
                  f"{one[0]:10.0f}/{statistics.median(one):7.0f}/{one[-1]:7.0f}   "
                  f"{100 * frac:8.1f}% {st[0]:9.0f}/{statistics.median(st):7.0f}/{st[-1]:7.0f}"
                  f" {statistics.median(st) / statistics.median(one):14.2f}", flush=True)
            for key, label in EXTRA.items():
                if key not in rates:
                    continue
                fu = sorted(rates[key])
                print(f"{'':5} {'':4} {label:>12} {fu[0]:10.0f}/{statistics.median(fu):7.0f}/"
                      f"{fu[-1]:7.0f}   {100 * statistics.median(fu) * flops / 1e9 / peak:8.1f}%"
                      f" ({key}/1-by-1 {statistics.median(fu) / statistics.median(one):.2f})",
                      flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    print(f"rerun: PYTHONPATH=src python bench/bench_limit.py --repeats {args.repeats} "
          f"--clients {args.clients}")


if __name__ == "__main__":
    main()
