"""Asynchronous training: keep M clients busy; merge each update the moment it arrives.

One loop over any runtime (it only submits tasks and reads results). Every accepted update is
folded into the global model by an async rule (seed-merge, FedAsync, FedBuff) and published as a
``kind: "update"`` record; every ``clients_per_round`` merged updates make one "round" — an
evaluation, a ``kind: "round"`` record (what the console, plot and dashboard show) and, every
``checkpoint_every`` of those, a checkpoint. The run lasts ``rounds × clients_per_round`` merged
updates. Evaluation, records and checkpoints are `Server`'s own.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load_file

from tinyfed.checkpoint import save_checkpoint, save_weights
from tinyfed.client import task_seed
from tinyfed.compress import downlink, rebase
from tinyfed.experiment import Experiment
from tinyfed.metrics import EventBus, Record
from tinyfed.protocol import ClientResult, ClientTask, Expectation
from tinyfed.runtimes.base import Runtime
from tinyfed.server import RoundFailed, Server
from tinyfed.strategies.async_merge import AsyncRule
from tinyfed.wire import Tensors

EXTRA = "async"  # key of the loop's state in RunState.extra


@dataclass
class Version:
    """One global model: exact weights and, once a task carries it, its payload and what
    clients decode from it (a model merged over before any task left with it is never encoded)."""

    exact: Tensors
    seen: Tensors | None = None
    payload: bytes | None = None


@dataclass
class InFlight:
    task: ClientTask
    deadline: float


@dataclass
class Window:
    """What happened since the last round record."""

    start: float = field(default_factory=time.monotonic)
    ok: int = 0
    examples: int = 0
    loss_sum: float = 0.0
    staleness_sum: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)


class AsyncServer(Server):
    """Runs asynchronous merging over any runtime (replaces `Server.run`, keeps the rest)."""

    def __init__(self, experiment: Experiment, runtime: Runtime, rule: AsyncRule,
                 bus: EventBus, checkpoint_dir: Path | None = None):
        super().__init__(experiment, runtime, rule, bus, checkpoint_dir)  # type: ignore[arg-type]
        self.rule = rule
        cfg = self.cfg
        self.concurrency = min(cfg.concurrency or cfg.clients_per_round, cfg.clients)
        self.total = cfg.rounds * cfg.clients_per_round
        self.version = 0
        self.updates = 0
        self.dispatched = 0
        self.cursor = 0
        self.inflight: dict[int, InFlight] = {}  # client id → its task; insertion = dispatch order
        self.uses: Counter[int] = Counter()  # model version → in-flight tasks started from it
        self.versions: dict[int, Version] = {}
        self.resubmit: list[ClientTask] = []
        self.window = Window()
        self.consecutive_failures = 0
        self.peak_versions = 0
        self._perm: tuple[int, list[int]] | None = None
        self.publish(0, self.state.weights)

    # -- versions -----------------------------------------------------------------------------

    def publish(self, version: int, weights: Tensors) -> None:
        self.versions[version] = Version(weights)

    def encoded(self, version: int) -> Version:
        """The version with its payload, encoded on first use."""
        ver = self.versions[version]
        if ver.payload is None:
            ver.payload, ver.seen = downlink(ver.exact, self.cfg.down_codec)
        return ver

    def prune(self) -> None:
        """Keep only the current model and those in-flight tasks started from (bounded by M+1).
        (`handle` drops the one or two models a result can free without this O(M) pass.)"""
        keep = {self.version} | self.uses.keys()
        for v in [v for v in self.versions if v not in keep]:
            del self.versions[v]
        self.peak_versions = max(self.peak_versions, len(self.versions))

    # -- dispatch -----------------------------------------------------------------------------

    def next_client(self) -> int:
        """Walk seeded permutations of all clients (one per pass), skipping busy ones."""
        ids = self.exp.client_ids
        while True:
            epoch, pos = divmod(self.cursor, len(ids))
            if self._perm is None or self._perm[0] != epoch:
                order = np.random.default_rng([self.cfg.seed, 0xA5, epoch]).permutation(len(ids))
                self._perm = (epoch, [ids[i] for i in order])
            perm, busy = self._perm[1], self.inflight
            for i in range(pos, len(perm)):  # with M close to K most are busy: scan, don't loop
                if perm[i] not in busy:
                    self.cursor += i - pos + 1
                    return perm[i]
            self.cursor += len(perm) - pos

    def dispatch(self, client_id: int) -> None:
        self.dispatched += 1
        n = self.dispatched
        task = ClientTask(client_id, n, task_seed(self.cfg.seed, n, client_id),
                          self.settings(self.state.round + 1), self.cfg.codec,
                          version=self.version, down_codec=self.cfg.down_codec)
        self.submit(task)

    def submit(self, task: ClientTask) -> None:
        ver = self.encoded(task.version)
        expect = Expectation(task, ver.seen, self.exp.spec, self.exp.shard_size(task.client_id),
                             int(self.cfg.max_frame_mb * (1 << 20)))
        self.runtime.submit(task, ver.payload, expect)
        self.inflight[task.client_id] = InFlight(task, time.monotonic() + self.cfg.round_timeout)
        self.uses[task.version] += 1

    def fill(self) -> None:
        if self.resubmit:  # a resumed run's in-flight tasks, as they were
            for task in self.resubmit:
                self.submit(task)
            self.resubmit = []
            self.prune()
        while len(self.inflight) < self.concurrency:
            self.dispatch(self.next_client())

    # -- results ------------------------------------------------------------------------------

    def next_result(self) -> list[ClientResult]:
        """The next result, waiting at most until the oldest task's deadline (the first in
        `inflight`: tasks enter it in dispatch order, each with the same timeout)."""
        oldest = next(iter(self.inflight.values()))
        timeout = max(0.0, oldest.deadline - time.monotonic())
        results = self.runtime.results(timeout)
        ready = getattr(self.runtime, "ready", None)
        try:
            first = next(results, None)
            batch = [] if first is None else [first]
            # Results already waiting are taken too (never waited for): merged one by one as
            # ever, but the tasks that replace them leave once, with the newest model, which is
            # encoded once.
            while batch and ready is not None and len(batch) < self.concurrency and ready() > 0:
                batch.append(next(results))
        finally:
            results.close()
        if batch:
            return batch
        # The runtime holds nothing we wait for: fail them all rather than wait forever.
        return [ClientResult.failure(f.task, "runtime lost the task") for f in
                self.inflight.values()]

    def handle(self, result: ClientResult) -> None:
        flight = self.inflight.get(result.client_id)
        if flight is None or flight.task.round != result.round:
            return  # not a task we wait for (a runtime's stray); the model is untouched
        del self.inflight[result.client_id]
        task, w = flight.task, self.window
        self.uses[task.version] -= 1
        if not self.uses[task.version]:
            del self.uses[task.version]
        version = self.version
        w.bytes_down += result.bytes_down
        w.bytes_up += result.bytes_up
        if not result.ok:
            self.fail(task, result.reason)
        else:
            self.merge(task, result)
        for v in {task.version, version}:  # the models that may have lost their last user
            if v != self.version and v not in self.uses:
                self.versions.pop(v, None)
        self.peak_versions = max(self.peak_versions, len(self.versions))

    def fail(self, task: ClientTask, reason: str) -> None:
        self.window.failures.append({"client_id": task.client_id, "task": task.round,
                                     "reason": reason})
        self.consecutive_failures += 1
        limit = (self.cfg.round_retries + 1) * self.concurrency
        if self.consecutive_failures >= limit:
            raise RoundFailed(
                f"async: {self.consecutive_failures} client tasks failed in a row (limit "
                f"(round_retries+1)·concurrency = {limit}); rounds 1-{self.state.round} are saved"
            )

    def merge(self, task: ClientTask, result: ClientResult) -> None:
        ver = self.encoded(task.version)
        update = result.weights
        if ver.seen is not ver.exact:  # lossy downlink: move the update onto the exact model
            update = rebase(update, ver.seen, ver.exact)
        staleness = self.version - task.version
        new = self.rule.merge(self.state.weights, update, result.num_examples, staleness,
                              ver.exact)
        if new is not None:
            self.version += 1
            self.state.weights = new
            self.publish(self.version, new)
        self.updates += 1
        self.consecutive_failures = 0
        w = self.window
        w.ok += 1
        w.examples += result.num_examples
        w.loss_sum += result.metrics.get("train_loss", 0.0) * result.num_examples
        w.staleness_sum += staleness
        self.bus.publish(self.update_record(task, result, staleness))
        if self.updates % self.cfg.clients_per_round == 0:
            self.end_round()

    def update_record(self, task: ClientTask, result: ClientResult, staleness: int) -> Record:
        st, w = self.state, self.window
        record = {
            "kind": "update",
            "update": self.updates,
            "round": st.round + 1,
            "client_id": task.client_id,
            "task": task.round,  # the dispatch number: unique per task, so a merge is traceable
            "staleness": staleness,
            "num_examples": result.num_examples,
            "train_loss": result.metrics.get("train_loss"),
            "version": self.version,
            "bytes_down": result.bytes_down,
            "bytes_up": result.bytes_up,
            "cum_bytes_down": st.cum_bytes_down + w.bytes_down,
            "cum_bytes_up": st.cum_bytes_up + w.bytes_up,
            "time": time.time(),
            "elapsed_seconds": st.elapsed + time.monotonic() - w.start,
        }
        st.records.append(record)
        return record

    def end_round(self) -> None:
        w = self.window
        round_num = self.updates // self.cfg.clients_per_round
        tried = [0] * (w.ok + len(w.failures))
        record = self.make_record(round_num, tried, w.ok, w.failures, w.examples, w.loss_sum,
                                  w.bytes_down, w.bytes_up, time.monotonic() - w.start)
        record.update(mode="async", updates=self.updates, version=self.version,
                      mean_staleness=w.staleness_sum / w.ok if w.ok else None)
        self.window = Window()
        self.finish_round(round_num, record)

    # -- the loop -----------------------------------------------------------------------------

    def run(self):
        """Merged updates from the state's count to rounds × clients_per_round, or to target."""
        self.window.start = time.monotonic()  # time spent starting the runtime is no round's
        reached = self.target_reached()
        while self.updates < self.total and not reached:
            self.fill()
            for result in self.next_result():
                if self.updates >= self.total or reached:
                    break  # the rest of a batch stays unmerged, like tasks still in flight
                rounds = self.state.round
                self.handle(result)
                reached = reached or (self.state.round > rounds and self.target_reached())
        self.stop_reason = "target accuracy reached" if reached else "all updates merged"
        return self.state

    # -- checkpoint and resume ----------------------------------------------------------------

    def checkpoint(self) -> None:
        """Weights and records as in sync mode, plus the loop's counters, every in-flight task
        with the model it started from, and the rule's tensors (FedBuff's buffer), so a resumed
        in-process run redoes exactly what the uninterrupted run would have."""
        assert self.checkpoint_dir is not None
        tensors = {f"rule.{k}": v for k, v in self.rule.tensor_state().items()}
        for v in sorted({f.task.version for f in self.inflight.values()} - {self.version}):
            tensors.update({f"base.{v}.{k}": t for k, t in self.versions[v].exact.items()})
        name = f"async-{self.state.round:06d}.safetensors"
        if tensors:
            save_weights(self.checkpoint_dir / name, tensors)
        self.state.strategy_state = self.rule.state_dict()
        self.state.extra[EXTRA] = {
            "version": self.version,
            "updates": self.updates,
            "dispatched": self.dispatched,
            "cursor": self.cursor,
            "inflight": [f.task.header() for f in self.inflight.values()],
            "tensors": name if tensors else None,
        }
        save_checkpoint(self.checkpoint_dir, self.state.round, self.state.weights,
                        self.state.to_json(), keep=self.cfg.keep_checkpoints)
        self.prune_files()

    def prune_files(self) -> None:
        rounds = {p.name.removeprefix("round-") for p in self.checkpoint_dir.glob("round-*")}
        for p in self.checkpoint_dir.glob("async-*.safetensors"):
            if p.name.removeprefix("async-") not in rounds:
                p.unlink(missing_ok=True)

    def resume_from(self, state) -> None:
        super().resume_from(state)
        saved = state.extra.get(EXTRA)
        if not saved:
            return
        self.version = int(saved["version"])
        self.updates = int(saved["updates"])
        self.dispatched = int(saved["dispatched"])
        self.cursor = int(saved["cursor"])
        tensors: Tensors = {}
        if saved.get("tensors"):
            tensors = load_file(str(self.checkpoint_dir / saved["tensors"]))
        self.rule.load_tensor_state({k.removeprefix("rule."): v for k, v in tensors.items()
                                     if k.startswith("rule.")})
        self.versions = {}
        self.publish(self.version, state.weights)
        bases: dict[int, Tensors] = {}
        for key, t in tensors.items():
            if key.startswith("base."):
                _, v, name = key.split(".", 2)
                bases.setdefault(int(v), {})[name] = t
        for v, weights in bases.items():
            self.publish(v, weights)
        if self.updates < self.total:
            self.resubmit = [ClientTask.from_header(h) for h in saved["inflight"]]
