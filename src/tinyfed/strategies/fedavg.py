"""FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data"): the mean of client weights, weighted by examples (the paper's) or
uniform.

FedSGD is the same rule with E=1 and B=all. The mean is a running sum in float64, so server
memory is two model copies whatever the number of clients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tinyfed.strategies.base import Defaults, Tensors, cast_like

if TYPE_CHECKING:
    from tinyfed.protocol import ClientResult


class RunningMean:
    """Σ a_k·w_k and Σ a_k, accumulated one update at a time; a_k = n_k (weighted) or 1."""

    def __init__(self, reference: Tensors, weighted: bool = True):
        self.reference = reference
        self.weighted = weighted
        self.sums: Tensors | None = None
        self.total = 0
        self.count = 0

    def add(self, result: ClientResult) -> None:
        self.add_weights(result.weights, result.num_examples)

    def add_weights(self, weights: Tensors, num_examples: int) -> None:
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        a = num_examples if self.weighted else 1
        if self.sums is None:
            self.sums = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in weights.items()}
        for k, v in weights.items():
            self.sums[k].add_(v, alpha=a)  # widened inside the add: no float64 copy of v
        self.total += a
        self.count += 1

    def mean64(self) -> Tensors | None:
        """The mean in float64 (for rules that go on computing with it)."""
        if self.sums is None:
            return None
        return {k: s / self.total for k, s in self.sums.items()}

    def result(self) -> Tensors | None:
        """The mean in each tensor's own dtype; None when nothing arrived."""
        mean = self.mean64()
        if mean is None:
            return None
        return {k: cast_like(mean[k], ref) for k, ref in self.reference.items()}


class FedAvg(Defaults):
    """Stateless: every round starts a fresh running mean."""

    def __init__(self, weighted: bool = True):
        self.weighted = weighted
        self.name = "fedavg" if weighted else "fedavg-uniform"

    def begin_round(self, global_weights: Tensors, round_num: int) -> RunningMean:
        return RunningMean(global_weights, self.weighted)
