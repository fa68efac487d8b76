"""Ray runtime: clients run in a bounded pool of Ray actors, on one machine or a whole cluster.

Each actor rebuilds the data set and the partition from the run's config on its own node, so
the driver never ships data through the object store. The round's global weights go to the
object store once per round (one `ray.put` of the safetensors payload, shared by every task of
that round); each actor call builds the task frame from the task header and that payload and
returns the update frame's bytes, so bytes are counted exactly as in the other runtimes.
Arguments and results crossing Ray are only `str` (JSON) and `bytes` (frames, safetensors).

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
from collections import deque
from dataclasses import dataclass
from typing import Any

from tinyfed import protocol, wire
from tinyfed.errors import ConfigError, TinyfedError
from tinyfed.experiment import Experiment
from tinyfed.protocol import ClientResult, ClientTask
from tinyfed.runtimes.base import STARTUP_TIMEOUT, Delivery, Job, Stopped, answer

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


@dataclass
class _Job:
    job: Job
    header_json: str
    payload_ref: Any
    frame_len: int
    slot: int = -1

    @property
    def task(self) -> ClientTask:
        return self.job.task


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
        self.queue: deque[_Job] = deque()
        self.running: dict[Any, _Job] = {}
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

    def spawn(self):
        cfg = self.config
        threads = 1 if cfg.deterministic else max(1, int(cfg.cpus_per_client))
        return self.actor_cls.options(num_cpus=cfg.cpus_per_client, max_restarts=0,
                                      max_concurrency=1).remote(cfg.model_dump_json(), threads)

    def start(self, experiment: Experiment) -> None:
        t0 = time.monotonic()
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
        header_json = json.dumps(job.task.header())
        # frame = prefix + header + payload: its length without building it on the driver
        frame_len = len(protocol.task_frame(job.task, b"")) + len(job.payload)
        self.queue.append(_Job(job, header_json, self.payload_ref(job.payload), frame_len))
        self.dispatch()

    def dispatch(self) -> None:
        """Hand queued tasks to idle actors, any actor to any client (a client's memory rides
        with its task)."""
        while self.queue and self.idle:
            job = self.queue.popleft()
            job.slot = self.idle.popleft()
            ref = self.actors[job.slot].run.remote(job.header_json, job.payload_ref)
            self.running[ref] = job

    def receive(self, timeout: float) -> Delivery | None:
        """The next finished call's result, dispatching queued jobs to idle actors first."""
        self.dispatch()
        if not self.running:
            return None
        ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=timeout)
        if not ready:
            return None
        item = self.running[ready[0]]
        result = self.collect(ready[0])
        self.dispatch()  # keep actors busy while the server aggregates
        return Delivery(item.job, result)

    def waiting(self) -> int:
        if not self.running:
            return 0
        ready, _ = self.ray.wait(list(self.running), num_returns=len(self.running), timeout=0)
        return len(ready)

    def collect(self, ref) -> ClientResult:
        ray = self.ray
        job = self.running.pop(ref)
        try:
            reply = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self.replace(job.slot, kill=False)
            self.idle.append(job.slot)
            return ClientResult.failure(job.task, f"ray actor died: {short_error(exc)}",
                                        bytes_down=job.frame_len)
        except ray.exceptions.RayError as exc:  # worker crash, lost object, task error
            self.replace(job.slot, kill=True)
            self.idle.append(job.slot)
            return ClientResult.failure(job.task, f"ray task failed: {short_error(exc)}",
                                        bytes_down=job.frame_len)
        self.idle.append(job.slot)
        if not isinstance(reply, bytes):
            return ClientResult.failure(job.task, f"actor returned {type(reply).__name__}, "
                                        "not frame bytes", bytes_down=job.frame_len)
        return answer(job.job, reply, job.frame_len)

    def cancel(self, job: Job) -> Stopped:
        """A due job: a running one's actor is killed and replaced, a queued one never starts.
        Other jobs, running or queued, are untouched."""
        for ref, item in list(self.running.items()):
            if item.job is job:
                del self.running[ref]
                self.replace(item.slot, kill=True)
                self.idle.append(item.slot)
                return Stopped("ray actor killed and replaced", bytes_down=item.frame_len)
        for item in [i for i in self.queue if i.job is job]:
            self.queue.remove(item)
        return Stopped("never handed to an actor", started=False)

    def close(self) -> None:
        ray = self.ray
        self.queue.clear()
        self.running.clear()
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
