"""In-process runtime: clients run one after another in the server's own process.

Tasks still go through the wire module (task frame out, update frame back), so bytes are counted
exactly as the other runtimes count them. A task cannot be interrupted here (it runs on the
caller's thread), so the deadline rule is applied when it ends: a result that comes after its
task's deadline (`round_timeout` after submit) is dropped as late, as every runtime drops one.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator

from tinyfed import protocol, wire
from tinyfed.experiment import Experiment
from tinyfed.protocol import ClientResult, ClientTask, ClientWorker, Expectation


class InProcessRuntime:
    def __init__(self, config=None) -> None:
        self.worker: ClientWorker | None = None
        self.timeout = config.round_timeout if config is not None else math.inf
        self.queue: deque[tuple[ClientTask, bytes, Expectation, float]] = deque()
        self.crc = wire.CrcMemo()

    def start(self, experiment: Experiment) -> None:
        ds = experiment.dataset
        self.worker = ClientWorker(experiment.config.model, ds.input_shape, ds.num_classes,
                                   experiment.shard)

    def submit(self, task: ClientTask, weights_payload: bytes, expect: Expectation) -> None:
        frame = protocol.task_frame(task, weights_payload, self.crc(weights_payload))
        self.queue.append((task, frame, expect, time.monotonic() + self.timeout))

    def pending(self) -> int:
        return len(self.queue)

    def results(self, timeout: float) -> Iterator[ClientResult]:
        assert self.worker is not None, "start() first"
        deadline = time.monotonic() + timeout
        while self.queue:
            task, frame, expect, due = self.queue.popleft()
            if time.monotonic() > min(deadline, due):
                yield ClientResult.failure(task, "deadline: not started within "
                                           f"round_timeout={self.timeout:g} s")
                continue
            reply = self.worker.handle(frame)
            if time.monotonic() > due:
                yield ClientResult.failure(task, "late: the result came after the deadline "
                                           f"(round_timeout={self.timeout:g} s); dropped",
                                           bytes_down=len(frame), bytes_up=len(reply))
                continue
            result = protocol.read_update(reply, expect)
            result.bytes_down = len(frame)
            yield result

    def close(self) -> None:
        self.queue.clear()
        self.worker = None
