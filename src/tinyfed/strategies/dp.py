"""DP-FedAvg with a privacy accountant (central differential privacy at the client level).

McMahan et al. 2018 ("Learning Differentially Private Recurrent Language Models"): every
selected client's update Δ_k = w_k − w is clipped to L2 norm S (by the client, algorithm "dp",
and again here: the guarantee must not depend on a client's honesty); the server adds
Gaussian noise to the sum and divides by the *planned* number of clients m (the fixed
denominator, so one client's presence changes the sum by at most S):
w ← w + (Σ clip(Δ_k) + N(0, (z_Δ·S)²)) / m.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping"): clients report whether their update was within S; with b̄ = (Σ b_k + N(0, σ_b²))/m,
S ← S·exp(−η_C·(b̄ − γ)), γ the target quantile. The noise budget is split so the whole is a
Gaussian mechanism of multiplier z: z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2).

The accountant (`tinyfed.privacy`, dp-accounting's RDP) reports ε at δ after every round; with
`target_epsilon` the run stops before a round would exceed it. Noise is seeded by (run seed,
round): a resumed run adds the same noise, bit for bit. Streaming: a running sum of clipped
deltas.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tinyfed.errors import ConfigError
from tinyfed.privacy import epsilon
from tinyfed.strategies.base import Defaults, Instructions, Tensors, cast_like
from tinyfed.strategies.clipping import clip_update


class _Round:
    def __init__(self, owner: DPFedAvg, global_weights: Tensors, round_num: int):
        self.owner, self.reference, self.round = owner, global_weights, round_num
        self.sums: Tensors = {}
        self.count = 0
        self.within = 0.0

    def add(self, result) -> None:
        o = self.owner
        clipped, _ = clip_update(result.weights, self.reference, o.clip)
        for k, ref in self.reference.items():
            if ref.is_floating_point():
                d = clipped[k].to(torch.float64) - ref.to(torch.float64)
                self.sums[k] = self.sums.get(k, torch.zeros_like(d)).add_(d)
        self.count += 1
        self.within += float(result.metrics.get("within_clip", 1.0))

    def result(self) -> Tensors | None:
        if not self.count:
            return None
        o = self.owner
        gen = torch.Generator().manual_seed(o.seed * 1_000_003 + self.round)
        std = o.update_noise() * o.clip
        out = dict(self.reference)
        for k in sorted(self.sums):  # by name: a checkpoint's tensors come back sorted
            ref = self.reference[k]
            noise = torch.randn(ref.shape, generator=gen, dtype=torch.float64) * std
            out[k] = cast_like(ref.to(torch.float64) + (self.sums[k] + noise) / o.planned, ref)
        o.used_clip = o.clip
        if o.adaptive:
            noisy = (self.within + float(torch.randn((), generator=gen, dtype=torch.float64))
                     * o.count_noise) / o.planned
            o.clip = o.clip * math.exp(-o.clip_lr * (noisy - o.quantile))
        o.rounds += 1
        return out


class DPFedAvg(Defaults):
    name = "dp-fedavg"

    def __init__(self, *, clip: float, noise: float, delta: float, planned: int,
                 num_clients: int, seed: int, adaptive: bool = False, quantile: float = 0.5,
                 clip_lr: float = 0.2, target_epsilon: float | None = None):
        self.clip, self.noise, self.delta = clip, noise, delta
        self.planned, self.sample_rate = planned, planned / num_clients
        self.seed, self.adaptive, self.quantile, self.clip_lr = seed, adaptive, quantile, clip_lr
        # Andrew et al.'s σ_b = m/20 (none without privacy noise: z = 0 is plain clipping)
        self.count_noise = planned / 20 if adaptive and noise > 0 else 0.0
        self.target = target_epsilon
        self.rounds = 0
        self.used_clip = clip

    def update_noise(self) -> float:
        """z_Δ: all of z without adaptive clipping; what the clipped-count query leaves."""
        if not self.adaptive or self.noise == 0:
            return self.noise
        rest = self.noise ** -2 - (2 * self.count_noise) ** -2
        if rest <= 0:
            raise ConfigError(f"dp_noise = {self.noise:g} with dp_adaptive: the clipped-count "
                              f"query takes noise σ_b = m/20 = {self.count_noise:g}, so dp_noise "
                              f"must be below 2σ_b = {2 * self.count_noise:g} (m = "
                              f"{self.planned} clients a round)")
        return rest ** -0.5

    def epsilon_after(self, rounds: int) -> float:
        return epsilon(self.noise, self.sample_rate, rounds, self.delta)

    def configure(self, round_num: int, client_id: int, global_weights: Tensors
                  ) -> Instructions:
        return Instructions("dp", {"clip": self.clip})

    def begin_round(self, global_weights: Tensors, round_num: int) -> _Round:
        self.update_noise()  # a configuration that cannot work says so before any training
        return _Round(self, global_weights, round_num)

    def report(self) -> dict[str, Any]:
        eps = self.epsilon_after(self.rounds)
        return {"epsilon": eps if math.isfinite(eps) else None, "delta": self.delta,
                "clip": self.used_clip, "noise_multiplier": self.noise}

    def stop_before(self, round_num: int) -> str:
        if self.target is None:
            return ""
        eps = self.epsilon_after(self.rounds + 1)
        if eps > self.target:
            return (f"privacy budget: round {round_num} would bring ε to {eps:.4g} > "
                    f"target_epsilon {self.target:g} (δ={self.delta:g})")
        return ""

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "clip": self.clip, "used_clip": self.used_clip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = int(state.get("rounds", 0))
        self.clip = float(state.get("clip", self.clip))
        self.used_clip = float(state.get("used_clip", self.clip))
        spent = self.epsilon_after(self.rounds)
        if self.target is not None and spent > self.target:
            raise ConfigError(f"target_epsilon = {self.target:g}: the {self.rounds} rounds "
                              f"already run spent ε = {spent:.4g} (δ={self.delta:g}); allowed: "
                              f"a target of at least {spent:.4g}")
