"""Byzantine-robust aggregation. Each needs every update of the round at once, so these rules
hold the round's admitted updates (at most C·K model copies, flattened to one float32 matrix)
instead of a running sum; that bound is the price of robustness.

- ``median``: coordinate-wise median (Yin et al. 2018, "Byzantine-Robust Distributed Learning:
  Towards Optimal Statistical Rates"); with an even count, the mean of the two middle values.
- ``trimmed-mean``: per coordinate, drop the ⌊β·m⌋ largest and smallest of the m values and
  average the rest (Yin et al. 2018), β = `trim_fraction` in [0, 0.5).
- ``krum`` / ``multi-krum`` (Blanchard et al. 2017, "Machine Learning with Adversaries:
  Byzantine Tolerant Gradient Descent"): score each update by the sum of squared distances to
  its m − f − 2 nearest others; Krum keeps the best one, Multi-Krum averages the best
  `krum_m`. Needs m ≥ 2f + 3; a round with fewer admitted updates says so in its record.

All three are unweighted (a Byzantine client would otherwise claim many examples).
"""

from __future__ import annotations

from typing import Any

import torch

from tinyfed.strategies.base import Defaults, Tensors, cast_like, float_tensors


class _Stack:
    """The round's updates as rows of one matrix (float tensors flattened and concatenated)."""

    def __init__(self, owner: Any, reference: Tensors):
        self.owner, self.reference = owner, reference
        self.keys = float_tensors(reference)
        self.rows: list[torch.Tensor] = []
        self.clients: list[int] = []

    def add(self, result) -> None:
        self.rows.append(torch.cat([result.weights[k].reshape(-1).to(torch.float32)
                                    for k in self.keys]))
        self.clients.append(result.client_id)

    def unflatten(self, flat: torch.Tensor) -> Tensors:
        out, at = {}, 0
        for k, ref in self.reference.items():
            if k in self.keys:
                n = ref.numel()
                out[k] = cast_like(flat[at: at + n].reshape(ref.shape), ref)
                at += n
            else:
                out[k] = ref
        return out

    def result(self) -> Tensors | None:
        if not self.rows:
            return None
        return self.unflatten(self.owner.combine(self, torch.stack(self.rows)))


def sorted_columns(matrix: torch.Tensor) -> torch.Tensor:
    return torch.sort(matrix, dim=0).values.to(torch.float64)


class _Robust(Defaults):
    def __init__(self) -> None:
        self.last: dict[str, Any] = {}

    def begin_round(self, global_weights: Tensors, round_num: int) -> _Stack:
        self.last = {}
        return _Stack(self, global_weights)

    def report(self) -> dict[str, Any]:
        return dict(self.last)


class Median(_Robust):
    name = "median"

    def combine(self, stack: _Stack, m: torch.Tensor) -> torch.Tensor:
        n = m.shape[0]
        s = sorted_columns(m)
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


class TrimmedMean(_Robust):
    name = "trimmed-mean"

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def combine(self, stack: _Stack, m: torch.Tensor) -> torch.Tensor:
        n = m.shape[0]
        cut = int(self.beta * n)
        self.last = {"trimmed_each_side": cut}
        return sorted_columns(m)[cut: n - cut].mean(dim=0)


class Krum(_Robust):
    def __init__(self, f: int, keep: int = 1):
        super().__init__()
        self.f, self.keep = f, keep
        self.name = "krum" if keep == 1 else "multi-krum"

    def scores(self, m: torch.Tensor) -> torch.Tensor:
        """Σ of squared distances to the n − f − 2 nearest other updates, per update."""
        n = m.shape[0]
        m64 = m.to(torch.float64)
        sq = (m64 * m64).sum(dim=1)
        dist = (sq[:, None] + sq[None, :] - 2 * m64 @ m64.T).clamp_min(0)
        dist.fill_diagonal_(float("inf"))
        k = max(1, n - self.f - 2)
        return torch.sort(dist, dim=1).values[:, : min(k, n - 1)].sum(dim=1) if n > 1 \
            else torch.zeros(1, dtype=torch.float64)

    def combine(self, stack: _Stack, m: torch.Tensor) -> torch.Tensor:
        n = m.shape[0]
        scores = self.scores(m)
        order = sorted(range(n), key=lambda i: (float(scores[i]), i))  # ties: selection order
        chosen = order[: min(self.keep, n)]
        self.last = {"krum_chosen": [stack.clients[i] for i in chosen]}
        if n < 2 * self.f + 3:
            self.last["krum_short"] = f"{n} updates < 2f+3 = {2 * self.f + 3}"
        return m[chosen].to(torch.float64).mean(dim=0)
