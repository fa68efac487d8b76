"""Asynchronous merge rules: fold one client's update into the global model as soon as it arrives.

Pure arithmetic over tensors (float64 inside, each tensor's own dtype out), no I/O, and memory
that does not grow with the number of clients: seed-merge and FedAsync hold nothing but a
counter; FedBuff holds one running sum of deltas.

- ``seed-merge``: the seed system's rule ``w ← (a·w + b·w_client)/(a+b)``, ``a += b``, with ``b``
  the examples the client really trained on (the seed added the server's count too).
- ``fedasync`` (Xie et al. 2019): ``w ← (1−α_t)·w + α_t·w_client``, ``α_t = α·s(staleness)``.
- ``fedbuff`` (Nguyen et al. 2022): buffer ``s(staleness)·(w_client − w_base)``; every
  ``buffer_size`` updates ``w ← w + η·mean``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from tinyfed.staleness import Staleness, parse_staleness
from tinyfed.strategies.base import Tensors, cast_like


def mix(weights: Tensors, other: Tensors, t: float) -> Tensors:
    """(1−t)·weights + t·other, per tensor, computed in float64 (in place on one float64 copy,
    `other` widened inside the add: a third of the time of the expression form, which matters
    when every update is merged)."""
    out: Tensors = {}
    for k, w in weights.items():
        acc = w.to(torch.float64, copy=True)
        acc.mul_(1.0 - t).add_(other[k], alpha=t)
        out[k] = cast_like(acc, w)
    return out


__all__ = ["AsyncRule", "FedAsync", "FedBuff", "SeedMerge", "mix", "parse_staleness"]


class AsyncRule(Protocol):
    """What the async loop asks of a rule. `merge` returns the new global weights, or None when
    the update was only buffered (the model and its version stay as they are)."""

    name: str

    def merge(self, weights: Tensors, update: Tensors, num_examples: int, staleness: int,
              base: Tensors) -> Tensors | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def tensor_state(self) -> Tensors: ...

    def load_tensor_state(self, tensors: Tensors) -> None: ...


class _NoTensors:
    def tensor_state(self) -> Tensors:
        return {}

    def load_tensor_state(self, tensors: Tensors) -> None:
        return None


class SeedMerge(_NoTensors):
    """Running example-weighted mean of every update ever merged. `a` starts at `initial`
    (0 by default: the first update replaces the model it was trained from)."""

    name = "seed-merge"

    def __init__(self, initial: float = 0.0):
        self.a = float(initial)

    def merge(self, weights, update, num_examples, staleness, base):
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        a, b = self.a, float(num_examples)
        out = {k: cast_like((a * w.to(torch.float64) + b * update[k].to(torch.float64))
                            / (a + b), w) for k, w in weights.items()}
        self.a = a + b
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"a": self.a}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.a = float(state.get("a", self.a))


class FedAsync(_NoTensors):
    """Mixing weight α·s(staleness): a stale update moves the model less."""

    name = "fedasync"

    def __init__(self, alpha: float, staleness: Staleness):
        self.alpha, self.s = alpha, staleness

    def merge(self, weights, update, num_examples, staleness, base):
        return mix(weights, update, self.alpha * self.s(staleness))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class FedBuff:
    """Running sum of staleness-weighted deltas; applied (and cleared) every `size` updates."""

    name = "fedbuff"

    def __init__(self, size: int, server_lr: float, staleness: Staleness):
        self.size, self.lr, self.s = size, server_lr, staleness
        self.sums: Tensors = {}
        self.count = 0

    def merge(self, weights, update, num_examples, staleness, base):
        scale = self.s(staleness)
        for k, w in weights.items():
            delta = update[k].to(torch.float64) - base[k].to(torch.float64)
            if k not in self.sums:
                self.sums[k] = torch.zeros(w.shape, dtype=torch.float64)
            self.sums[k].add_(delta, alpha=scale)
        self.count += 1
        if self.count < self.size:
            return None
        step = self.lr / self.count
        out = {k: cast_like(w.to(torch.float64) + step * self.sums[k], w)
               for k, w in weights.items()}
        self.sums, self.count = {}, 0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state.get("count", 0))

    def tensor_state(self) -> Tensors:
        return dict(self.sums) if self.count else {}

    def load_tensor_state(self, tensors: Tensors) -> None:
        self.sums = {k: v.to(torch.float64).clone() for k, v in tensors.items()}
        if not self.sums:
            self.count = 0
