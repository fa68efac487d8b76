"""The runtime seam: run client tasks against global weights, hand back results as they finish.

In-process, pipes, HTTP and Ray implement this one interface and carry the same frames, so
bytes are measured the same way everywhere. No runtime knows whether it serves synchronous
rounds or asynchronous merging.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from tinyfed.experiment import Experiment
from tinyfed.protocol import ClientResult, ClientTask, Expectation

# Seconds: when a results() call's timeout passes, the tasks due within this much after it fail
# with it (one wake-up for a round's stragglers, not one per task). Every runtime fails a task
# only once its own deadline (`round_timeout` after its submit) has passed, never another's.
GRACE = 0.5
STARTUP_TIMEOUT = 120.0  # seconds a worker gets to import torch, load its data and say it is up


class Runtime(Protocol):
    def start(self, experiment: Experiment) -> None:
        """Spawn children / connect / start actors."""

    def submit(self, task: ClientTask, weights_payload: bytes, expect: Expectation) -> None:
        """Queue one client's job (non-blocking). `weights_payload` is safetensors, encoded once."""

    def results(self, timeout: float) -> Iterator[ClientResult]:
        """Yield results (updates or failures) as they finish, until none is pending or the
        timeout passes; tasks still pending at the timeout are yielded as failures.

        The caller may stop iterating after any result (asynchronous mode takes one result,
        merges it and submits more work, then calls again): tasks not yet yielded stay pending
        for the next call, and a task submitted between calls joins them."""

    def pending(self) -> int:
        """How many submitted tasks have not produced a result yet."""

    # Optional: `ready() -> int`, how many results `results()` would yield now without waiting
    # (the HTTP runtime's admitted updates). The async loop then merges them all before it
    # dispatches their replacements; a runtime without it hands over one result at a time.

    def close(self) -> None:
        """Reap everything the runtime started."""
