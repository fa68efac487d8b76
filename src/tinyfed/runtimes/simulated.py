"""The simulator: a transport over any transport, with a simulated device clock.

Real training still happens on the inner transport (in-process, processes, HTTP, Ray); only time
and energy are simulated, per client, from its device profile (`tinyfed.fleet`) and the real
sizes of its frames and shard. A task sent at simulated time t arrives at t + download + compute
+ upload. Results are delivered in simulated arrival order: a result is handed over once no
task still training on the inner transport could arrive before it (each has a lower bound, its
download and compute time), so asynchronous merging follows the simulated clock and is
bit-identical run to run and across runtimes.

Sync rounds may have a deadline in simulated seconds (`sim_deadline`) and over-select
(`over_select`, Bonawitz et al. 2019): the server asks ⌈over_select·C·K⌉ clients, the round
keeps the first C·K to arrive and closes then; later ones fail as over-selected, ones past the
deadline as missed. A device outside its daily window fails at once as unavailable (nothing is
sent); one that drops out (seeded per task) fails after its download; one whose memory cannot
hold the training fails at once. Records gain the simulated seconds and hours, the energy spent
(radio and compute) and these counts; the clock is saved in checkpoints.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from tinyfed import protocol
from tinyfed.errors import ConfigError
from tinyfed.experiment import Experiment
from tinyfed.fleet.clock import TaskCost, Work, task_cost
from tinyfed.fleet.profiles import Profile, build_fleet
from tinyfed.protocol import ClientResult
from tinyfed.runtimes.base import Delivery, Job, Stopped, Transport
from tinyfed.runtimes.dispatch import radio

COUNTS = ("unavailable", "dropped_out", "out_of_memory", "missed_deadline", "over_selected")


@dataclass
class Training:
    """A task on the inner transport: when it started and the earliest it could arrive."""

    job: Job
    start: float
    earliest: float


@dataclass(order=True)
class Event:
    """A result with its simulated arrival time: the delivery order, ties broken by client id
    (never by which real worker happened to finish first)."""

    arrival: float
    client: int
    seq: int
    start: float = 0.0
    delivery: Delivery | None = None
    cost: TaskCost | None = None


class SimulatedTransport:
    def __init__(self, inner: Transport, config) -> None:
        self.inner, self.config = inner, config
        self.fleet: list[Profile] = build_fleet(config.fleet, config.clients, config.seed)
        self.keep = config.clients_per_round if config.mode == "sync" else math.inf
        self.deadline = config.sim_deadline or math.inf
        self.now = 0.0  # simulated seconds since the run began
        self.training: dict[int, Training] = {}
        self.events: list[Event] = []
        self.seq = itertools.count()
        self.closed: dict[int, float] = {}  # sync round → when it had its C·K updates
        self.kept: Counter[int] = Counter()
        self.window = self.fresh_window()
        self.energy = {"radio_j": 0.0, "compute_j": 0.0}
        self.work: Work | None = None
        self.experiment: Experiment | None = None

    # ---- Transport protocol -----------------------------------------------------------
    def start(self, experiment: Experiment) -> None:
        cfg = self.config
        self.work = Work.of(experiment.new_model(), experiment.dataset.input_shape,
                            cfg.batch_size, cfg.optimizer, cfg.momentum)
        self.experiment = experiment
        self.check_deadline()
        self.inner.start(experiment)

    def send(self, job: Job) -> None:
        cid, t0 = job.task.client_id, self.now
        p = self.fleet[cid]
        if not p.available(t0 + self.config.sim_start_hour * 3600):
            self.fail(job, t0, "unavailable", f"unavailable: {p.name} takes part {p.window} h "
                      f"only (simulated {clock_text(t0 + self.config.sim_start_hour * 3600)})")
        elif self.work.ram_bytes > p.memory_mb * 1e6:
            self.fail(job, t0, "out_of_memory", f"out of memory: training needs "
                      f"{self.work.ram_bytes / 1e6:.2f} MB, {p.name} has {p.memory_mb:g} MB")
        elif p.dropout and random.Random(job.task.seed ^ 0x5EED).random() < p.dropout:
            cost = task_cost(p, radio(self.sent_bytes(job), job), 0, 0.0)
            # bytes as a transport reports them: the dispatcher takes the memory section off
            self.fail(job, t0 + cost.download_s, "dropped_out", f"dropped out after its "
                      f"download ({p.name}, drop-out probability {p.dropout:g})", cost,
                      self.sent_bytes(job))
        else:
            lower = task_cost(p, radio(self.sent_bytes(job), job), 0, self.gflop(job, None))
            self.training[job.id] = Training(job, t0, t0 + lower.seconds)
            self.inner.send(job)

    def receive(self, timeout: float) -> Delivery | None:
        end = time.monotonic() + timeout
        while True:
            event = self.due()
            if event is not None:
                return self.deliver(heapq.heappop(self.events))
            if not self.training:
                return None
            got = self.inner.receive(max(0.0, end - time.monotonic()))
            if got is None:
                return None
            self.arrived(got)

    def waiting(self) -> int:
        return 1 if self.due() is not None else 0

    def cancel(self, job: Job) -> Stopped | None:
        if job.id in self.training:
            del self.training[job.id]
            return self.inner.cancel(job)
        return None  # its (simulated) result is waiting to be delivered

    def close(self) -> None:
        self.inner.close()

    # ---- the clock ----------------------------------------------------------------------
    def gflop(self, job: Job, result: ClientResult | None) -> float:
        examples = result.num_examples if result is not None and result.ok else \
            self.experiment.shard_size(job.task.client_id)
        return self.work.gflop_per_example * examples * job.task.settings.epochs

    def sent_bytes(self, job: Job) -> int:
        """The task frame's size, as a transport counts what it sent."""
        return len(protocol.task_frame(job.task, b"")) + len(job.payload)

    def arrived(self, got: Delivery) -> None:
        run = self.training.pop(got.job.id, None)
        if run is None:
            return  # cancelled meanwhile: the dispatcher has failed it
        r = got.result
        cost = task_cost(self.fleet[r.client_id], radio(r.bytes_down, got.job), r.bytes_up,
                         self.gflop(got.job, r))
        heapq.heappush(self.events, Event(run.start + cost.seconds, r.client_id, next(self.seq),
                                          run.start, got, cost))

    def fail(self, job: Job, at: float, count: str, reason: str, cost: TaskCost | None = None,
             bytes_down: int = 0) -> None:
        result = ClientResult.failure(job.task, reason, bytes_down=bytes_down)
        self.window[count] += 1
        heapq.heappush(self.events, Event(at, job.task.client_id, next(self.seq), at,
                                          Delivery(job, result), cost))

    def due(self) -> Event | None:
        """The earliest known event, if nothing still training could arrive before it."""
        if not self.events:
            return None
        first = self.events[0]
        bound = min((t.earliest for t in self.training.values()), default=math.inf)
        return first if first.arrival < bound else None

    def deliver(self, event: Event) -> Delivery:
        got = event.delivery
        result, at = got.result, event.arrival
        rnd = result.round
        if result.ok and self.kept[rnd] >= self.keep:
            at = self.closed[rnd]
            got.result = self.refuse(result, "over_selected", f"over-selected: round {rnd} had "
                                     f"its {self.keep} updates at simulated {at:.1f} s")
        elif result.ok and at - event.start > self.deadline:
            at = event.start + self.deadline
            got.result = self.refuse(result, "missed_deadline", f"missed the simulated deadline:"
                                     f" {event.arrival - event.start:.1f} s > sim_deadline="
                                     f"{self.deadline:g} s ({self.fleet[result.client_id].name})")
        elif result.ok:
            self.kept[rnd] += 1
            if self.kept[rnd] == self.keep:
                self.closed[rnd] = at
        if event.cost is not None:
            self.energy["radio_j"] += event.cost.radio_j
            self.energy["compute_j"] += event.cost.compute_j
            self.window["radio_j"] += event.cost.radio_j
            self.window["compute_j"] += event.cost.compute_j
        self.now = max(self.now, at)
        return got

    def refuse(self, result: ClientResult, count: str, reason: str) -> ClientResult:
        self.window[count] += 1
        return ClientResult(result.client_id, result.round, False, reason=reason,
                            bytes_down=result.bytes_down, bytes_up=result.bytes_up,
                            version=result.version)

    def check_deadline(self) -> None:
        """A deadline that no device could meet even with nothing to send is a config error."""
        if math.isinf(self.deadline):
            return
        examples = min(self.experiment.shard_size(c) for c in self.experiment.client_ids)
        gflop = self.work.gflop_per_example * examples * self.config.epochs
        best = min(self.fleet, key=lambda p: task_cost(p, 0, 0, gflop).seconds)
        need = task_cost(best, 0, 0, gflop).seconds
        if need > self.deadline:
            raise ConfigError(f"config field 'sim_deadline' = {self.deadline:g}: no device can "
                              f"meet it; the fastest ({best.name}) needs {need:.1f} s for its "
                              f"smallest task before sending a byte")

    # ---- records and checkpoints ---------------------------------------------------------
    def fresh_window(self) -> Counter:
        window: Counter = Counter({k: 0 for k in COUNTS})
        window["since"] = self.now if hasattr(self, "now") else 0.0
        return window

    def report(self) -> dict[str, Any]:
        """Record fields since the last record: simulated time, energy, what failed how."""
        w = self.window
        out = {"sim_seconds": self.now - w["since"], "sim_hours": self.now / 3600,
               "energy_j": w["radio_j"] + w["compute_j"], "radio_j": w["radio_j"],
               "compute_j": w["compute_j"], "cum_energy_j": sum(self.energy.values()),
               **{k: w[k] for k in COUNTS}}
        self.window = self.fresh_window()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"now": self.now, **self.energy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.now = float(state.get("now", 0.0))
        self.energy = {k: float(state.get(k, 0.0)) for k in self.energy}
        self.window = self.fresh_window()

    def __getattr__(self, name: str) -> Any:  # url, pids(), hub of the inner transport
        if name == "ready":  # results leave in simulated order only, never in a batch
            raise AttributeError(name)
        return getattr(self.__dict__["inner"], name)


def clock_text(seconds: float) -> str:
    day, rest = divmod(seconds, 86_400)
    return f"day {int(day) + 1} {int(rest // 3600):02d}:{int(rest % 3600 // 60):02d}"
