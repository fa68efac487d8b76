"""FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization"): clients that take more local steps must not pull the model further.

Client i's update is normalised by a_i, the sum of its local solver's coefficients: for SGD
with momentum ρ over τ_i steps, ‖a_i‖₁ = [τ_i − ρ(1 − ρ^τ_i)/(1 − ρ)]/(1 − ρ) (τ_i when
ρ = 0). With p_i = n_i/Σn: d_i = (x − y_i)/‖a_i‖₁, τ_eff = Σ p_i‖a_i‖₁, x ← x − τ_eff·Σ p_i d_i.
τ_i is computed by the server from the task (E·⌈n_i/B⌉), not taken from the client's word.
Streaming: three running sums, memory independent of the number of clients.
"""

from __future__ import annotations

import math

import torch

from tinyfed.strategies.base import Defaults, Tensors, cast_like


def local_steps(num_examples: int, epochs: int, batch_size: int) -> int:
    return epochs * (1 if batch_size <= 0 else math.ceil(num_examples / batch_size))


def solver_norm(steps: int, momentum: float) -> float:
    """‖a‖₁ of local SGD with heavy-ball momentum ρ (FedNova's eq. for momentum SGD)."""
    if momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho ** steps) / (1 - rho)) / (1 - rho)


class _Round:
    def __init__(self, owner: FedNova, global_weights: Tensors):
        self.owner, self.reference = owner, global_weights
        self.d_sum: Tensors = {}
        self.a_sum = 0.0
        self.n_sum = 0

    def add(self, result) -> None:
        n = result.num_examples
        o = self.owner
        a = solver_norm(local_steps(n, o.epochs, o.batch_size), o.momentum)
        for k, ref in self.reference.items():
            if not ref.is_floating_point():
                continue
            d = (ref.to(torch.float64) - result.weights[k].to(torch.float64)) / a
            self.d_sum[k] = self.d_sum.get(k, torch.zeros_like(d)).add_(d, alpha=n)
        self.a_sum += n * a
        self.n_sum += n

    def result(self) -> Tensors | None:
        if not self.n_sum:
            return None
        tau_eff = self.a_sum / self.n_sum
        return {k: cast_like(ref.to(torch.float64) - tau_eff * self.d_sum[k] / self.n_sum, ref)
                if k in self.d_sum else ref for k, ref in self.reference.items()}


class FedNova(Defaults):
    name = "fednova"

    def __init__(self, epochs: int, batch_size: int, momentum: float = 0.0):
        self.epochs, self.batch_size, self.momentum = epochs, batch_size, momentum

    def begin_round(self, global_weights: Tensors, round_num: int) -> _Round:
        return _Round(self, global_weights)
