"""FedAvg (McMahan et al. 2017): the example-weighted mean of client weights.

FedSGD is the same rule with E=1 and B=all. The mean is a running sum in float64, so server
memory is two model copies whatever the number of clients.
"""

from __future__ import annotations

from typing import Any

import torch

from tinyfed.strategies.base import Tensors


class RunningMean:
    """Σ n_k·w_k and Σ n_k, accumulated one update at a time."""

    def __init__(self, reference: Tensors):
        self.reference = reference
        self.sums: Tensors | None = None
        self.total = 0

    def add(self, weights: Tensors, num_examples: int) -> None:
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        if self.sums is None:
            self.sums = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in weights.items()}
        for k, v in weights.items():
            self.sums[k].add_(v.to(torch.float64), alpha=num_examples)
        self.total += num_examples

    def result(self) -> Tensors | None:
        """The weighted mean in each tensor's own dtype; None when nothing arrived."""
        if self.sums is None:
            return None
        out = {}
        for k, ref in self.reference.items():
            mean = self.sums[k] / self.total
            out[k] = (
                mean.round().to(ref.dtype) if not ref.is_floating_point() else mean.to(ref.dtype)
            )
        return out


class FedAvg:
    """Stateless: every round starts a fresh running mean."""

    name = "fedavg"

    def begin_round(self, global_weights: Tensors, round_num: int) -> RunningMean:
        return RunningMean(global_weights)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
