"""In-process transport: clients run in the server's own process.

Tasks still go through the wire module (task frame out, update frame back), so bytes are counted
exactly as the other transports count them. A task cannot be interrupted here: a queued job that
is due is cancelled before it starts, and a result that ends after its deadline is dropped as
late by the dispatcher, as in every runtime.

Three ways to run what is queued, from the trainer choice (`trainers.choose`):
- one job at a time, on the caller's thread inside `receive` (the whole wait is the training);
- stacked: when the choice stacks clients (the 2NN at a small batch, unless `deterministic`; or
  `trainer = "vectorized"`), `receive` hands every queued job to the worker at once and it
  trains them as stacked computations; their results then wait here in order. A deadline then
  applies to the batch: its jobs start together and finish together;
- lanes: when the choice is autograd (the CNN, a user's module) on several torch threads, one
  client per thread, side by side (`runtimes/lanes.py`); results arrive as they finish.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter, deque

import torch

from tinyfed import protocol, wire
from tinyfed.experiment import Experiment
from tinyfed.protocol import ClientWorker
from tinyfed.runtimes.base import Delivery, Job, Stopped, answer, stacking_plan
from tinyfed.runtimes.lanes import Lanes, lane_count
from tinyfed.trainers import choose


class InProcessRuntime:
    def __init__(self, config=None) -> None:
        self.config = config
        self.worker: ClientWorker | None = None
        self.queue: deque[Job] = deque()
        self.done: queue.Queue[Delivery] = queue.Queue()  # results not yet received
        self.crc = wire.CrcMemo()
        self.stacks = False  # hand the worker every queued job at once
        self.lanes: Lanes | None = None  # clients side by side, one thread each
        self.side_by_side = 1  # how many (for the run's report)
        self.threads_before = 0  # torch's thread count before the lanes set one
        self.tally: Counter[str] = Counter()  # tasks the worker trained stacked and alone

    def start(self, experiment: Experiment) -> None:
        config, ds = experiment.config, experiment.dataset
        lock = threading.Lock()

        def shard(cid: int):  # the examples' layout is made on first use: once
            with lock:
                return experiment.shard(cid)

        def make() -> ClientWorker:
            return ClientWorker(config.model, ds.input_shape, ds.num_classes, shard,
                                max_frame=config.max_frame, trainer=config.trainer)

        self.worker = make()
        plan = self.stacking(config)
        choice = choose(self.worker.model, config.trainer, config.optimizer, **plan)
        self.stacks = choice.stacks
        self.tally = self.worker.tally  # outlives the worker, for the run's report
        self.side_by_side = lane_count(choice.name, self.stacks, plan["threads"], config.lanes)
        if self.side_by_side > 1:
            self.lanes = Lanes(make, self.side_by_side, self.done)
            self.threads_before = torch.get_num_threads()
            torch.set_num_threads(1)  # one per lane; evaluation sets its own and restores

    @staticmethod
    def stacking(config) -> dict:
        """What `trainers.choose` needs to know of this runtime: it hands its worker several
        clients at once, on this process's torch threads (`base.stacking_plan`)."""
        return stacking_plan(config, torch.get_num_threads())

    def send(self, job: Job) -> None:
        self.queue.append(job)

    def waiting(self) -> int:
        return self.done.qsize()  # the rest is not done before `receive` runs it

    def receive(self, timeout: float) -> Delivery | None:
        """Lanes: start every queued job, then wait for the next result. Otherwise run the next
        queued job (or, stacking, all of them) to its end (the whole wait is the training)."""
        assert self.worker is not None, "start() first"
        if self.lanes is not None:
            while self.queue:
                job = self.queue.popleft()
                self.lanes.submit(job, self._frame(job))
            try:
                return self.done.get(timeout=timeout)
            except queue.Empty:
                return None
        if self.done.empty() and self.queue:
            jobs = list(self.queue) if self.stacks else [self.queue[0]]
            for _ in jobs:
                self.queue.popleft()
            frames = [self._frame(job) for job in jobs]
            for job, frame, reply in zip(jobs, frames, self.worker.handle_many(frames)):
                self.done.put(Delivery(job, answer(job, reply, len(frame))))
        try:
            return self.done.get_nowait()
        except queue.Empty:
            return None

    def _frame(self, job: Job) -> bytes:
        return protocol.task_frame(job.task, job.payload, self.crc(job.payload))

    def cancel(self, job: Job) -> Stopped | None:
        """A due job still queued never starts; one running on a lane cannot be stopped (its
        result comes late and is dropped); one whose result waits here is not stopped."""
        with self.done.mutex:
            if any(got.job is job for got in self.done.queue):
                return None
        if job in self.queue:
            self.queue.remove(job)
        elif self.lanes is not None and self.lanes.cancel(job) is False:
            return Stopped("running on a thread of this process, which cannot stop it")
        return Stopped("queued behind other clients in this process", started=False)

    def close(self) -> None:
        self.queue.clear()
        if self.lanes is not None:
            self.lanes.close()
            self.lanes = None
            torch.set_num_threads(self.threads_before)
        with self.done.mutex:
            self.done.queue.clear()
        self.worker = None
