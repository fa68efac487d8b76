"""The round contract below the policies: a `Runtime` runs client tasks and hands back results
as they finish; a `Transport` only moves them.

`dispatch.Dispatcher` is the one Runtime: it owns task ids, deadlines and their grace, drops late
and duplicate deliveries (counted), and asks a transport to cancel what is due. Transports
(in-process, pipes, HTTP, Ray) only send a job, deliver its validated result, and cancel a job
that is due (killing the child or actor that runs it where they can), so every runtime fails a
task in the same way and a new transport is one file. No transport knows whether it serves
synchronous rounds or asynchronous merging.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from tinyfed import protocol, wire
from tinyfed.errors import WireError
from tinyfed.experiment import Experiment
from tinyfed.protocol import ClientResult, ClientTask, Expectation

# Seconds: when a results() call's timeout passes, the tasks due within this much after it fail
# with it (one wake-up for a round's stragglers, not one per task). A task fails only once its
# own deadline (`round_timeout` after its submit) has passed, never another's.
GRACE = 0.5
STARTUP_TIMEOUT = 120.0  # seconds a worker gets to import torch, load its data and say it is up
T = TypeVar("T")


def stacking_plan(config, threads: int) -> dict:
    """What `trainers.choose` needs to know of a transport that hands a worker several clients
    at once, on `threads` torch threads: it does so unless `deterministic` (stacked updates
    equal one-by-one training to float tolerance, not bit for bit), or the config asks for it."""
    return {"threads": threads, "batch_size": config.batch_size,
            "stacking": config.trainer == "vectorized" or not config.deterministic}


@dataclass(eq=False)
class Job:
    """One task in flight: the dispatcher's id and deadline, what a transport moves."""

    id: int
    task: ClientTask
    payload: bytes  # the round's weights, safetensors encoded once and shared by its jobs
    expect: Expectation  # what the server accepts as the answer (validation is the caller's)
    due: float  # monotonic time at which the job fails without a result


def answer(job: Job, reply: bytes, sent: int) -> ClientResult:
    """A job's reply frame read as its result (validated against its expectation), with the
    `sent` bytes of its task frame as what went down."""
    result = protocol.read_update(reply, job.expect)
    result.bytes_down = sent
    return result


def batch_frame(before: Mapping[str, int], after: Mapping[str, int]) -> bytes:
    """A worker's BATCH reply after a batch: the tasks it trained stacked and alone meanwhile
    (the difference of its tally `before` and `after`), for the run's report."""
    return wire.encode_frame(wire.Kind.BATCH, {k: after.get(k, 0) - before.get(k, 0)
                                               for k in ("stacked", "alone")})


def shares_deadline(other: Job, due: Job) -> bool:
    """Whether `other`, in the batch of a job killed at its deadline, fails with it: due within
    `GRACE` of it (submitted together); one due later is sent again instead."""
    return other is not due and other.due <= due.due + GRACE


def batch_counts(frame: bytes) -> dict[str, int]:
    """The tally a worker's BATCH reply carries (tasks it trained stacked and alone). Raises
    WireError for anything else."""
    msg = wire.decode_frame(frame)
    counts = {k: msg.header.get(k) for k in ("stacked", "alone")}
    if msg.kind != wire.Kind.BATCH or any(type(v) is not int or v < 0 for v in counts.values()):
        raise WireError(f"expected a BATCH frame with task counts, got {msg.kind.name} "
                        f"{msg.header}"[:200])
    return counts


def work(job: Job) -> int:
    """What a job costs a worker, in examples trained: its shard size times its epochs."""
    return job.expect.max_examples * max(1, job.task.settings.epochs)


def deal(items: list[T], parts: int, weight: Callable[[T], float],
         most: int | None = None) -> list[list[T]]:
    """Jobs submitted together dealt out to `parts` workers by their work, so that no worker
    waits on another holding the long clients: heaviest first, each to the lightest part (the
    lowest-numbered among equals) with room (at most `most` items), each part in the items'
    order. On Fashion-MNIST's Dirichlet shards (α 0.1-0.5; 20 random selections of 10 clients,
    2 parts) the busiest part held 1.00-1.01× an even share, against 1.07-1.25× when dealt by
    count in submit order (the previous rule)."""
    loads = [0.0] * parts
    members: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(items)), key=lambda i: -weight(items[i])):
        p = min((p for p in range(parts) if most is None or len(members[p]) < most),
                key=lambda p: (loads[p], p))
        loads[p] += weight(items[i])
        members[p].append(i)
    return [[items[i] for i in sorted(m)] for m in members]


@dataclass(frozen=True)
class Stopped:
    """How a transport stopped a due job, for the failure the dispatcher words: e.g. "not
    started", "child killed", "ray actor killed"; and the bytes already sent for it."""

    how: str
    bytes_down: int = 0
    started: bool = True


@dataclass
class Delivery:
    """A job's result as a transport delivers it (an update, validated, or a failure)."""

    job: Job
    result: ClientResult
    arrived: float = field(default_factory=time.monotonic)


class Transport(Protocol):
    def start(self, experiment: Experiment) -> None:
        """Spawn children / connect / start actors / listen."""

    def send(self, job: Job) -> None:
        """Queue one job (non-blocking)."""

    def receive(self, timeout: float) -> Delivery | None:
        """The next delivery, waiting at most `timeout` seconds (None if none came)."""

    def waiting(self) -> int:
        """Deliveries `receive` would return without waiting."""

    def cancel(self, job: Job) -> Stopped | None:
        """The job is due: stop work on it (kill what runs it, where possible) and say how;
        None when its result is already waiting to be received."""

    def close(self) -> None:
        """Reap everything the transport started."""

    # Optional: `ready() -> int` where results that can be taken without waiting should be
    # merged before new work is dispatched (the HTTP server's admitted updates): the async
    # loop then batches them; without it, it hands over one result at a time.


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

    def close(self) -> None:
        """Reap everything the runtime started."""
