"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning"), option II, the server's half.

Each task carries the server variate c and the client's own c_i (as extras, counted in the
bytes): tinyfed's clients may keep nothing between rounds (a respawned process, a device that
rebooted), so the server keeps every c_i on the client's behalf and it is checkpointed. The
client returns its weights y_i and Δc_i (`tinyfed.algorithms.Scaffold`); a result without
Δc_i is refused. Then, over the round's admitted clients S and all N clients:
x ← x + η_g·(1/|S|)·Σ (y_i − x);  c ← c + (1/N)·Σ Δc_i;  c_i ← c_i + Δc_i.

Memory: the running mean, c, and one c_i per client that has taken part (N model copies at
most, in memory and in each checkpoint).
"""

from __future__ import annotations

from typing import Any

import torch

from tinyfed.strategies.base import Defaults, Instructions, Tensors, cast_like, float_tensors
from tinyfed.strategies.fedavg import RunningMean
from tinyfed.wire import TensorSpec


class _Round:
    def __init__(self, owner: Scaffold, global_weights: Tensors):
        self.owner, self.reference = owner, global_weights
        self.mean = RunningMean(global_weights, weighted=False)
        self.dc_sum: Tensors = {}

    def add(self, result) -> None:
        self.mean.add(result)
        mine = self.owner.ci.setdefault(result.client_id, {})
        for k in self.owner.keys:
            dc = result.extras[f"dc/{k}"].to(torch.float64)
            mine[k] = mine.get(k, torch.zeros_like(dc)) + dc
            self.dc_sum[k] = self.dc_sum.get(k, torch.zeros_like(dc)) + dc

    def result(self) -> Tensors | None:
        mean = self.mean.mean64()
        if mean is None:
            return None
        owner = self.owner
        for k in owner.keys:
            owner.c[k] = owner.c[k] + self.dc_sum[k] / owner.num_clients
        out = {}
        for k, ref in self.reference.items():
            x = ref.to(torch.float64)
            out[k] = cast_like(x + owner.lr * (mean[k] - x), ref) if k in owner.keys \
                else cast_like(mean[k], ref)
        return out


class Scaffold(Defaults):
    name = "scaffold"

    def __init__(self, initial: Tensors, num_clients: int, server_lr: float = 1.0):
        self.keys = float_tensors(initial)
        self.spec = {k: TensorSpec(tuple(initial[k].shape), initial[k].dtype) for k in self.keys}
        self.num_clients, self.lr = num_clients, server_lr
        self.c: Tensors = {k: torch.zeros(initial[k].shape, dtype=torch.float64)
                           for k in self.keys}
        self.ci: dict[int, Tensors] = {}
        self.returns = {f"dc/{k}": s for k, s in self.spec.items()}

    def configure(self, round_num: int, client_id: int, global_weights: Tensors
                  ) -> Instructions:
        mine = self.ci.get(client_id, {})
        tensors = {}
        for k, s in self.spec.items():
            tensors[f"c/{k}"] = self.c[k].to(s.dtype)
            ci = mine.get(k)
            tensors[f"ci/{k}"] = ci.to(s.dtype) if ci is not None else torch.zeros(s.shape,
                                                                                   dtype=s.dtype)
        return Instructions("scaffold", {}, tensors, self.returns)

    def begin_round(self, global_weights: Tensors, round_num: int) -> _Round:
        return _Round(self, global_weights)

    def state_dict(self) -> dict[str, Any]:
        return {"clients_with_variates": sorted(self.ci)}

    def tensor_state(self) -> Tensors:
        out = {f"c/{k}": v for k, v in self.c.items()}
        for cid, mine in self.ci.items():
            out.update({f"ci/{cid}/{k}": v for k, v in mine.items()})
        return out

    def load_tensor_state(self, tensors: Tensors) -> None:
        self.ci = {}
        for name, value in tensors.items():
            kind, _, rest = name.partition("/")
            if kind == "c":
                self.c[rest] = value.to(torch.float64)
            elif kind == "ci":
                cid, _, k = rest.partition("/")
                self.ci.setdefault(int(cid), {})[k] = value.to(torch.float64)
