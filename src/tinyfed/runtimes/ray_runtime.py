"""Ray runtime: clients run in a bounded pool of Ray actors, on one machine or a whole cluster.

Each actor rebuilds the data set and the partition from the run's config on its own node, so
the driver never ships data through the object store. The round's global weights go to the
object store once per round (one `ray.put` of the safetensors payload, shared by every task of
that round); each actor call builds the task frame from the task header and that payload and
returns the update frame's bytes, so bytes are counted exactly as in the other runtimes.
Arguments and results crossing Ray are only `str` (JSON) and `bytes` (frames, safetensors).

When the trainer choice stacks clients (`trainers.choose` on an actor's threads: the 2NN at a
small batch, unless `deterministic`; or `trainer = "vectorized"`), the jobs submitted together
go out as one call per actor (`ClientActor.run_many`: their headers, each distinct payload once)
and each actor trains its batch as stacked computations, as the process runtime's children do;
the reply is the update frames back to back, then a BATCH frame saying how they trained. An
actor lost mid-batch fails its task when it had one; with several, nobody is blamed and each is
sent again on its own (the bytes already sent still count), so a task that kills its actor
again then fails alone.

Ray is started (and shut down at `close`) only when no cluster address is given; attaching to a
cluster with `ray_address` only disconnects from it at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from tinyfed import protocol, wire
from tinyfed.errors import ConfigError, TinyfedError, WireError
from tinyfed.experiment import Experiment
from tinyfed.protocol import ClientResult, ClientTask
from tinyfed.runtimes.base import (
    STARTUP_TIMEOUT,
    Delivery,
    Job,
    Stopped,
    answer,
    batch_counts,
    batch_frame,
    deal,
    shares_deadline,
    stacking_plan,
    work,
)
from tinyfed.trainers import choose

CONNECT_TIMEOUT = 10.0  # seconds to wait for a cluster address to answer before giving up
INSTALL_HINT = 'pip install "tinyfed[ray]"'


class RayUnavailable(TinyfedError):
    """Ray is not installed, the cluster does not answer, or the pool cannot start on it."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailable(f"runtime 'ray' needs Ray, which is not installed: {INSTALL_HINT}") \
            from None
    return ray


class ClientActor:
    """One pool member: the client side of tasks, with data loaded on the actor's own node."""

    def __init__(self, config_json: str, threads: int):
        from tinyfed.config import build_config
        from tinyfed.worker import build_worker

        self.worker = build_worker(build_config(json.loads(config_json)), threads)

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def run(self, header_json: str, payload: bytes) -> bytes:
        """Task header + the round's weights in, update (or failure) frame out."""
        frame = wire.encode_frame(wire.Kind.TASK, json.loads(header_json), payload)
        return self.worker.handle(frame)

    def run_many(self, tasks_json: str, *payloads: bytes) -> bytes:
        """Several tasks ([header, index of its payload] pairs; each distinct payload passed
        once) trained together (`ClientWorker.handle_many`: stacked where that pays); their
        reply frames back to back, then a BATCH frame with how many trained stacked and alone."""
        before = dict(self.worker.tally)
        frames = [wire.encode_frame(wire.Kind.TASK, header, payloads[i])
                  for header, i in json.loads(tasks_json)]
        replies = self.worker.handle_many(frames)
        return b"".join(replies) + batch_frame(before, self.worker.tally)


@dataclass
class _Job:
    job: Job
    header: dict
    payload_ref: Any
    frame_len: int

    @property
    def task(self) -> ClientTask:
        return self.job.task


@dataclass
class _Call:
    """One actor call in flight: the jobs it carries, in order, and the actor's slot."""

    jobs: list[_Job]
    slot: int


def check_address(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Fail fast when HOST:PORT does not answer (ray.init would retry for minutes)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise RayUnavailable(f"ray_address {address!r} does not answer within {timeout:g} s "
                             f"({exc.strerror or exc}); start it with `ray start --head`") from None


def resolve_auto(ray) -> str | None:
    """The address 'auto' would attach to, or None if Ray cannot say (then ray.init decides)."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address("auto")
    except Exception:  # private API; a failure here only skips the reachability check
        return None


def short_error(exc: BaseException) -> str:
    """The last meaningful line of a Ray error (they carry whole remote tracebacks)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln[:300]
    return (lines[-1] if lines else type(exc).__name__)[:300]


class RayRuntime:
    def __init__(self, config) -> None:
        self.config = config
        self.ray = import_ray()
        self.owned = False  # True when this runtime started Ray (then close() shuts it down)
        self.attached = False  # True when it attached to a cluster (then close() disconnects)
        self.temp_dir: str | None = None
        self.actor_cls = None
        self.actors: list[Any] = []
        self.idle: deque[int] = deque()
        self.queue: deque[list[_Job]] = deque()  # calls waiting for an idle actor
        self.running: dict[Any, _Call] = {}
        self.arrived: deque[Delivery] = deque()  # a batch's results not yet handed out
        self.stacks = False  # send the jobs submitted together as one call per actor
        self.outbox: list[_Job] = []  # stacking: jobs submitted since the last receive()
        self.spent: Counter[int] = Counter()  # bytes sent for a job in a call since lost
        self.held: dict[int, Stopped] = {}  # jobs whose call was killed at a deadline they share
        self.tally: Counter[str] = Counter()  # tasks the actors trained stacked and alone
        self._payload: bytes | None = None
        self._payload_digest = b""
        self._payload_ref = None
        self.object_store_puts = 0  # one per distinct global-weights payload (tests, benchmarks)
        self.replaced = 0
        self.startup_seconds = 0.0

    # ---- connection and pool -------------------------------------------------------------

    def connect(self) -> None:
        ray, cfg = self.ray, self.config
        quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
        if ray.is_initialized():  # the caller's own Ray session: use it, never shut it down
            return
        address = cfg.ray_address
        if address:
            target = resolve_auto(ray) if address == "auto" else address
            if target:
                check_address(target)
            try:
                ray.init(address=address, **quiet)
            except Exception as exc:  # Ray raises many types here; all mean "cannot attach"
                hint = (" (the cluster wants token authentication: set RAY_AUTH_MODE=token and "
                        "its token in ~/.ray/auth_token or RAY_AUTH_TOKEN)"
                        if "uthentication" in str(exc) else "")
                raise RayUnavailable(f"ray_address {address!r}: cannot attach to a Ray cluster: "
                                     f"{short_error(exc)}{hint}") from None
            self.attached = True
            return
        cpus = (math.ceil(cfg.workers * cfg.cpus_per_client) if cfg.workers
                else os.cpu_count() or 1)
        self.temp_dir = tempfile.mkdtemp(prefix="tinyfed-ray-")
        ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                 _temp_dir=self.temp_dir, **quiet)
        self.owned = True

    def pool_size(self) -> int:
        cfg = self.config
        total = float(self.ray.cluster_resources().get("CPU", 0))
        if cfg.workers:
            need = cfg.workers * cfg.cpus_per_client
            if need > total + 1e-9:
                raise ConfigError(f"workers={cfg.workers} × cpus_per_client={cfg.cpus_per_client:g}"
                                  f" needs {need:g} CPUs; the Ray cluster has {total:g}")
            return cfg.workers
        free = float(self.ray.available_resources().get("CPU", 0))
        if free < cfg.cpus_per_client:
            raise ConfigError(f"cpus_per_client={cfg.cpus_per_client:g} but the Ray cluster has "
                              f"{free:g} free CPUs (of {total:g})")
        return max(1, min(int(free // cfg.cpus_per_client), cfg.clients))

    def actor_threads(self, config=None) -> int:
        cfg = config or self.config
        return 1 if cfg.deterministic else max(1, int(cfg.cpus_per_client))

    def spawn(self):
        cfg = self.config
        return self.actor_cls.options(num_cpus=cfg.cpus_per_client, max_restarts=0,
                                      max_concurrency=1).remote(cfg.model_dump_json(),
                                                                self.actor_threads())

    def stacking(self, config) -> dict:
        """What `trainers.choose` needs to know of this runtime: it hands each actor several
        clients at once, on the actor's threads (`base.stacking_plan`)."""
        return stacking_plan(config, self.actor_threads(config))

    def start(self, experiment: Experiment) -> None:
        t0 = time.monotonic()
        cfg = experiment.config
        self.config = cfg
        self.stacks = choose(experiment.new_model(), cfg.trainer, cfg.optimizer,
                             **self.stacking(cfg)).stacks
        self.connect()
        self.actor_cls = self.ray.remote(ClientActor)
        n = self.pool_size()
        self.actors = [self.spawn() for _ in range(n)]
        self.idle = deque(range(n))
        self.wait_ready(max(self.config.round_timeout, STARTUP_TIMEOUT))
        self.startup_seconds = time.monotonic() - t0

    def wait_ready(self, timeout: float) -> None:
        """Every actor has loaded its data, or a clear error (e.g. data missing on a node)."""
        ray = self.ray
        refs = {a.pid.remote(): i for i, a in enumerate(self.actors)}
        ready, not_ready = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as exc:
                raise RayUnavailable(f"a Ray actor failed to start: {short_error(exc)}") from None
        if not_ready:
            raise RayUnavailable(f"{len(not_ready)} of {len(refs)} Ray actors did not start within "
                                 f"{timeout:g} s")

    def actor_pids(self) -> list[int]:
        return self.ray.get([a.pid.remote() for a in self.actors])

    def actor_nodes(self) -> list[str]:
        return self.ray.get([a.node.remote() for a in self.actors])

    def replace(self, slot: int, kill: bool) -> None:
        if kill:
            try:
                self.ray.kill(self.actors[slot], no_restart=True)
            except Exception:  # already dead: nothing to kill
                pass
        self.actors[slot] = self.spawn()
        self.replaced += 1

    # ---- the Runtime protocol ------------------------------------------------------------

    def payload_ref(self, payload: bytes):
        """The object-store copy of this round's weights: put once, shared by every task."""
        if payload is not self._payload:
            digest = hashlib.blake2b(payload, digest_size=16).digest()
            if digest != self._payload_digest or self._payload_ref is None:
                self._payload_ref = self.ray.put(payload)
                self._payload_digest = digest
                self.object_store_puts += 1
            self._payload = payload
        return self._payload_ref

    def send(self, job: Job) -> None:
        assert self.actors, "start() first"
        header = job.task.header()
        # frame = prefix + header + payload: its length without building it on the driver
        frame_len = len(protocol.task_frame(job.task, b"")) + len(job.payload)
        item = _Job(job, header, self.payload_ref(job.payload), frame_len)
        if self.stacks:
            self.outbox.append(item)  # dealt out at the next receive()
        else:
            self.queue.append([item])
            self.dispatch()

    def deal(self) -> None:
        """Stacking: the jobs submitted since the last call, as one call per actor, dealt out
        by their work (`base.deal`)."""
        jobs, self.outbox = self.outbox, []
        self.queue.extend(deal(jobs, min(len(jobs), len(self.actors)), lambda j: work(j.job)))

    def dispatch(self) -> None:
        """Hand queued calls to idle actors, any actor to any client (a client's memory rides
        with its task)."""
        while self.queue and self.idle:
            jobs, slot = self.queue.popleft(), self.idle.popleft()
            actor = self.actors[slot]
            if self.stacks:
                refs: dict[int, int] = {}  # each distinct payload object goes once
                payloads = []
                for j in jobs:
                    if id(j.payload_ref) not in refs:
                        refs[id(j.payload_ref)] = len(payloads)
                        payloads.append(j.payload_ref)
                tasks = json.dumps([[j.header, refs[id(j.payload_ref)]] for j in jobs])
                ref = actor.run_many.remote(tasks, *payloads)
            else:
                ref = actor.run.remote(json.dumps(jobs[0].header), jobs[0].payload_ref)
            self.running[ref] = _Call(jobs, slot)

    def receive(self, timeout: float) -> Delivery | None:
        """The next finished result, dispatching queued jobs to idle actors first."""
        self.deal()
        self.dispatch()
        if not self.arrived and self.running:
            ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=timeout)
            if ready:
                self.collect(ready[0])
                self.dispatch()  # keep actors busy while the server aggregates
        return self.arrived.popleft() if self.arrived else None

    def waiting(self) -> int:
        if not self.running:
            return len(self.arrived)
        ready, _ = self.ray.wait(list(self.running), num_returns=len(self.running), timeout=0)
        return len(self.arrived) + sum(len(self.running[r].jobs) for r in ready)

    def collect(self, ref) -> None:
        """A finished call's results into `arrived` (or its jobs queued again, if its actor was
        lost with several of them)."""
        ray = self.ray
        call = self.running.pop(ref)
        try:
            reply = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self.lost(call, f"ray actor died: {short_error(exc)}", kill=False)
            return
        except ray.exceptions.RayError as exc:  # worker crash, lost object, task error
            self.lost(call, f"ray task failed: {short_error(exc)}", kill=True)
            return
        self.idle.append(call.slot)
        if not isinstance(reply, bytes):
            for j in call.jobs:
                self.deliver(j, ClientResult.failure(
                    j.task, f"actor returned {type(reply).__name__}, not frame bytes",
                    bytes_down=j.frame_len))
            return
        if not self.stacks:
            self.deliver(call.jobs[0], answer(call.jobs[0].job, reply, call.jobs[0].frame_len))
            return
        at = 0
        for n, j in enumerate(call.jobs):
            try:
                frame = wire.frame_at(reply, at, j.job.expect.max_frame)
            except WireError as exc:  # its reply is cut or broken: it fails, the rest go again
                self.deliver(j, ClientResult.failure(
                    j.task, f"ray actor sent a malformed frame: {exc}", bytes_down=j.frame_len,
                    bytes_up=len(reply) - at))
                self.again(call.jobs[n + 1:])
                return
            at += len(frame)
            self.deliver(j, answer(j.job, frame, j.frame_len))
        self.count(reply[at:])

    def count(self, frame: bytes) -> None:
        """Add a call's BATCH frame (tasks trained stacked and alone) to the tally; a missing
        or malformed one only goes uncounted (every result was already read)."""
        try:
            self.tally.update(batch_counts(frame))
        except WireError:
            pass

    def deliver(self, item: _Job, result: ClientResult) -> None:
        result.bytes_down += self.spent.pop(item.job.id, 0)
        self.arrived.append(Delivery(item.job, result))

    def lost(self, call: _Call, reason: str, kill: bool) -> None:
        """The actor of a call is gone (replaced here). Its only job fails with the reason;
        several are sent again, one by one: which of them broke it is not known."""
        self.replace(call.slot, kill=kill)
        self.idle.append(call.slot)
        if len(call.jobs) == 1:
            j = call.jobs[0]
            self.deliver(j, ClientResult.failure(j.task, reason, bytes_down=j.frame_len))
        else:
            self.again(call.jobs)

    def again(self, jobs: list[_Job]) -> None:
        """Queue jobs of a lost call again, each alone; what was sent for them still counts."""
        for j in jobs:
            self.spent[j.job.id] += j.frame_len
            self.queue.append([j])

    def cancel(self, job: Job) -> Stopped | None:
        """A due job: a running one's actor is killed and replaced, a queued one never starts;
        None if its result is waiting. The other jobs of a killed call share its deadline (due
        within `GRACE` of it: submitted together) and fail with it when theirs comes; any due
        later are sent again, one by one. Other calls, running or queued, are untouched."""
        if any(d.job is job for d in self.arrived):
            return None
        if job.id in self.held:
            return self.held.pop(job.id)
        earlier = self.spent.pop(job.id, 0)
        for ref, call in list(self.running.items()):
            if any(j.job is job for j in call.jobs):
                del self.running[ref]
                self.replace(call.slot, kill=True)
                self.idle.append(call.slot)
                how = "ray actor killed and replaced"
                for j in call.jobs:
                    if shares_deadline(j.job, job):
                        self.held[j.job.id] = Stopped(how, self.spent.pop(j.job.id, 0)
                                                      + j.frame_len)
                    elif j.job is not job:
                        self.again([j])
                mine = next(j for j in call.jobs if j.job is job)
                return Stopped(how, bytes_down=earlier + mine.frame_len)
        self.outbox = [j for j in self.outbox if j.job is not job]
        kept = [[j for j in jobs if j.job is not job] for jobs in self.queue]
        self.queue = deque(jobs for jobs in kept if jobs)
        if earlier:
            return Stopped("its ray actor was lost; waiting to be sent again", bytes_down=earlier)
        return Stopped("never handed to an actor", started=False)

    def close(self) -> None:
        ray = self.ray
        self.queue.clear()
        self.running.clear()
        self.arrived.clear()
        self.held.clear()
        self.outbox = []
        if ray.is_initialized():
            for actor in self.actors:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # already gone
                    pass
            if self.owned or self.attached:
                ray.shutdown()  # stops a Ray we started; only disconnects from a cluster
        self.actors, self._payload, self._payload_ref = [], None, None
        self.owned = self.attached = False
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None
