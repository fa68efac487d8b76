"""In-process runtime: clients run one after another in the server's own process.

Tasks still go through the wire module (task frame out, update frame back), so bytes are counted
exactly as the other runtimes count them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator

from tinyfed import protocol, wire
from tinyfed.experiment import Experiment
from tinyfed.protocol import ClientResult, ClientTask, ClientWorker, Expectation


class InProcessRuntime:
    def __init__(self, config=None) -> None:
        self.worker: ClientWorker | None = None
        self.queue: deque[tuple[ClientTask, bytes, Expectation]] = deque()
        self.crc = wire.CrcMemo()

    def start(self, experiment: Experiment) -> None:
        ds = experiment.dataset
        self.worker = ClientWorker(experiment.config.model, ds.input_shape, ds.num_classes,
                                   experiment.shard)

    def submit(self, task: ClientTask, weights_payload: bytes, expect: Expectation) -> None:
        frame = protocol.task_frame(task, weights_payload, self.crc(weights_payload))
        self.queue.append((task, frame, expect))

    def pending(self) -> int:
        return len(self.queue)

    def results(self, timeout: float) -> Iterator[ClientResult]:
        assert self.worker is not None, "start() first"
        deadline = time.monotonic() + timeout
        while self.queue:
            task, frame, expect = self.queue.popleft()
            if time.monotonic() > deadline:
                yield ClientResult.failure(task, "deadline passed before the task started")
                continue
            reply = self.worker.handle(frame)
            result = protocol.read_update(reply, expect)
            result.bytes_down = len(frame)
            yield result

    def close(self) -> None:
        self.queue.clear()
        self.worker = None
