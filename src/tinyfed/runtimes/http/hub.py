"""The meeting point of the server loop (main thread) and the HTTP handlers (uvicorn's thread).

The server loop publishes one task per client and takes results from a queue; handlers hand out
task frames and admit update frames. Every shared structure is behind one lock; handlers waiting
for a task are woken on uvicorn's event loop with `call_soon_threadsafe`, so no reader ever
blocks the loop. The served model is an immutable bytes snapshot replaced by one assignment.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass

from tinyfed import wire
from tinyfed.errors import WireError
from tinyfed.protocol import ClientResult, ClientTask, check_update
from tinyfed.runtimes.base import Delivery, Job, Stopped
from tinyfed.wire import Kind

BOOT_HEADER = "X-Tinyfed-Boot"  # response header naming the server's boot (clients re-register)


@dataclass
class Slot:
    """One published job waiting for its answer."""

    job: Job
    crc: int  # the payload's CRC, computed once for every client that shares it
    bytes_down: int = 0
    checking: bool = False

    @property
    def task(self) -> ClientTask:
        return self.job.task


@dataclass(frozen=True)
class ModelSnapshot:
    """A MODEL frame as its small head and the payload it shares with that version's tasks."""

    head: bytes
    payload: bytes
    version: int
    etag: str


class Verdict(Exception):
    """An update turned away before it could count: HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def peek_header(frame: bytes, max_size: int) -> tuple[Kind, dict]:
    """Kind and JSON header of a frame without decoding its payload (cheap triage)."""
    if len(frame) < wire.PREFIX_SIZE:
        raise WireError(f"truncated frame: {len(frame)} bytes, prefix needs {wire.PREFIX_SIZE}")
    total = wire.frame_length(bytes(frame[: wire.PREFIX_SIZE]), max_size)
    if total != len(frame):
        raise WireError(f"frame length mismatch: announced {total} bytes, got {len(frame)}")
    _, _, kind, head_len, _, _ = wire.PREFIX.unpack(frame[: wire.PREFIX_SIZE])
    head = bytes(frame[wire.PREFIX_SIZE : wire.PREFIX_SIZE + head_len])
    return Kind(kind), wire.decode_header(head)


def max_update_frame(spec: dict[str, wire.TensorSpec]) -> int:
    """The largest update frame an honest client can send for this model: every tensor dense
    in its dtype, three times over (top-k at F=1 sends an index and a value per element), plus
    room for the headers. Bodies beyond it are refused as they arrive, not at the frame cap."""
    dense = sum(math.prod(s.shape) * s.dtype.itemsize for s in spec.values())
    return 3 * dense + 1024 * len(spec) + (1 << 20)


class Hub:
    def __init__(self, max_frame: int = wire.DEFAULT_MAX_FRAME):
        self.max_frame = max_frame
        self.max_update = max_frame  # body bound of one update (set from the model's size)
        self.boot_id = uuid.uuid4().hex[:12]  # changes on every server start; clients re-register
        self.results: queue.Queue[Delivery] = queue.Queue()
        self.counters: Counter[str] = Counter()
        self.registered: dict[int, float] = {}
        self.finished = False
        self.model: ModelSnapshot | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._slots: dict[int, Slot] = {}
        self._closed: dict[int, tuple[int, bool]] = {}  # client id -> (last round, answered?)
        self._events: dict[int, asyncio.Event] = {}  # touched on the event loop only
        self._payload_id = 0
        self._farewell: set[int] = set()  # clients told the run is over
        self._crc = wire.CrcMemo()  # called by the server loop only

    # ---- server loop side (main thread) -------------------------------------------------
    def set_model(self, payload: bytes, version: int) -> None:
        """Publish a new snapshot unless this payload is already the one served."""
        if id(payload) == self._payload_id and self.model is not None:
            return
        crc = self._crc(payload)
        head = wire.encode_head(Kind.MODEL, {"version": version}, payload, crc)
        etag = f'"{version}-{crc:08x}"'
        self.model = ModelSnapshot(head, payload, version, etag)  # one reference assignment
        self._payload_id = id(payload)

    def publish(self, job: Job) -> None:
        """Open `job` for its client; memory per open job is its header, the payload is shared."""
        with self._lock:
            old = self._slots.get(job.task.client_id)
            self._slots[job.task.client_id] = Slot(job, self._crc(job.payload))
        if old is not None:
            self.results.put(Delivery(old.job, ClientResult.failure(
                old.task, "superseded by a newer task", bytes_down=old.bytes_down)))
        self._wake(job.task.client_id)

    def cancel(self, job: Job) -> Stopped | None:
        """The job is due: close its task (a later upload is 409) and say so; None when its
        answer is already admitted or being checked (it will be delivered)."""
        slot = self._close_open(job.task.client_id, job, answered=False)
        if slot is None:  # answered, superseded, failed, or being checked: it will be delivered
            return None
        how = "task closed: a late upload is refused with 409"
        return Stopped(how, bytes_down=slot.bytes_down, started=slot.bytes_down > 0)

    def _close_open(self, client_id: int, job: Job | None, answered: bool) -> Slot | None:
        """Take this client's open slot (of `job`, if given) unless an upload for it is being
        checked; later uploads for it are then 409."""
        with self._lock:
            slot = self._slots.get(client_id)
            if slot is None or slot.checking or (job is not None and slot.job is not job):
                return None
            del self._slots[client_id]
            self._closed[client_id] = (slot.task.round, answered)
        return slot

    def finish(self) -> None:
        """The run is over: waiting and future task requests get 410."""
        self.finished = True
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._wake_all)

    # ---- handler side -------------------------------------------------------------------
    def take_task(self, client_id: int) -> tuple[bytes, bytes] | None:
        """This client's TASK frame as (prefix + header, shared payload): never copied whole."""
        with self._lock:
            slot = self._slots.get(client_id)
            if slot is None or slot.checking:
                return None
        payload = slot.job.payload
        head = wire.encode_head(Kind.TASK, slot.task.header(), payload, slot.crc)
        with self._lock:
            slot.bytes_down += len(head) + len(payload)
        return head, payload

    async def wait_task(self, client_id: int, wait: float) -> tuple[bytes, bytes] | None:
        """Long-poll: this client's task frame in two parts, or None after `wait` seconds or at
        the end."""
        event = self._events.setdefault(client_id, asyncio.Event())
        deadline = time.monotonic() + wait
        while not self.finished:
            event.clear()
            frame = self.take_task(client_id)
            if frame is not None:
                return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except asyncio.TimeoutError:
                return None
        return None

    def accept(self, client_id: int, body: bytes) -> ClientResult:
        """Admit an update (or failure) frame for this client's open task, or raise Verdict."""
        try:
            kind, header = peek_header(body, self.max_frame)
        except WireError as exc:
            self.count(422)
            self._fail_open(client_id, f"rejected update: malformed frame: {exc}", len(body))
            raise Verdict(422, f"malformed frame: {exc}") from None
        with self._lock:
            slot = self._slots.get(client_id)
            rnd = header.get("round", slot.task.round if slot and kind == Kind.FAILURE else None)
            if slot is None or slot.checking or rnd != slot.task.round:
                status = self._conflict(client_id, rnd, slot)
                self.counters["409"] += 1
                self.counters[status] += 1
                raise Verdict(409, f"{status} update: no open task for client {client_id} "
                                   f"round {rnd!r}")
            slot.checking = True
        rejected = ""
        try:
            result = check_update(body, slot.job.expect)
        except WireError as exc:
            rejected = str(exc)
            result = ClientResult.failure(slot.task, f"rejected update: {exc}",
                                          bytes_up=len(body))
        except BaseException:  # a server-side fault: the task stays open for the retry
            with self._lock:
                slot.checking = False
            raise
        with self._lock:
            if self._slots.get(client_id) is not slot:  # expired while being checked
                self.counters["409"] += 1
                self.counters["late"] += 1
                raise Verdict(409, f"late update: round {rnd} of client {client_id} has closed")
            del self._slots[client_id]
            self._closed[client_id] = (slot.task.round, True)
        result.bytes_down = slot.bytes_down
        self.results.put(Delivery(slot.job, result))
        if rejected:
            self.count(422)
            raise Verdict(422, f"rejected update: {rejected}")
        return result

    def _fail_open(self, client_id: int, reason: str, size: int) -> None:
        """A frame too broken to say which task it answers fails this client's open task, as a
        bad frame does in every runtime (rather than holding it to its deadline)."""
        slot = self._close_open(client_id, None, answered=True)
        if slot is None:
            return
        self.results.put(Delivery(slot.job, ClientResult.failure(
            slot.task, reason, bytes_down=slot.bytes_down, bytes_up=size)))

    def _conflict(self, client_id: int, rnd, slot: Slot | None) -> str:
        """Why an update has no open task: a duplicate, a late one, or unknown."""
        closed_round, answered = self._closed.get(client_id, (None, False))
        if (slot is not None and slot.checking and rnd == slot.task.round) or (
                answered and rnd == closed_round):
            return "duplicate"
        if not isinstance(rnd, int) or isinstance(rnd, bool):
            return "unknown"
        if (slot is not None and rnd < slot.task.round) or (
                closed_round is not None and rnd <= closed_round):
            return "late"
        return "unknown"

    def count(self, what: int | str) -> None:
        with self._lock:
            self.counters[str(what)] += 1

    def register(self, client_id: int) -> None:
        with self._lock:
            self.registered[client_id] = time.time()

    def farewell(self, client_id: int) -> None:
        with self._lock:
            self._farewell.add(client_id)

    def farewelled(self) -> set[int]:
        with self._lock:
            return set(self._farewell)

    def _wake(self, client_id: int) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._set, client_id)

    def _set(self, client_id: int) -> None:
        event = self._events.get(client_id)
        if event is not None:
            event.set()

    def _wake_all(self) -> None:
        for event in self._events.values():
            event.set()
