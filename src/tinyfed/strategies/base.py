"""What every synchronous strategy offers the server loop. Arithmetic only: no I/O, no transport.

The split follows Flower's: a strategy *configures* each client's task (which client algorithm,
its parameters, any per-client tensors such as SCAFFOLD's variates) and *aggregates* the
results (an `Aggregator` per round, fed one admitted result at a time). What it keeps between
rounds (server momentum, Adam moments, control variates, an accountant) is its state, saved in
every checkpoint: JSON-able numbers in `state_dict`, tensors in `tensor_state`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from tinyfed.wire import TensorSpec

if TYPE_CHECKING:
    from tinyfed.protocol import ClientResult

Tensors = dict[str, torch.Tensor]


def select_clients(client_ids: list[int], count: int, seed: int, round_num: int) -> list[int]:
    """Seeded by (run seed, round) alone, so a resumed run selects exactly as the original."""
    rng = np.random.default_rng([seed, round_num])
    chosen = rng.choice(len(client_ids), size=min(count, len(client_ids)), replace=False)
    return sorted(client_ids[i] for i in chosen)


@dataclass
class Instructions:
    """What one client is told this round beyond the global model and the training settings."""

    algorithm: str = ""  # a client algorithm (tinyfed.algorithms.CLIENT_ALGORITHMS)
    params: dict[str, float] = field(default_factory=dict)
    tensors: Tensors = field(default_factory=dict)  # sent with the model, counted in its bytes
    returns: dict[str, TensorSpec] = field(default_factory=dict)  # extras the result must hold


PLAIN = Instructions()


class Aggregator(Protocol):
    """Takes one round's admitted results as they arrive (in selection order when the run is
    deterministic). Streaming rules keep memory independent of the number of clients; rules
    that need every update at once (median, Krum) say so and hold at most the round's."""

    def add(self, result: ClientResult) -> None: ...

    def result(self) -> Tensors | None: ...


class Strategy(Protocol):
    """A synchronous rule."""

    name: str

    def configure(self, round_num: int, client_id: int, global_weights: Tensors
                  ) -> Instructions: ...

    def begin_round(self, global_weights: Tensors, round_num: int) -> Aggregator: ...

    def report(self) -> dict[str, Any]: ...

    def stop_before(self, round_num: int) -> str: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def tensor_state(self) -> Tensors: ...

    def load_tensor_state(self, tensors: Tensors) -> None: ...


class Defaults:
    """The answers of a strategy that needs nothing special: every client trains plainly, no
    record fields, no budget, no state. A strategy mixes this in and writes only what differs."""

    name = "strategy"

    def configure(self, round_num: int, client_id: int, global_weights: Tensors
                  ) -> Instructions:
        return PLAIN

    def report(self) -> dict[str, Any]:
        """Fields the round's record gains (e.g. ε, the clipping bound)."""
        return {}

    def stop_before(self, round_num: int) -> str:
        """A reason not to run round `round_num` (a privacy budget), or ''."""
        return ""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def tensor_state(self) -> Tensors:
        return {}

    def load_tensor_state(self, tensors: Tensors) -> None:
        return None


def float_tensors(weights: Tensors) -> list[str]:
    """Names of the tensors arithmetic applies to (integer buffers are carried, not averaged)."""
    return [k for k, v in weights.items() if v.is_floating_point()]


def cast_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float64 result in the reference tensor's dtype (integers rounded)."""
    return value.to(like.dtype) if like.is_floating_point() else value.round().to(like.dtype)
