"""Simulated Byzantine clients, to see an aggregation rule break or hold (`--byzantine N
--attack NAME`). The server picks the N attackers once per run from the seed and names the
attack in their tasks; the client side plays it here. `attack_scale` (the task's parameter) is
the malicious update's size relative to the attacker's own honest one.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from tinyfed.client import Shard
from tinyfed.errors import WireError

Tensors = dict[str, torch.Tensor]


class Attack(Protocol):
    def poison(self, shard: Shard, num_classes: int) -> Shard:
        """The data the attacker trains on."""

    def forge(self, local: Tensors, global_weights: Tensors, seed: int,
              scale: float) -> Tensors:
        """The weights it sends instead of what it trained."""


class _Honest:
    def poison(self, shard: Shard, num_classes: int) -> Shard:
        return shard

    def forge(self, local, global_weights, seed, scale):
        return local


def _moved(global_weights: Tensors, local: Tensors, step) -> Tensors:
    return {k: global_weights[k] + step(k, v - global_weights[k]) if v.is_floating_point() else v
            for k, v in local.items()}


class SignFlip(_Honest):
    """Sends w − scale·Δ: its honest update reversed and scaled (Damaskinos et al. 2018 style)."""

    def forge(self, local, global_weights, seed, scale):
        return _moved(global_weights, local, lambda k, d: -scale * d)


class Scale(_Honest):
    """Sends w + scale·Δ: its honest update boosted (model-replacement style, Bagdasaryan et
    al. 2020)."""

    def forge(self, local, global_weights, seed, scale):
        return _moved(global_weights, local, lambda k, d: scale * d)


class Gaussian(_Honest):
    """Sends w + noise: i.i.d. normal values with scale × the RMS of its honest update, seeded
    by the task (Blanchard et al. 2017's Gaussian Byzantine worker)."""

    def forge(self, local, global_weights, seed, scale):
        gen = torch.Generator().manual_seed(seed)

        def noise(k, d):
            rms = float(d.double().pow(2).mean().sqrt()) if d.numel() else 0.0
            return torch.randn(d.shape, generator=gen, dtype=d.dtype) * (scale * rms)

        return _moved(global_weights, local, noise)


class LabelFlip(_Honest):
    """Trains honestly on flipped labels y → C−1−y (Fang et al. 2020's label-flipping)."""

    def poison(self, shard: Shard, num_classes: int) -> Shard:
        return Shard(shard.x, (num_classes - 1) - shard.y)


ATTACKS: dict[str, Attack] = {
    "sign-flip": SignFlip(),
    "gaussian": Gaussian(),
    "scale": Scale(),
    "label-flip": LabelFlip(),
}


def attack_of(name: str) -> Attack | None:
    """The attack a task names; None for an honest task."""
    if not name:
        return None
    found = ATTACKS.get(name)
    if found is None:
        raise WireError(f"unknown attack {name[:40]!r}; allowed: {', '.join(ATTACKS)}")
    return found


def attackers(client_ids: list[int], count: int, seed: int) -> list[int]:
    """The run's Byzantine clients: `count` of them, chosen by the run seed alone (a resumed run
    and every runtime pick the same ones)."""
    rng = np.random.default_rng([seed, 0xB12])
    picked = rng.choice(len(client_ids), size=min(count, len(client_ids)), replace=False)
    return sorted(client_ids[i] for i in picked)
