"""In-process transport: clients run one after another in the server's own process.

Tasks still go through the wire module (task frame out, update frame back), so bytes are counted
exactly as the other transports count them. A task cannot be interrupted here (it runs on the
caller's thread inside `receive`): a queued job that is due is cancelled before it starts, and
a result that ends after its deadline is dropped as late by the dispatcher, as in every runtime.
"""

from __future__ import annotations

from collections import deque

from tinyfed import protocol, wire
from tinyfed.experiment import Experiment
from tinyfed.protocol import ClientWorker
from tinyfed.runtimes.base import Delivery, Job, Stopped


class InProcessRuntime:
    def __init__(self, config=None) -> None:
        self.config = config
        self.worker: ClientWorker | None = None
        self.queue: deque[Job] = deque()
        self.crc = wire.CrcMemo()

    def start(self, experiment: Experiment) -> None:
        ds = experiment.dataset
        self.worker = ClientWorker(experiment.config.model, ds.input_shape, ds.num_classes,
                                   experiment.shard, max_frame=experiment.config.max_frame,
                                   trainer=experiment.config.trainer)

    def send(self, job: Job) -> None:
        self.queue.append(job)

    def waiting(self) -> int:
        return 0  # nothing is done before `receive` runs it

    def receive(self, timeout: float) -> Delivery | None:
        """Run the next queued job to its end (the whole wait is the training)."""
        assert self.worker is not None, "start() first"
        if not self.queue:
            return None
        job = self.queue.popleft()
        frame = protocol.task_frame(job.task, job.payload, self.crc(job.payload))
        reply = self.worker.handle(frame)
        result = protocol.read_update(reply, job.expect)
        result.bytes_down = len(frame)
        return Delivery(job, result)

    def cancel(self, job: Job) -> Stopped:
        """A due job is still queued (a running one cannot be stopped here): it never starts."""
        if job in self.queue:
            self.queue.remove(job)
        return Stopped("queued behind other clients in this process", started=False)

    def close(self) -> None:
        self.queue.clear()
        self.worker = None
