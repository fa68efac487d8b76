"""Where a run's numbers come from: its folder (config, partition, metrics.jsonl tailed by
polling) or, for the run in this process, its EventBus. Each `RunWatch.poll()` pushes whatever
is new into the hub; a watch never raises, it reports problems as notices on the page.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinyfed.config import Config, build_config, read_toml
from tinyfed.dashboard.estimate import payload_bytes
from tinyfed.dashboard.hub import Hub
from tinyfed.errors import TinyfedError
from tinyfed.metrics import EventBus
from tinyfed.progress import status
from tinyfed.rundir import CONFIG, METRICS, PARTITION

Log = Callable[[str], None]


def stderr_log(message: str) -> None:
    print(f"tinyfed: warning: {message}", file=sys.stderr, flush=True)


def parse_line(raw: bytes, where: str) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None) or (None, problem) for one line of a metrics file."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, f"{where}: not UTF-8 text"
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"{where}: not valid JSON ({exc.msg})"
    if not isinstance(rec, dict):
        return None, f"{where}: a record must be a JSON object"
    try:
        json.dumps(rec, allow_nan=False)
    except ValueError:
        return None, f"{where}: contains NaN or Infinity, which a record never holds"
    return rec, None


def config_meta(config: Config) -> dict[str, Any]:
    return {"config": config.model_dump(), "clients_per_round": config.clients_per_round,
            "payload_bytes": payload_bytes(config)}


class RunWatch:
    """One run on the dashboard."""

    def __init__(self, hub: Hub, name: str, folder: Path | None = None,
                 bus: EventBus | None = None, config: Config | None = None,
                 log: Log = stderr_log):
        self.hub, self.folder, self.bus, self.log = hub, folder, bus, log
        self.index = hub.add_run(name, path=str(folder) if folder else None, config=None,
                                 partition=None, payload_bytes=None, clients_per_round=None,
                                 notice=None)
        self._lock = threading.Lock()
        self._stamps: dict[str, float | None] = {}
        self._notice: str | None = None
        self._ino: int | None = None
        self._offset = 0
        self._partial = b""
        self._lineno = 0
        self._sent = 0
        if config is not None:
            hub.update_run(self.index, **config_meta(config))
            self._stamps[CONFIG] = -1.0  # config given: never read it from the folder
        self._round_seconds: list[float] = []
        if bus is not None:
            self._round_seconds = [float(r.get("wall_seconds") or 0.0) for r in bus.history
                                   if r.get("kind", "round") == "round"]
            bus.subscribe(self._on_record)
            bus.watch(self._on_progress)

    def close(self) -> None:
        if self.bus is not None:
            self.bus.unsubscribe(self._on_record)
            self.bus.unwatch(self._on_progress)

    def _on_record(self, record: dict[str, Any]) -> None:
        if record.get("kind", "round") == "round":
            self._round_seconds.append(float(record.get("wall_seconds") or 0.0))
        self.poll()

    def _on_progress(self, event: dict[str, Any]) -> None:
        """The round in progress, with the console's own words for it (one ETA rule)."""
        self.hub.set_progress(self.index, {
            "round": event["round"], "done": event["done"], "planned": event["planned"],
            "failed": event["failed"], "bytes": event["bytes"],
            "text": status(event, self._round_seconds)})

    def poll(self) -> None:
        with self._lock:
            try:
                self._poll_meta()
                if self.bus is not None:
                    self._poll_bus()
                elif self.folder is not None:
                    self._poll_file()
            except Exception as exc:  # noqa: BLE001 - a watch reports, it never dies
                self._set_notice(f"{self.folder}: cannot read ({exc})")

    # ---- metadata ----
    def _set_notice(self, notice: str | None) -> None:
        if notice != self._notice:
            self._notice = notice
            if notice:
                self.log(notice)
            self.hub.update_run(self.index, notice=notice)

    def _changed(self, name: str) -> bool:
        assert self.folder is not None
        try:
            stamp: float | None = (self.folder / name).stat().st_mtime_ns
        except OSError:
            stamp = None
        if self._stamps.get(name) == -1.0:
            return False
        old, self._stamps[name] = self._stamps.get(name), stamp
        return stamp is not None and stamp != old

    def _poll_meta(self) -> None:
        folder = self.folder
        if folder is None:
            return
        if not folder.exists():
            return self._set_notice(f"run folder {str(folder)!r} does not exist; "
                                    f"waiting for it to appear")
        if not folder.is_dir():
            return self._set_notice(f"{str(folder)!r} is not a folder; give a tinyfed run folder")
        if self._changed(CONFIG):
            try:
                self.hub.update_run(self.index, **config_meta(build_config(
                    read_toml(folder / CONFIG))))
            except TinyfedError as exc:
                self.log(f"{folder / CONFIG}: {exc}")
        if self._changed(PARTITION):
            try:
                data = json.loads((folder / PARTITION).read_text(encoding="utf-8"))
                self.hub.update_run(self.index, partition=data)
            except (OSError, ValueError) as exc:
                self.log(f"{folder / PARTITION}: unreadable ({exc})")
        if self.bus is None and not (folder / METRICS).is_file():
            if not (folder / CONFIG).is_file():
                return self._set_notice(f"{str(folder)!r} is not a tinyfed run folder (no "
                                        f"{CONFIG}, no {METRICS}); waiting for a run to start")
            return self._set_notice(f"{str(folder)!r} has no {METRICS} yet; waiting for the "
                                    f"run's first round")
        self._set_notice(None)

    # ---- records ----
    def _poll_bus(self) -> None:
        self._sent, records = self.bus.since(self._sent)
        for record in records:
            self.hub.add_record(self.index, record)

    def _poll_file(self) -> None:
        path = self.folder / METRICS
        try:
            fh = path.open("rb")
        except OSError:
            return
        with fh:
            st = os.fstat(fh.fileno())
            if self._ino is not None and (st.st_ino != self._ino or st.st_size < self._offset):
                # Rewritten (a resume dropped rounds after its checkpoint): start over.
                self.hub.reset_run(self.index)
                self._offset, self._partial, self._lineno = 0, b"", 0
            self._ino = st.st_ino
            if st.st_size <= self._offset:
                return
            fh.seek(self._offset)
            data = fh.read(st.st_size - self._offset)
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for raw in lines:
            self._lineno += 1
            if not raw.strip():
                continue
            record, problem = parse_line(raw, f"{path}:{self._lineno}")
            if problem:
                self.log(f"skipped {problem}")
                self.hub.add_problem(self.index, problem)
            else:
                self.hub.add_record(self.index, record)
