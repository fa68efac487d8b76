"""In-process transport: clients run in the server's own process.

Tasks still go through the wire module (task frame out, update frame back), so bytes are counted
exactly as the other transports count them. A task cannot be interrupted here (it runs on the
caller's thread inside `receive`): a queued job that is due is cancelled before it starts, and
a result that ends after its deadline is dropped as late by the dispatcher, as in every runtime.

When the trainer choice stacks clients (`trainers.choose`: the 2NN at a small batch, unless
`deterministic`; or `trainer = "vectorized"`), `receive` hands every queued job to the worker at
once and it trains them as stacked computations; their results then wait here in order. A
deadline then applies to the batch: its jobs start together and finish together.
"""

from __future__ import annotations

from collections import Counter, deque

import torch

from tinyfed import protocol, wire
from tinyfed.experiment import Experiment
from tinyfed.protocol import ClientWorker
from tinyfed.runtimes.base import Delivery, Job, Stopped, stacking_plan
from tinyfed.trainers import choose


class InProcessRuntime:
    def __init__(self, config=None) -> None:
        self.config = config
        self.worker: ClientWorker | None = None
        self.queue: deque[Job] = deque()
        self.done: deque[Delivery] = deque()  # a stacked batch's results, not yet received
        self.crc = wire.CrcMemo()
        self.stacks = False  # hand the worker every queued job at once
        self.tally: Counter[str] = Counter()  # tasks the worker trained stacked and alone

    def start(self, experiment: Experiment) -> None:
        config, ds = experiment.config, experiment.dataset
        self.worker = ClientWorker(config.model, ds.input_shape, ds.num_classes,
                                   experiment.shard, max_frame=config.max_frame,
                                   trainer=config.trainer)
        self.stacks = choose(self.worker.model, config.trainer, config.optimizer,
                             **self.stacking(config)).stacks
        self.tally = self.worker.tally  # outlives the worker, for the run's report

    @staticmethod
    def stacking(config) -> dict:
        """What `trainers.choose` needs to know of this runtime: it hands its worker several
        clients at once, on this process's torch threads (`base.stacking_plan`)."""
        return stacking_plan(config, torch.get_num_threads())

    def send(self, job: Job) -> None:
        self.queue.append(job)

    def waiting(self) -> int:
        return len(self.done)  # the rest is not done before `receive` runs it

    def receive(self, timeout: float) -> Delivery | None:
        """Run the next queued job (or, stacking, all of them) to its end (the whole wait is
        the training)."""
        assert self.worker is not None, "start() first"
        if not self.done and self.queue:
            jobs = list(self.queue) if self.stacks else [self.queue[0]]
            for _ in jobs:
                self.queue.popleft()
            frames = [protocol.task_frame(job.task, job.payload, self.crc(job.payload))
                      for job in jobs]
            for job, frame, reply in zip(jobs, frames, self.worker.handle_many(frames)):
                result = protocol.read_update(reply, job.expect)
                result.bytes_down = len(frame)
                self.done.append(Delivery(job, result))
        return self.done.popleft() if self.done else None

    def cancel(self, job: Job) -> Stopped | None:
        """A due job still queued (a running one cannot be stopped here) never starts; one
        whose result waits here is not stopped."""
        if any(got.job is job for got in self.done):
            return None
        if job in self.queue:
            self.queue.remove(job)
        return Stopped("queued behind other clients in this process", started=False)

    def close(self) -> None:
        self.queue.clear()
        self.done.clear()
        self.worker = None
