"""Metrics records: one per round (one per merged update in async mode), appended to JSONL and
published to every subscriber (console, dashboard). Everything that shows numbers reads these.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

Record = dict[str, Any]
Sink = Callable[[Record], None]


class EventBus:
    """Fan-out of records to subscribers; a failing subscriber never stops the run."""

    def __init__(self) -> None:
        self._sinks: list[Sink] = []
        self._lock = threading.Lock()
        self.history: list[Record] = []

    def subscribe(self, sink: Sink) -> None:
        with self._lock:
            self._sinks.append(sink)

    def unsubscribe(self, sink: Sink) -> None:
        with self._lock:
            if sink in self._sinks:
                self._sinks.remove(sink)

    def publish(self, record: Record) -> None:
        with self._lock:
            self.history.append(record)
            sinks = list(self._sinks)
        for sink in sinks:
            try:
                sink(record)
            except Exception:  # noqa: BLE001 - a broken viewer must not end training
                pass


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
    linearly between the two evaluated rounds around the target. None if never reached."""
    points = [
        (r["round"], r["test_accuracy"])
        for r in records
        if r.get("kind", "round") == "round" and r.get("test_accuracy") is not None
    ]
    best, prev = 0.0, (0, 0.0)
    for rnd, acc in points:
        best = max(best, acc)
        if best >= target:
            r0, a0 = prev
            if best == a0:
                return float(rnd)
            return r0 + (target - a0) * (rnd - r0) / (best - a0)
        prev = (rnd, best)
    return None


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"
