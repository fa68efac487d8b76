"""Process transport: one child process per worker, two OS pipes each, one listener thread each.

The parent starts each child (a fork of itself while that is safe, `forking.py`; else
`python -m tinyfed.runtimes.child`) with only that child's two pipe ends, sends it HELLO (the
config as JSON, and where to map the clients' examples), then each listener thread writes task
frames to its child and reads the reply frames, which are validated and delivered as they
arrive. A child that dies or sends a malformed frame fails its task with a
reason; one whose job the dispatcher cancels at its deadline is killed. Either way it is
reaped and (with `respawn`) replaced before its next task. Blocking reads and writes live in
the listener threads; a kill (SIGKILL by pid) is what unblocks them, so nothing busy-waits.

When the trainer choice stacks clients (`trainers.choose` on a child's share of the cores: the
2NN at a small batch, unless `deterministic`; or `trainer = "vectorized"`), the jobs submitted
together go out as one batch per child (a BATCH frame, then their task frames) and each child
trains its batch as stacked computations (`ClientWorker.handle_many`), as the in-process
runtime does. A batch then shares a deadline. A child lost mid-batch costs at most the task it
broke on (the one whose reply was bad, or the only one unanswered), as outside a batch; its
other unanswered tasks are sent again, one by one, to a live child (the bytes already sent for
them still count), so a task that kills its child again then fails alone.
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
from collections import Counter
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
from tinyfed.runtimes.base import (
    STARTUP_TIMEOUT,
    Delivery,
    Job,
    Stopped,
    answer,
    batch_counts,
    deal,
    shares_deadline,
    stacking_plan,
    work,
)
from tinyfed.runtimes.forking import Forked, can_fork, fork_child
from tinyfed.trainers import choose

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


Batch = list[tuple[Job, bytes]]  # jobs a child gets together, with their task frames


@dataclass
class Slot:
    """One worker: its current child, what it is doing, and whether it is out of service."""

    num: int
    jobs: queue.Queue
    child: Child | None = None
    current: dict[int, int] = field(default_factory=dict)  # job id -> task bytes written
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
        self.live: dict[int, Job] = {}  # jobs sent and not cancelled, by id
        # jobs whose batch was killed at a deadline they share -> bytes of theirs it was sent
        self.held: dict[int, int] = {}
        self.lock = threading.Lock()
        self.crc = wire.CrcMemo()  # send() is called from the server loop only
        self.closing = False
        self.spawned: list[Child] = []  # every child ever started, for a last-resort reap
        self.examples: SharedExamples | None = None  # one mapped copy of the clients' data
        self.stacks = False  # send the jobs submitted together as one batch per child
        self.outbox: Batch = []  # stacking: jobs submitted since the last receive()
        self.spent: Counter[int] = Counter()  # bytes sent for a job to a child since lost
        self.tally: Counter[str] = Counter()  # tasks the children trained stacked and alone

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
        self.stacks = choose(experiment.new_model(), cfg.trainer, cfg.optimizer,
                             **self.stacking(cfg)).stacks
        self.warm()  # unless the caller already did
        for slot, child in zip(self.slots, self.spawned):
            handshake(child, self._hello_for(slot.num))
            slot.child = child
        for slot in self.slots:
            slot.thread = threading.Thread(target=self._listen, args=(slot,), daemon=True,
                                           name=f"tinyfed-child-{slot.num}")
            slot.thread.start()

    def stacking(self, config: Config) -> dict:
        """What `trainers.choose` needs to know of this runtime: it hands each child several
        clients at once, on the child's share of the cores (`base.stacking_plan`)."""
        return stacking_plan(config, self._child_threads(config))

    def send(self, job: Job) -> None:
        frame = protocol.task_frame(job.task, job.payload, self.crc(job.payload))
        with self.lock:
            self.live[job.id] = job
        if self.stacks:
            self.outbox.append((job, frame))  # dealt out at the next receive()
        else:
            self.jobs.put([(job, frame)])

    def receive(self, timeout: float) -> Delivery | None:
        self._deal()
        try:
            return self.done.get(timeout=timeout)
        except queue.Empty:
            return None

    def waiting(self) -> int:
        return self.done.qsize()

    def cancel(self, job: Job) -> Stopped:
        """A due job: never started (the listener will skip it), or its child is killed. The
        other jobs of a killed batch share its deadline (due within `GRACE` of it: submitted
        together) and fail with it when theirs comes, not sent to a second child that the
        deadline would kill too; any due later are sent again, one by one."""
        with self.lock:
            if job.id in self.held:
                return Stopped("child killed", self.spent.pop(job.id, 0) + self.held.pop(job.id))
            self.live.pop(job.id, None)
            earlier = self.spent.pop(job.id, 0)
        self.outbox = [(j, f) for j, f in self.outbox if j is not job]
        sent = None
        for slot in self.slots:
            with slot.lock:
                if job.id in slot.current and slot.child is not None:
                    sent = slot.current[job.id]
                    with self.lock:
                        for other, written in slot.current.items():
                            mate = self.live.get(other)
                            if mate is not None and shares_deadline(mate, job):
                                del self.live[other]
                                self.held[other] = written
                    slot.doomed = True
                    slot.child.kill()
        if sent is None:
            if earlier:
                return Stopped("its child was lost; waiting to be sent again", earlier)
            return Stopped("never sent to a child", started=False)
        return Stopped("child killed", bytes_down=earlier + sent)

    def close(self) -> None:
        """SHUTDOWN to every child, a short grace, then SIGKILL; reap all; join threads."""
        self.closing = True
        with self.lock:
            self.live.clear()
            self.held.clear()
        self.outbox = []
        for slot in self.slots:
            with slot.lock:  # a child mid-task works for nobody now: stop it at once
                if slot.current and slot.child is not None:
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

    def _child_threads(self, config: Config | None = None) -> int:
        if (config or self.config).deterministic:
            return 1
        return max(1, (os.cpu_count() or 1) // self.workers)

    def _deal(self) -> None:
        """Stacking: the jobs submitted since the last call, dealt out as one batch per
        worker, by their work (`base.deal`)."""
        jobs, self.outbox = self.outbox, []
        parts = min(len(jobs), self.workers)
        if parts and len(jobs) > parts * self.config.clients:  # a child takes at most that many
            parts = -(-len(jobs) // self.config.clients)
        for batch in deal(jobs, parts, lambda item: work(item[0]), most=self.config.clients):
            if batch:
                self.jobs.put(batch)

    def _launch(self, num: int) -> Child:
        # the examples are opened through /proc/<our pid>/fd; a fork only while nothing else
        # runs here (at warm(): no listener thread yet), a fresh interpreter otherwise
        child = launch(num, fork=can_fork(self._child_threads()))
        self.spawned.append(child)
        return child

    def _others_up(self, slot: Slot) -> bool:
        return any(not s.down for s in self.slots if s is not slot)

    def _listen(self, slot: Slot) -> None:
        """One child's listener: take a batch of jobs, run it on the child, report, repeat."""
        try:
            while True:
                item = slot.jobs.get()
                if item is None:
                    break
                with self.lock:
                    batch = [(job, frame) for job, frame in item if job.id in self.live]
                if not batch:
                    continue
                if slot.down and self._others_up(slot):
                    slot.jobs.put(batch)  # leave it to a working child
                    return
                lost = self._run(slot, batch)
                if lost is not None:
                    self._replace(slot, lost)
        finally:
            self._retire(slot)

    def _deliver(self, job: Job, result: ClientResult) -> None:
        with self.lock:
            self.live.pop(job.id, None)
            self.held.pop(job.id, None)  # its reply came before its child was killed
            result.bytes_down += self.spent.pop(job.id, 0)
        self.done.put(Delivery(job, result))

    def _ready_child(self, slot: Slot) -> Child | None:
        """The slot's child, replaced first if the deadline killed it or it died idle."""
        with slot.lock:
            child, doomed = slot.child, slot.doomed
            slot.doomed = False
        if child is not None and (doomed or child.proc.poll() is not None):
            self._replace(slot, child)
        return slot.child

    def _run(self, slot: Slot, batch: Batch) -> Child | None:
        """Write the tasks (after a BATCH frame when stacking), read and deliver the replies in
        order (then the BATCH frame that says how they trained). Returns the child if lost."""
        child = self._ready_child(slot)
        if child is None:
            for job, _ in batch:
                self._deliver(job, ClientResult.failure(
                    job.task, f"worker {slot.num} is down: {slot.down}"))
            return None
        with slot.lock:
            slot.current = {job.id: 0 for job, _ in batch}
        answered, reading = 0, False
        try:
            if self.stacks:
                pipeio.write_all(child.to_child, wire.encode_frame(
                    wire.Kind.BATCH, {"tasks": len(batch)}))
            for job, frame in batch:
                try:
                    slot.current[job.id] = pipeio.write_all(child.to_child, frame)
                except pipeio.PipeClosed as exc:  # what moved counts, even half a frame
                    slot.current[job.id] = exc.done
                    raise
            reading = True
            for job, frame in batch:
                reply = pipeio.read_frame(child.from_child, job.expect.max_frame)
                self._deliver(job, answer(job, reply, len(frame)))
                answered += 1
            if self.stacks:
                self._count(pipeio.read_frame(child.from_child))
        except pipeio.PipeClosed as exc:  # mid-reply, the reply's own task is the one lost
            up = exc.done if reading else 0
            self._lost(slot, child, batch[answered:], f"died: {exc}", up, culprit=up > 0)
            return child
        except WireError as exc:
            self._lost(slot, child, batch[answered:], f"sent a malformed frame: {exc}",
                       wire.PREFIX_SIZE, culprit=reading)
            return child
        except OSError as exc:
            self._lost(slot, child, batch[answered:], f"pipe error: {exc}", 0, culprit=False)
            return child
        finally:
            with slot.lock:
                slot.current = {}
        return None

    def _count(self, frame: bytes) -> None:
        """Add a batch's BATCH reply (tasks trained stacked and alone) to the tally."""
        counts = batch_counts(frame)
        with self.lock:
            self.tally.update(counts)

    def _lost(self, slot: Slot, child: Child, unanswered: Batch, what: str, up: int,
              culprit: bool) -> None:
        """Kill and reap a child that broke its batch (a half-read reply is discarded). The
        job it broke on fails with the reason: the one whose reply was bad (`culprit`), or
        the only one unanswered; the others (all, when the child died between replies with
        several unanswered) go to a live child again, one by one, so a task that kills its
        child again is then the only one lost. Jobs held to fail with a deadline that killed
        the child (`cancel`) are left to it, with the bytes finally written for them."""
        code = child.reap()
        sent = dict(slot.current)
        reason = f"child {slot.num} (pid {child.pid}) {what} ({describe_exit(code)})"
        with self.lock:
            for j, _ in unanswered:
                if j.id in self.held:
                    self.held[j.id] = sent[j.id]
            unanswered = [(j, f) for j, f in unanswered if j.id not in self.held]
        if not unanswered:  # it broke after every reply, in the BATCH frame: nothing lost
            return
        rest = unanswered
        if culprit or len(unanswered) == 1:
            (job, _), rest = unanswered[0], unanswered[1:]
            self._deliver(job, ClientResult.failure(job.task, reason, bytes_down=sent[job.id],
                                                    bytes_up=up))
        for j, f in rest:
            with self.lock:
                live = j.id in self.live
                if live:
                    self.spent[j.id] += sent[j.id]
            if live:
                self.jobs.put([(j, f)])
            else:  # cancelled meanwhile (its deadline killed the child): dropped as late
                self._deliver(j, ClientResult.failure(j.task, reason, bytes_down=sent[j.id]))

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

