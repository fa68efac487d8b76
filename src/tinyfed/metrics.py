"""Metrics records: one per round (one per merged update in async mode), appended to JSONL and
published to every subscriber (console, dashboard). Everything that shows numbers reads these.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tinyfed.errors import TinyfedError

Record = dict[str, Any]
Sink = Callable[[Record], None]


MAX_HISTORY = 20_000  # records a bus keeps for late subscribers (async runs publish per update)


class EventBus:
    """Fan-out of records to subscribers.

    A viewer's failure never stops the run; an *essential* sink's does (the JSONL file: a
    record that cannot be written must stop the run, not vanish). The history kept for late
    subscribers is bounded: the newest `MAX_HISTORY` records, numbered from the first."""

    def __init__(self, max_history: int = MAX_HISTORY) -> None:
        self._sinks: list[Sink] = []
        self._essential: list[Sink] = []
        self._watchers: list[Sink] = []
        self._lock = threading.Lock()
        self._log: deque[Record] = deque(maxlen=max_history)
        self.published = 0  # records ever published (or preloaded): the next one's number

    @property
    def history(self) -> list[Record]:
        """The records still kept, oldest first."""
        with self._lock:
            return list(self._log)

    def since(self, number: int) -> tuple[int, list[Record]]:
        """Records numbered `number` and after that are still kept, and the next number."""
        with self._lock:
            first = self.published - len(self._log)
            skip = max(0, number - first)
            return self.published, list(itertools.islice(self._log, skip, None))

    def preload(self, records: Iterable[Record]) -> None:
        """Records of the run so far (a resume), kept as history without being published."""
        with self._lock:
            for record in records:
                self._log.append(record)
                self.published += 1

    def watch(self, watcher: Sink) -> None:
        """Receive progress events (inside a round: clients done, bytes so far): transient,
        never written, never kept as history."""
        with self._lock:
            self._watchers.append(watcher)

    def unwatch(self, watcher: Sink) -> None:
        with self._lock:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

    def notify(self, event: Record) -> None:
        with self._lock:
            watchers = list(self._watchers)
        for watcher in watchers:
            try:
                watcher(event)
            except Exception:  # noqa: BLE001 - a broken viewer must not end training
                pass

    def subscribe(self, sink: Sink, essential: bool = False) -> None:
        with self._lock:
            (self._essential if essential else self._sinks).append(sink)

    def unsubscribe(self, sink: Sink) -> None:
        with self._lock:
            for group in (self._sinks, self._essential):
                if sink in group:
                    group.remove(sink)

    def publish(self, record: Record) -> None:
        """Essential sinks first (their errors propagate), then the viewers."""
        with self._lock:
            essential, sinks = list(self._essential), list(self._sinks)
        for sink in essential:
            sink(record)
        with self._lock:
            self._log.append(record)
            self.published += 1
        for sink in sinks:
            try:
                sink(record)
            except Exception:  # noqa: BLE001 - a broken viewer must not end training
                pass


def finite_or_none(value: Any) -> Any:
    """A float that JSON (and every reader) can hold: NaN and ±Inf become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlSink:
    """Appends each record as one line and flushes it, so a killed run keeps what it wrote."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __call__(self, record: Record) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, allow_nan=False) + "\n")
            fh.flush()
            if record.get("kind", "round") != "update":  # per-update records of async mode
                os.fsync(fh.fileno())  # are synced with the next round's (a kill keeps both)

    def rewrite(self, records: Iterable[Record]) -> None:
        """Replace the file with exactly these records (resume drops rounds past the checkpoint)."""
        tmp = self.path.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, allow_nan=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


def read_records(path: str | Path) -> tuple[list[Record], list[str]]:
    """Records of a metrics file and one message per malformed line (which is skipped)."""
    records, problems = [], []
    with Path(path).open(encoding="utf-8") as fh:
        for num, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{num}: not valid JSON ({exc.msg})")
                continue
            if not isinstance(rec, dict):
                problems.append(f"{path}:{num}: a record must be a JSON object")
                continue
            records.append(rec)
    return records, problems


def rounds_to_target(records: list[Record], target: float) -> float | None:
    """The FedAvg paper's measure: make accuracy monotone (best so far), then interpolate
    linearly between the two evaluated rounds around the target. None if never reached.

    Only evaluated rounds are points: when the first of them already reaches the target, the
    answer is that round (there is no measured point before it to interpolate from)."""
    points = [
        (r["round"], r["test_accuracy"])
        for r in records
        if r.get("kind", "round") == "round" and r.get("test_accuracy") is not None
    ]
    best, prev = 0.0, None
    for rnd, acc in points:
        best = max(best, acc)
        if best >= target:
            if prev is None or best == prev[1]:
                return float(rnd)
            r0, a0 = prev
            return r0 + (target - a0) * (rnd - r0) / (best - a0)
        prev = (rnd, best)
    return None


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def human_seconds(sec: float) -> str:
    """A duration as ms, s, min or h, whichever reads best."""
    if sec < 1:
        return f"{sec * 1000:.1f} ms"
    if sec < 120:
        return f"{sec:.1f} s"
    return f"{sec / 60:.1f} min" if sec < 7200 else f"{sec / 3600:.1f} h"


def records_at(path: str | Path, state: dict[str, Any]) -> list[Record]:
    """The records of a run up to a checkpoint, rebuilt from its metrics file: round records
    1..round and (async) update records up to the checkpoint's count, in file order.

    The file is written before each checkpoint, so it holds at least that much; a malformed
    line, or a round the file lacks, is an error naming the file (resuming on a guess would
    lose or invent history). A checkpoint of an older tinyfed that carries its records is
    taken as it is."""
    if "records" in state:
        return list(state["records"])
    rounds = int(state["round"])
    updates = int(state.get("extra", {}).get("async", {}).get("updates", 0))
    path = Path(path)
    if not path.is_file():
        if rounds == 0:
            return []
        raise TinyfedError(f"{path}: missing; the checkpoint is at round {rounds} and its "
                           "records cannot be rebuilt")
    records, problems = read_records(path)
    if problems:
        raise TinyfedError(f"cannot resume: {problems[0]}")
    kept = [r for r in records if (r.get("update", 0) <= updates if r.get("kind") == "update"
                                   else isinstance(r.get("round"), int) and r["round"] <= rounds)]
    have = [r["round"] for r in kept if r.get("kind", "round") == "round"]
    if have != list(range(1, rounds + 1)):
        raise TinyfedError(f"cannot resume: {path} holds round records {have[:3]}…{have[-3:]}, "
                           f"not 1..{rounds} as the checkpoint needs")
    return kept
