"""The dashboard's one append-only event log, shared by every open page.

Sources (a run folder being tailed, a live EventBus) append; each page's stream reads from a
position. Because the log only grows, a stream that drops can resume exactly where it left off
(SSE `Last-Event-ID` = "<boot>:<index>"), and a page that reconnects to a restarted server (new
boot token) is told to rebuild from the full replay, so no point is ever drawn twice.
"""

from __future__ import annotations

import json
import secrets
import threading
from typing import Any

Event = dict[str, Any]


class Hub:
    """Thread-safe log of dashboard events: run metadata, records, problems, resets."""

    def __init__(self) -> None:
        self.boot = secrets.token_hex(6)
        self._events: list[Event] = []
        self._lock = threading.Lock()
        self._runs: list[dict[str, Any]] = []
        self._seq: list[int] = []
        self._progress: dict[int, tuple[int, Event]] = {}  # run -> (version, latest progress)
        self._progress_version = 0
        self.closed = False

    # ---- writers (source threads) ----
    def add_run(self, name: str, **meta: Any) -> int:
        """Register a run; returns its index (the `run` field of its events)."""
        with self._lock:
            index = len(self._runs)
            info = {"run": index, "name": name, **meta}
            self._runs.append(info)
            self._seq.append(0)
            self._events.append({"type": "meta", **info})
            return index

    def update_run(self, index: int, **meta: Any) -> None:
        """Change a run's metadata (config appeared, notice changed); no change, no event."""
        with self._lock:
            info = self._runs[index]
            if all(info.get(k) == v for k, v in meta.items()):
                return
            info.update(meta)
            self._events.append({"type": "meta", **info})

    def add_record(self, index: int, record: dict[str, Any]) -> int:
        """Append a record of run `index`; returns its per-run sequence number (0-based)."""
        with self._lock:
            seq = self._seq[index]
            self._seq[index] += 1
            self._events.append({"type": "record", "run": index, "seq": seq, "record": record})
            return seq

    def add_problem(self, index: int, message: str) -> None:
        """A malformed line or similar: shown on the page; the run's other records stay."""
        with self._lock:
            self._events.append({"type": "problem", "run": index, "message": message})

    def reset_run(self, index: int) -> None:
        """The run's records were rewritten (a resume dropped rounds): pages drop theirs."""
        with self._lock:
            self._seq[index] = 0
            self._events.append({"type": "reset", "run": index})

    def set_progress(self, index: int, progress: dict[str, Any]) -> None:
        """The round in progress of run `index`: transient, only the latest is kept (never in
        the log), so a long run's progress costs no memory and a replay never redraws it."""
        with self._lock:
            self._progress_version += 1
            self._progress[index] = (self._progress_version, {"run": index, **progress})

    # ---- readers (streams) ----
    def progress_since(self, version: int) -> tuple[int, list[Event]]:
        """Progress events newer than `version` (one per run, the latest), and the version."""
        with self._lock:
            return self._progress_version, [ev for v, ev in self._progress.values()
                                            if v > version]

    def since(self, position: int) -> list[Event]:
        with self._lock:
            return self._events[position:]

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)

    def runs(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._runs]

    def resume_position(self, last_event_id: str | None) -> int:
        """Where a reconnecting stream continues: after its last event if it came from this
        server instance, else from the start (full replay)."""
        if not last_event_id:
            return 0
        boot, _, index = last_event_id.partition(":")
        if boot != self.boot or not index.isdigit():
            return 0
        return min(int(index) + 1, len(self))

    def snapshot(self) -> dict[str, Any]:
        """Everything as one JSON-able object, the same data the page builds from the stream."""
        runs = self.runs()
        for run in runs:
            run.update(records=[], problems=[])
        for ev in self.since(0):
            run = runs[ev["run"]]
            if ev["type"] == "record":
                run["records"].append(ev["record"])
            elif ev["type"] == "problem":
                run["problems"].append(ev["message"])
            elif ev["type"] == "reset":
                run["records"].clear()
        return {"boot": self.boot, "runs": runs}


def format_sse(event: str, data: Any, event_id: str | None = None) -> str:
    """One server-sent event. `data` is JSON on a single line (json.dumps never emits newlines)."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"event: {event}")
    lines.append("data: " + json.dumps(data, allow_nan=False, separators=(",", ":")))
    return "\n".join(lines) + "\n\n"
