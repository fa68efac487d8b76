"""Asynchronous training: keep M clients busy; merge each update the moment it arrives.

One loop over any runtime (it only submits tasks and reads results). Every accepted update is
folded into the global model by an async rule (seed-merge, FedAsync, FedBuff) and published as a
``kind: "update"`` record; every ``clients_per_round`` merged updates make one "round" — an
evaluation, a ``kind: "round"`` record (what the console, plot and dashboard show) and, every
``checkpoint_every`` of those, a checkpoint. The run lasts ``rounds × clients_per_round`` merged
updates. Evaluation, records, checkpoints and resume are the run core's (`core.RunCore`), shared
with synchronous rounds; this module is only the policy of what leaves when and how it merges.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinyfed.broadcast import round_seed
from tinyfed.client import task_seed
from tinyfed.compress import downlink
from tinyfed.core import RoundFailed, RunCore, RunState, Tally
from tinyfed.experiment import Experiment
from tinyfed.metrics import EventBus, Record
from tinyfed.protocol import ClientResult, ClientTask
from tinyfed.runtimes.base import Runtime
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
class Window(Tally):
    """What happened since the last round record (a round's tally plus staleness)."""

    staleness_sum: int = 0


MAX_UPDATE_RECORDS = 10_000  # per-update records kept in memory (all are in metrics.jsonl)


class AsyncServer:
    """Runs asynchronous merging over any runtime."""

    def __init__(self, experiment: Experiment, runtime: Runtime, rule: AsyncRule,
                 bus: EventBus, checkpoint_dir: Path | None = None):
        self.core = RunCore(experiment, bus, checkpoint_dir)
        self.core.watch(runtime)
        self.exp, self.cfg = experiment, experiment.config
        self.runtime = runtime
        self.rule = rule
        self.update_records: deque[Record] = deque(maxlen=MAX_UPDATE_RECORDS)
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
        self.cooling: set[int] = set()  # clients whose last task failed, until a merge
        self.window = Window()
        self.consecutive_failures = 0
        self.peak_versions = 0
        self._perm: tuple[int, list[int]] | None = None
        self.publish(0, self.state.weights)

    @property
    def state(self) -> RunState:
        return self.core.state

    @property
    def stop_reason(self) -> str:
        return self.core.stop_reason

    # -- versions -----------------------------------------------------------------------------

    def publish(self, version: int, weights: Tensors) -> None:
        self.versions[version] = Version(weights)

    def encoded(self, version: int) -> Version:
        """The version with its payload, encoded on first use."""
        ver = self.versions[version]
        if ver.payload is None:
            ver.payload, ver.seen = downlink(ver.exact, self.cfg.down_codec,
                                              round_seed(self.cfg.seed, version))
        return ver

    def prune(self) -> None:
        """Keep only the current model and those in-flight tasks started from (bounded by M+1).
        (`handle` drops the one or two models a result can free without this O(M) pass.)"""
        keep = {self.version} | self.uses.keys()
        for v in [v for v in self.versions if v not in keep]:
            del self.versions[v]
        self.peak_versions = max(self.peak_versions, len(self.versions))

    # -- dispatch -----------------------------------------------------------------------------

    def next_client(self) -> int | None:
        """Walk seeded permutations of all clients (one per pass), skipping busy ones and those
        cooling off after a failure; None when every client is one or the other."""
        ids = self.exp.client_ids
        if len(self.inflight) + len(self.cooling) >= len(ids):
            return None
        while True:
            epoch, pos = divmod(self.cursor, len(ids))
            if self._perm is None or self._perm[0] != epoch:
                order = np.random.default_rng([self.cfg.seed, 0xA5, epoch]).permutation(len(ids))
                self._perm = (epoch, [ids[i] for i in order])
            perm, busy = self._perm[1], self.inflight
            for i in range(pos, len(perm)):  # with M close to K most are busy: scan, don't loop
                if perm[i] not in busy and perm[i] not in self.cooling:
                    self.cursor += i - pos + 1
                    return perm[i]
            self.cursor += len(perm) - pos

    def dispatch(self, client_id: int) -> None:
        self.dispatched += 1
        n = self.dispatched
        attack, params = self.core.hostile(client_id)
        task = ClientTask(client_id, n, task_seed(self.cfg.seed, n, client_id),
                          self.core.settings(self.state.round + 1), self.cfg.codec,
                          version=self.version, down_codec=self.cfg.down_codec,
                          params=params, attack=attack)
        self.submit(task)

    def submit(self, task: ClientTask) -> None:
        ver = self.encoded(task.version)
        self.core.submit(self.runtime, task, self.core.expectation(task, ver.seen),
                         payload=ver.payload)
        self.inflight[task.client_id] = InFlight(task, time.monotonic() + self.cfg.round_timeout)
        self.uses[task.version] += 1

    def fill(self) -> None:
        if self.resubmit:  # a resumed run's in-flight tasks, as they were
            for task in self.resubmit:
                self.submit(task)
            self.resubmit = []
            self.prune()
        if not self.inflight:
            self.cooling.clear()  # nothing else will arrive to end their cooling
        while len(self.inflight) < self.concurrency:
            client = self.next_client()
            if client is None:
                break
            self.dispatch(client)

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
        w.count_bytes(result)
        if result.ok:
            ver = self.encoded(task.version)
            result = self.core.admit(result, ver.seen, ver.exact)
        if not result.ok:
            self.fail(task, result.reason)
        else:
            self.merge(task, result)
        if self.updates % self.cfg.clients_per_round:  # (a finished round has its record)
            self.core.progress(self.state.round + 1, self.window, self.cfg.clients_per_round)
        for v in {task.version, version}:  # the models that may have lost their last user
            if v != self.version and v not in self.uses:
                self.versions.pop(v, None)
        self.peak_versions = max(self.peak_versions, len(self.versions))

    def fail(self, task: ClientTask, reason: str) -> None:
        """A failed task: counted, and its client waits for another result before it is asked
        again (a client that fails at once would otherwise take every free slot, in a loop)."""
        self.window.failure(task.client_id, reason, task=task.round)
        self.cooling.add(task.client_id)
        self.consecutive_failures += 1
        limit = (self.cfg.round_retries + 1) * self.concurrency
        if self.consecutive_failures >= limit:
            raise RoundFailed(
                f"async: {self.consecutive_failures} client tasks failed in a row (limit "
                f"(round_retries+1)·concurrency = {limit}); rounds 1-{self.state.round} are saved"
            )

    def merge(self, task: ClientTask, result: ClientResult) -> None:
        ver = self.versions[task.version]
        staleness = self.version - task.version
        new = self.rule.merge(self.state.weights, result.weights, result.num_examples,
                              staleness, ver.exact)
        if new is not None:
            self.version += 1
            self.state.weights = new
            self.publish(self.version, new)
        self.updates += 1
        self.consecutive_failures = 0
        self.cooling.clear()
        w = self.window
        w.success(result)
        w.staleness_sum += staleness
        self.core.publish(self.update_record(task, result, staleness))
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
            "train_loss": result.metrics.get("train_loss"),  # finite: check_metrics
            "version": self.version,
            "bytes_down": result.bytes_down,
            "bytes_up": result.bytes_up,
            "cum_bytes_down": st.cum_bytes_down + w.bytes_down,
            "cum_bytes_up": st.cum_bytes_up + w.bytes_up,
            "time": time.time(),
            "elapsed_seconds": st.elapsed + time.monotonic() - w.start,
        }
        self.update_records.append(record)
        return record

    def end_round(self) -> None:
        w = self.window
        round_num = self.updates // self.cfg.clients_per_round
        record = self.core.round_record(round_num, w, w.ok + len(w.failures))
        record.update(mode="async", updates=self.updates, version=self.version,
                      mean_staleness=w.staleness_sum / w.ok if w.ok else None)
        self.window = Window()
        self.core.finish_round(round_num, record, *self.policy_state())

    # -- the loop -----------------------------------------------------------------------------

    def run(self):
        """Merged updates from the state's count to rounds × clients_per_round, or to target."""
        self.window.start = time.monotonic()  # time spent starting the runtime is no round's
        reached = self.core.target_reached()
        while self.updates < self.total and not reached:
            self.fill()
            for result in self.next_result():
                if self.updates >= self.total or reached:
                    break  # the rest of a batch stays unmerged, like tasks still in flight
                rounds = self.state.round
                self.handle(result)
                reached = reached or (self.state.round > rounds and self.core.target_reached())
        self.core.stop_reason = "target accuracy reached" if reached else "all updates merged"
        return self.state

    # -- checkpoint and resume ----------------------------------------------------------------

    def policy_state(self) -> tuple[dict[str, Any], Tensors]:
        """The loop's counters, every in-flight task with the model it started from, and the
        rule's tensors (FedBuff's buffer), so a resumed in-process run redoes exactly what the
        uninterrupted run would have."""
        tensors = {f"rule.{k}": v for k, v in self.rule.tensor_state().items()}
        for v in sorted({f.task.version for f in self.inflight.values()} - {self.version}):
            tensors.update({f"base.{v}.{k}": t for k, t in self.versions[v].exact.items()})
        saved = {"version": self.version, "updates": self.updates,
                 "dispatched": self.dispatched, "cursor": self.cursor,
                 "cooling": sorted(self.cooling),
                 "inflight": [f.task.header() for f in self.inflight.values()]}
        return {"strategy": self.rule.state_dict(), EXTRA: saved}, tensors

    def checkpoint(self) -> None:
        self.core.checkpoint(*self.policy_state())

    def resume(self, weights: Tensors, data: dict[str, Any], records: list[Record]) -> None:
        state, tensors = self.core.resume(weights, data, records)
        self.rule.load_state_dict(state.strategy_state)
        self.update_records.extend(r for r in records if r.get("kind") == "update")
        saved = state.extra.get(EXTRA)
        if not saved:
            return
        self.version = int(saved["version"])
        self.updates = int(saved["updates"])
        self.dispatched = int(saved["dispatched"])
        self.cursor = int(saved["cursor"])
        self.cooling = {int(c) for c in saved.get("cooling", [])}
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
