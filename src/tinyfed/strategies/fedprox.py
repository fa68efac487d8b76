"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks"): FedAvg's
aggregation, with every client told to add the proximal term (μ/2)‖w − w_global‖² to its
local objective (client algorithm "fedprox", `tinyfed.algorithms.Proximal`)."""

from __future__ import annotations

from tinyfed.strategies.base import Instructions, Tensors
from tinyfed.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    def __init__(self, mu: float):
        super().__init__(weighted=True)
        self.name = "fedprox"
        self.instructions = Instructions("fedprox", {"mu": float(mu)})

    def configure(self, round_num: int, client_id: int, global_weights: Tensors
                  ) -> Instructions:
        return self.instructions
