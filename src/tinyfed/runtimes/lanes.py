"""Lanes: clients of the in-process runtime trained side by side, each on a Python thread of its
own with its own worker (model), torch on one thread per lane.

Why: a model the fused and stacked trainers cannot train (the paper's CNN, a user's module)
trains through autograd, whose kernels use two cores better split between two clients than
shared by one (torch releases the GIL inside its kernels): two lanes trained the CNN 1.16×
faster than one client at a time on two threads and 1.78× faster than a plain PyTorch loop
doing so, a little faster than two worker processes end to end (`bench/bench_cnn.py`,
docs/benchmarks.md section 7). Each lane trains a whole task on one thread, as a child of the
process runtime does. Per-step Python holds the GIL the lanes share: the autograd path keeps it
short (`client.PlainSGD` instead of torch.optim's step).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from tinyfed.protocol import ClientResult, ClientWorker
from tinyfed.runtimes.base import Delivery, Job, answer


def lane_count(choice_name: str, stacks: bool, threads: int, wanted: int) -> int:
    """How many clients train at once in one process: with the autograd trainer (nothing
    stacks), the config's `lanes`, or one per torch thread (one under `deterministic`; forced
    lanes keep its results bit-identical: each client trains alone on one thread, and the
    server merges in selection order)."""
    if stacks or choice_name != "autograd":
        return 1
    return max(1, wanted or threads)


class Lanes:
    """`count` workers, each served by a daemon thread; results go to `done` as they finish.

    Daemon threads: a lane still training when the run ends (a task cancelled at its deadline
    cannot be stopped here) finishes on its own and never holds the process's exit."""

    def __init__(self, make_worker: Callable[[], ClientWorker], count: int,
                 done: queue.Queue[Delivery]) -> None:
        self.todo: queue.SimpleQueue[tuple[Job, bytes] | None] = queue.SimpleQueue()
        self.done = done
        self.lock = threading.Lock()
        self.waiting: set[int] = set()  # ids submitted and not started
        self.running: set[int] = set()
        self.count = count
        for i in range(count):
            threading.Thread(target=self._serve, args=(make_worker(),), daemon=True,
                             name=f"tinyfed-lane-{i}").start()

    def submit(self, job: Job, frame: bytes) -> None:
        with self.lock:
            self.waiting.add(job.id)
        self.todo.put((job, frame))

    def cancel(self, job: Job) -> bool | None:
        """True if the job had not started (it never will), False if it is running (it
        cannot be stopped: its result will come late), None if this pool does not hold it."""
        with self.lock:
            if job.id in self.waiting:
                self.waiting.discard(job.id)
                return True
            return False if job.id in self.running else None

    def close(self) -> None:
        """No more tasks start; each lane's thread ends after the task it is on, if any."""
        with self.lock:
            self.waiting.clear()
        for _ in range(self.count):
            self.todo.put(None)

    def _serve(self, worker: ClientWorker) -> None:
        while (item := self.todo.get()) is not None:
            job, frame = item
            with self.lock:
                if job.id not in self.waiting:  # cancelled before it started
                    continue
                self.waiting.discard(job.id)
                self.running.add(job.id)
            try:
                result = answer(job, worker.handle(frame), len(frame))
            except Exception as exc:  # never lose a job to an unexpected error on a lane
                result = ClientResult.failure(
                    job.task, f"in-process lane: {type(exc).__name__}: {exc}",
                    bytes_down=len(frame))
            self.done.put(Delivery(job, result))  # first: a cancel never finds it nowhere
            with self.lock:
                self.running.discard(job.id)
