"""Process transport: one child process per worker, two OS pipes each, one listener thread each.

The parent starts each child (a fork of itself while that is safe, `forking.py`; else
`python -m tinyfed.runtimes.child`) with only that child's two pipe ends, sends it HELLO (the
config as JSON, and where to map the clients' examples), then each listener thread writes task
frames to its child and reads the reply frames, which are validated and delivered as they
arrive. A child that dies or sends a malformed frame fails its task with a
reason; one whose job the dispatcher cancels at its deadline is killed. Either way it is
reaped and (with `respawn`) replaced before its next task. Blocking reads and writes live in
the listener threads; a kill (SIGKILL by pid) is what unblocks them, so nothing busy-waits.
"""

from __future__ import annotations

import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import tinyfed
from tinyfed import protocol, wire
from tinyfed.config import Config
from tinyfed.data.shared import SharedExamples
from tinyfed.errors import TinyfedError, WireError
from tinyfed.experiment import Experiment
from tinyfed.protocol import ClientResult
from tinyfed.runtimes import pipeio
from tinyfed.runtimes.base import STARTUP_TIMEOUT, Delivery, Job, Stopped
from tinyfed.runtimes.forking import Forked, can_fork, fork_child

SHUTDOWN_GRACE = 2.0  # seconds a child gets to exit after SHUTDOWN before SIGKILL


class ChildStartError(TinyfedError):
    """A client process could not start (its own message says why)."""


def worker_count(config: Config) -> int:
    """`workers` if given, else one per CPU core; never more than there are clients."""
    wanted = config.workers or os.cpu_count() or 1
    return max(1, min(wanted, config.clients))


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class Child:
    """A running client process and the parent's ends of its two pipes."""

    num: int
    proc: subprocess.Popen | Forked
    to_child: int
    from_child: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def reap(self) -> int | None:
        """Kill if still alive, wait for it (no zombie), close our pipe ends."""
        self.kill()
        code = self.proc.wait()
        for fd in (self.to_child, self.from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        self.to_child = self.from_child = -1
        return code


def child_env() -> dict[str, str]:
    """The parent's environment, with this tinyfed importable whatever the child's cwd."""
    env = dict(os.environ)
    root = str(Path(tinyfed.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def launch(num: int, fork: bool = False) -> Child:
    """Start one child holding only its own two pipe ends (ours stay non-inheritable): a fork
    of this process when `fork` (torch already imported: `forking`), else a fresh interpreter."""
    task_r, task_w = os.pipe()  # parent writes tasks, child reads
    up_r, up_w = os.pipe()  # child writes updates, parent reads
    try:
        proc = fork_child(task_r, up_w, num) if fork else subprocess.Popen(
            [sys.executable, "-m", "tinyfed.runtimes.child", str(task_r), str(up_w), str(num)],
            pass_fds=(task_r, up_w), close_fds=True, stdin=subprocess.DEVNULL,
            env=child_env())
    except BaseException:
        for fd in (task_w, up_r):
            os.close(fd)
        raise
    finally:
        os.close(task_r)
        os.close(up_w)
    return Child(num, proc, task_w, up_r)


def handshake(child: Child, hello: bytes) -> None:
    """Send HELLO, wait for the child's HELLO back; raise ChildStartError otherwise."""
    try:
        pipeio.write_all(child.to_child, hello)
        ready, _, _ = select.select([child.from_child], [], [], STARTUP_TIMEOUT)
        if not ready:
            raise ChildStartError(f"child {child.num} (pid {child.pid}) did not start within "
                                  f"{STARTUP_TIMEOUT:g} s")
        msg = wire.decode_frame(pipeio.read_frame(child.from_child))
    except (pipeio.PipeClosed, WireError) as exc:
        child.kill()
        raise ChildStartError(f"child {child.num} (pid {child.pid}) failed to start: {exc} "
                              f"({describe_exit(child.proc.wait())})") from None
    if msg.kind == wire.Kind.FAILURE:
        raise ChildStartError(str(msg.header.get("reason", "child failed to start"))[:500])
    if msg.kind != wire.Kind.HELLO:
        raise ChildStartError(f"child {child.num} answered HELLO with {msg.kind.name}")


@dataclass
class Slot:
    """One worker: its current child, what it is doing, and whether it is out of service."""

    num: int
    jobs: queue.Queue
    child: Child | None = None
    current: int | None = None  # id of the job being written/read
    sent: int = 0  # bytes of the current job's task frame written so far (whole frame)
    doomed: bool = False  # killed by the deadline; replace before the next job
    down: str = ""  # why this slot serves no more jobs (respawn off, spawn failed)
    lock: threading.Lock = field(default_factory=threading.Lock)
    thread: threading.Thread | None = None


class ProcessRuntime:
    """Moves jobs to child processes over OS pipes (see the module docstring)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.workers = worker_count(config)
        # one queue every child takes from: any child serves any client (a client's memory
        # rides with its task)
        self.jobs: queue.Queue = queue.Queue()
        self.slots = [Slot(i, self.jobs) for i in range(self.workers)]
        self.done: queue.Queue[Delivery] = queue.Queue()
        self.live: set[int] = set()  # ids of jobs sent and not cancelled
        self.lock = threading.Lock()
        self.crc = wire.CrcMemo()  # send() is called from the server loop only
        self.closing = False
        self.spawned: list[Child] = []  # every child ever started, for a last-resort reap
        self.examples: SharedExamples | None = None  # one mapped copy of the clients' data

    # ---- Transport protocol -----------------------------------------------------------
    def warm(self) -> None:
        """Start the children now, before the data set is loaded: each imports torch and
        tinyfed while the parent loads, and waits for its HELLO (sent by `start`)."""
        if not self.spawned:
            for slot in self.slots:
                self._launch(slot.num)

    def start(self, experiment: Experiment) -> None:
        cfg = experiment.config
        self.config = cfg
        # one mapped copy of the data for the tree (Linux); elsewhere each child loads its own
        self.examples = experiment.share_examples() if hasattr(os, "memfd_create") else None
        self.warm()  # unless the caller already did
        for slot, child in zip(self.slots, self.spawned):
            handshake(child, self._hello_for(slot.num))
            slot.child = child
        for slot in self.slots:
            slot.thread = threading.Thread(target=self._listen, args=(slot,), daemon=True,
                                           name=f"tinyfed-child-{slot.num}")
            slot.thread.start()

    def send(self, job: Job) -> None:
        frame = protocol.task_frame(job.task, job.payload, self.crc(job.payload))
        with self.lock:
            self.live.add(job.id)
        self.jobs.put((job, frame))

    def receive(self, timeout: float) -> Delivery | None:
        try:
            return self.done.get(timeout=timeout)
        except queue.Empty:
            return None

    def waiting(self) -> int:
        return self.done.qsize()

    def cancel(self, job: Job) -> Stopped:
        """A due job: never started (the listener will skip it), or its child is killed."""
        with self.lock:
            self.live.discard(job.id)
        sent = None
        for slot in self.slots:
            with slot.lock:
                if slot.current == job.id and slot.child is not None:
                    sent = slot.sent
                    slot.doomed = True
                    slot.child.kill()
        if sent is None:
            return Stopped("never sent to a child", started=False)
        return Stopped("child killed", bytes_down=sent)

    def close(self) -> None:
        """SHUTDOWN to every child, a short grace, then SIGKILL; reap all; join threads."""
        self.closing = True
        with self.lock:
            self.live.clear()
        for slot in self.slots:
            with slot.lock:  # a child mid-task works for nobody now: stop it at once
                if slot.current is not None and slot.child is not None:
                    slot.child.kill()
            slot.jobs.put(None)
        threads = [s.thread for s in self.slots if s.thread is not None]
        end = time.monotonic() + SHUTDOWN_GRACE + 1.0
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))
        for slot in self.slots:  # listeners still stuck (e.g. a child ignoring SHUTDOWN)
            with slot.lock:
                if slot.child is not None:
                    slot.child.kill()
        for t in threads:
            t.join(10.0)
        for child in self.spawned:
            if child.to_child != -1 or child.proc.returncode is None:
                child.reap()
        self.examples = None  # the experiment owns the file (its own shards map it too)

    # ---- helpers ----------------------------------------------------------------------
    def pids(self) -> list[int]:
        """Pids of the live children (for tests and diagnostics)."""
        return [s.child.pid for s in self.slots if s.child is not None]

    def _hello_for(self, num: int) -> bytes:
        """The config (the child rebuilds data and shards from it) and the ids it serves
        (all of them: any child may get any client's task)."""
        cfg = self.config
        ids = list(range(cfg.clients))
        header = {"config": cfg.model_dump(), "child": num, "clients": ids,
                  "workers": self.workers, "threads": self._child_threads()}
        if self.examples is not None:
            header["examples"] = self.examples.header()
        return wire.encode_frame(wire.Kind.HELLO, header)

    def _child_threads(self) -> int:
        if self.config.deterministic:
            return 1
        return max(1, (os.cpu_count() or 1) // self.workers)

    def _launch(self, num: int) -> Child:
        # the examples are opened through /proc/<our pid>/fd; a fork only while nothing else
        # runs here (at warm(): no listener thread yet), a fresh interpreter otherwise
        child = launch(num, fork=can_fork(self._child_threads()))
        self.spawned.append(child)
        return child

    def _others_up(self, slot: Slot) -> bool:
        return any(not s.down for s in self.slots if s is not slot)

    def _listen(self, slot: Slot) -> None:
        """One child's listener: take a job, run it on the child, report, repeat."""
        try:
            while True:
                item = slot.jobs.get()
                if item is None:
                    break
                job, frame = item
                with self.lock:
                    live = job.id in self.live
                if not live:
                    continue
                if slot.down and self._others_up(slot):
                    slot.jobs.put(item)  # leave it to a working child
                    return
                result, lost = self._run(slot, job, frame)
                with self.lock:
                    self.live.discard(job.id)
                self.done.put(Delivery(job, result))
                if lost is not None:
                    self._replace(slot, lost)
        finally:
            self._retire(slot)

    def _ready_child(self, slot: Slot) -> Child | None:
        """The slot's child, replaced first if the deadline killed it or it died idle."""
        with slot.lock:
            child, doomed = slot.child, slot.doomed
            slot.doomed = False
        if child is not None and (doomed or child.proc.poll() is not None):
            self._replace(slot, child)
        return slot.child

    def _run(self, slot: Slot, job: Job, frame: bytes) -> tuple[ClientResult, Child | None]:
        """Write the task, read the reply. Returns the result and the child if it was lost."""
        child = self._ready_child(slot)
        if child is None:
            return ClientResult.failure(job.task, f"worker {slot.num} is down: {slot.down}"), None
        with slot.lock:
            slot.current, slot.sent = job.id, 0
        sent = 0
        try:
            sent = pipeio.write_all(child.to_child, frame)
            slot.sent = sent
            reply = pipeio.read_frame(child.from_child, job.expect.max_frame)
        except pipeio.PipeClosed as exc:
            up = exc.done if sent == len(frame) else 0
            sent = sent or exc.done
            return self._lost(slot, child, job, f"died: {exc}", sent, up), child
        except WireError as exc:
            return self._lost(slot, child, job, f"sent a malformed frame: {exc}", sent,
                              wire.PREFIX_SIZE), child
        except OSError as exc:
            return self._lost(slot, child, job, f"pipe error: {exc}", sent, 0), child
        finally:
            with slot.lock:
                slot.current = None
        result = protocol.read_update(reply, job.expect)
        result.bytes_down = sent
        return result, None

    def _lost(self, slot: Slot, child: Child, job: Job, what: str, down: int,
              up: int) -> ClientResult:
        """Kill and reap a child that broke its task; the half-read reply is discarded."""
        code = child.reap()
        reason = f"child {slot.num} (pid {child.pid}) {what} ({describe_exit(code)})"
        return ClientResult.failure(job.task, reason, bytes_down=down, bytes_up=up)

    def _replace(self, slot: Slot, old: Child) -> None:
        """Reap `old`; start a fresh child unless closing or respawn is off."""
        old.reap()
        with slot.lock:
            slot.child = None
        if self.closing:
            return
        if not self.config.respawn:
            slot.down = f"child {slot.num} failed and respawn is off"
            return
        try:
            child = self._launch(slot.num)
            handshake(child, self._hello_for(slot.num))
        except (ChildStartError, OSError) as exc:
            slot.down = f"respawn failed: {exc}"
            return
        with slot.lock:
            slot.child = child
            if self.closing:
                child.kill()

    def _retire(self, slot: Slot) -> None:
        """Tell the slot's child to exit, give it a moment, then make sure; reap it."""
        with slot.lock:
            child, slot.child = slot.child, None
        if child is None:
            return
        try:
            pipeio.write_all(child.to_child, wire.encode_frame(wire.Kind.SHUTDOWN, {}))
        except OSError:
            pass
        try:
            child.proc.wait(SHUTDOWN_GRACE)
        except subprocess.TimeoutExpired:
            pass
        child.reap()

