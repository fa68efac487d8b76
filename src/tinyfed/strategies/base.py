"""What every aggregation rule offers the server loop. Arithmetic only: no I/O, no transport."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

Tensors = dict[str, torch.Tensor]


def select_clients(client_ids: list[int], count: int, seed: int, round_num: int) -> list[int]:
    """Seeded by (run seed, round) alone, so a resumed run selects exactly as the original."""
    rng = np.random.default_rng([seed, round_num])
    chosen = rng.choice(len(client_ids), size=min(count, len(client_ids)), replace=False)
    return sorted(client_ids[i] for i in chosen)


class Aggregator(Protocol):
    """Takes one round's updates as they arrive; memory does not grow with their number."""

    def add(self, weights: Tensors, num_examples: int) -> None: ...

    def result(self) -> Tensors | None: ...


class Strategy(Protocol):
    """A synchronous rule: one aggregator per round."""

    name: str

    def begin_round(self, global_weights: Tensors, round_num: int) -> Aggregator: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
