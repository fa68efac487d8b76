"""Server optimizers over the clients' mean update (the pseudo-gradient Δ = mean(w_k) − w).

- FedAvgM (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for
  Federated Visual Classification"): v ← β·v + Δ; w ← w + η·v.
- FedOpt (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2): m ← β₁·m +
  (1−β₁)·Δ and w ← w + η·m / (√v + τ) with
  FedAdagrad v ← v + Δ², FedAdam v ← β₂·v + (1−β₂)·Δ², FedYogi v ← v − (1−β₂)·Δ²·sign(v − Δ²);
  v starts at τ² (the paper's v₋₁ ≥ τ²) and m at 0, no bias correction.

Δ is the example-weighted mean of the round's updates (FedAvg's; Reddi et al. write the plain
mean, which is the same with equal shards). Moments live in float64 and in every checkpoint.
Memory: the running mean plus one (FedAvgM) or two (FedOpt) model-sized moments.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tinyfed.strategies.base import Defaults, Tensors, cast_like
from tinyfed.strategies.fedavg import RunningMean

Moment = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (v, Δ) -> new v


def adagrad(beta2: float) -> Moment:
    return lambda v, d: v + d * d


def adam(beta2: float) -> Moment:
    return lambda v, d: beta2 * v + (1 - beta2) * d * d


def yogi(beta2: float) -> Moment:
    return lambda v, d: v - (1 - beta2) * d * d * torch.sign(v - d * d)


SECOND_MOMENTS: dict[str, Callable[[float], Moment]] = {
    "fedadagrad": adagrad, "fedadam": adam, "fedyogi": yogi}


class _ServerStep:
    """One server update per round from the running mean; the subclass says how."""

    def __init__(self, strategy: ServerOptimizer, global_weights: Tensors):
        self.strategy, self.reference = strategy, global_weights
        self.mean = RunningMean(global_weights)

    def add(self, result) -> None:
        self.mean.add(result)

    def result(self) -> Tensors | None:
        mean = self.mean.mean64()
        if mean is None:
            return None
        out = {}
        for k, ref in self.reference.items():
            if not ref.is_floating_point():
                out[k] = cast_like(mean[k], ref)
                continue
            x = ref.to(torch.float64)
            out[k] = cast_like(x + self.strategy.step(k, mean[k] - x), ref)
        return out


class ServerOptimizer(Defaults):
    """State: named float64 moments. `step(key, Δ)` returns the change to apply to w[key]."""

    moments: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.state: dict[str, Tensors] = {m: {} for m in self.moments}

    def begin_round(self, global_weights: Tensors, round_num: int) -> _ServerStep:
        return _ServerStep(self, global_weights)

    def step(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tensor_state(self) -> Tensors:
        return {f"{m}/{k}": v for m in self.moments for k, v in self.state[m].items()}

    def load_tensor_state(self, tensors: Tensors) -> None:
        self.state = {m: {} for m in self.moments}
        for name, value in tensors.items():
            m, _, k = name.partition("/")
            if m in self.state:
                self.state[m][k] = value.to(torch.float64)


class FedAvgM(ServerOptimizer):
    moments = ("v",)

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9):
        super().__init__()
        self.name, self.lr, self.beta = "fedavgm", server_lr, momentum

    def step(self, key, delta):
        v = self.state["v"].get(key)
        v = delta.clone() if v is None else self.beta * v + delta
        self.state["v"][key] = v
        return self.lr * v


class FedOpt(ServerOptimizer):
    moments = ("m", "v")

    def __init__(self, name: str, server_lr: float, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3):
        super().__init__()
        self.name, self.lr, self.beta1, self.tau = name, server_lr, beta1, tau
        self.second = SECOND_MOMENTS[name](beta2)

    def step(self, key, delta):
        m = self.state["m"].get(key, torch.zeros_like(delta))
        v = self.state["v"].get(key, torch.full_like(delta, self.tau ** 2))
        m = self.beta1 * m + (1 - self.beta1) * delta
        v = self.second(v, delta)
        self.state["m"][key], self.state["v"][key] = m, v
        return self.lr * m / (v.sqrt() + self.tau)
