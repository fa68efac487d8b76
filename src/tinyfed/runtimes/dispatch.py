"""The dispatcher: the one Runtime, above every transport.

It numbers jobs and gives each a deadline (`round_timeout` after its submit), fails the jobs
that are due by asking the transport to cancel them, and drops what arrives for a job that is
no longer pending (a late or duplicate delivery, counted in `dropped`) or after its deadline
(failed as late, so a result never counts once its time is up, whatever the transport). The
rule at the end of a `results()` call is the same for every transport: the jobs due within
`GRACE` of it fail with it, or all of them if none is and nothing is waiting.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from tinyfed.experiment import Experiment
from tinyfed.protocol import ClientResult, ClientTask, Expectation
from tinyfed.runtimes.base import GRACE, Delivery, Job, Transport


class Dispatcher:
    """A `Runtime` over a `Transport` (the transport's own attributes read through)."""

    def __init__(self, transport: Transport, round_timeout: float):
        self.transport = transport
        self.round_timeout = float(round_timeout)
        self.jobs: dict[int, Job] = {}  # pending, by id, in submit order
        self.answered: set[int] = set()  # due, but the transport holds their result
        self.ids = itertools.count()
        self.dropped: Counter[str] = Counter()
        if hasattr(transport, "ready"):
            self.ready = transport.ready

    def __getattr__(self, name: str) -> Any:  # url, pids(), hub, counters of the transport
        return getattr(self.__dict__["transport"], name)

    def warm(self) -> None:
        """Let a transport that starts workers start them before the experiment is built."""
        warm = getattr(self.transport, "warm", None)
        if warm is not None:
            warm()

    def start(self, experiment: Experiment) -> None:
        self.transport.start(experiment)

    def submit(self, task: ClientTask, weights_payload: bytes, expect: Expectation) -> None:
        job = Job(next(self.ids), task, weights_payload, expect,
                  time.monotonic() + self.round_timeout)
        self.jobs[job.id] = job
        self.transport.send(job)

    def pending(self) -> int:
        return len(self.jobs)

    def results(self, timeout: float) -> Iterator[ClientResult]:
        """Results as they arrive; submit() may be called meanwhile. A job fails once its own
        deadline has passed. When this call's `timeout` passes, the jobs due by then (within
        GRACE) fail, or all of them if none is and nothing is waiting; then the results
        already waiting are delivered and the call returns."""
        end = time.monotonic() + timeout
        ended = False
        while self.jobs:
            now = time.monotonic()
            failed = self.expire(now)
            if now >= end and not ended:
                ended = True
                if not failed and not self.transport.waiting():
                    failed = self.expire(end + GRACE) or self.expire(math.inf)
            yield from failed
            if not self.jobs or (ended and not self.transport.waiting()):
                return
            oldest = next((j.due for j in self.jobs.values() if j.id not in self.answered), end)
            wake = min(end, oldest) if not ended else now
            got = self.transport.receive(max(wake - time.monotonic(), 0.001))
            result = self.take(got) if got is not None else None
            if result is not None:
                yield result

    def take(self, got: Delivery) -> ClientResult | None:
        """A delivery's result if its job is pending and on time; a late failure if it came
        after the deadline; None (counted) for a job no longer pending."""
        job = self.jobs.pop(got.job.id, None)
        if job is None:  # for a job already failed or answered: never counts
            self.dropped["late" if got.result.ok else "late failure"] += 1
            return None
        if got.arrived > job.due and job.id not in self.answered:
            self.dropped["late"] += 1
            return ClientResult.failure(
                job.task, f"late: the result came {got.arrived - job.due:.2f} s after the "
                f"deadline (round_timeout={self.round_timeout:g} s); dropped",
                bytes_down=radio(got.result.bytes_down, job), bytes_up=got.result.bytes_up)
        self.answered.discard(job.id)
        got.result.bytes_down = radio(got.result.bytes_down, job)
        return got.result

    def expire(self, until: float) -> list[ClientResult]:
        """Fail the pending jobs due by `until` (their transport cancels them), except those
        whose result the transport already holds. Jobs are kept in submit order with one
        timeout, so their deadlines ascend: the scan stops at the first one not due."""
        due = []
        for job in self.jobs.values():
            if job.due > until:
                break
            if job.id not in self.answered:
                due.append(job)
        failed = []
        for job in due:
            stopped = self.transport.cancel(job)
            if stopped is None:
                self.answered.add(job.id)
                continue
            del self.jobs[job.id]
            what = "no result" if stopped.started else "not started"
            failed.append(ClientResult.failure(
                job.task, f"deadline: {what} within round_timeout={self.round_timeout:g} s "
                f"({stopped.how})", bytes_down=radio(stopped.bytes_down, job)))
        return failed

    def close(self) -> None:
        self.jobs.clear()
        self.answered.clear()
        self.transport.close()


def radio(sent: int, job: Job) -> int:
    """Bytes a transport sent for a job, less its device-memory section (a simulated device's
    own memory rides with the task but would never cross a real link)."""
    return max(0, sent - job.task.memory_bytes)


def as_runtime(obj: Any, round_timeout: float) -> Any:
    """A Runtime: `obj` itself if it is one, else the transport `obj` under a Dispatcher."""
    return obj if hasattr(obj, "results") else Dispatcher(obj, round_timeout)
