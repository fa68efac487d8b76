"""Console progress: a live rich table on a terminal, plain lines elsewhere (logs, CI, pipes).

Between round records the table's caption follows the round in progress (clients done of
those selected, bytes so far, and an ETA for the round and the run), fed by the bus's
progress events; without a terminal a progress line is printed at most every `PLAIN_EVERY`
seconds, so a long CNN round is not silent and a short one is not noisy.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from tinyfed.metrics import Record, human_bytes

PLAIN_EVERY = 10.0  # seconds between plain progress lines

COLUMNS = ("round", "accuracy", "test loss", "train loss", "clients ok/sel", "bytes ↓", "bytes ↑",
           "seconds")


def _cells(rec: Record) -> tuple[str, ...]:
    acc, loss, tl = rec.get("test_accuracy"), rec.get("test_loss"), rec.get("train_loss")
    return (
        str(rec["round"]),
        f"{acc:.4f}" if acc is not None else "-",
        f"{loss:.4f}" if loss is not None else "-",
        f"{tl:.4f}" if tl is not None else "-",
        f"{rec['clients_succeeded']}/{rec['clients_selected']}",
        human_bytes(rec["bytes_down"]),
        human_bytes(rec["bytes_up"]),
        f"{rec['wall_seconds']:.2f}",
    )


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def status(event: Record, round_seconds: list[float]) -> str:
    """One line for a round in progress: clients done, bytes, ETA of the round and the run.

    The round's ETA scales its elapsed time by the clients still to come; the run's adds the
    mean of the finished rounds' seconds for each round after this one."""
    done, planned, rnd = event["done"], event["planned"], event["round"]
    line = (f"round {rnd}: {done}/{planned} clients"
            + (f" ({event['failed']} failed)" if event.get("failed") else "")
            + f" · {human_bytes(event['bytes'])} so far")
    if done:
        left = event["seconds"] * (planned - done) / done
        line += f" · round ETA {duration(left)}"
        rounds_after = event["rounds"] - rnd
        if rounds_after > 0 and round_seconds:
            mean = sum(round_seconds) / len(round_seconds)
            line += f" · run ETA {duration(left + rounds_after * mean)}"
    return line


class Progress:
    """A metrics sink. Use as a context manager so the live table is closed on any exit."""

    def __init__(self, title: str, stream: TextIO | None = None, live: bool | None = None):
        self.stream = stream or sys.stdout
        self.live_mode = self.stream.isatty() if live is None else live
        self.title = title
        self.rows: list[tuple[str, ...]] = []
        self.console = Console(file=self.stream)
        self.live: Live | None = None
        self.caption = ""
        self.round_seconds: list[float] = []
        self.clock: Callable[[], float] = time.monotonic
        self.last_line = self.clock()

    def table(self) -> Table:
        table = Table(title=self.title, caption=self.caption or None)
        for col in COLUMNS:
            table.add_column(col, justify="right")
        for row in self.rows[-30:]:
            table.add_row(*row)
        return table

    def __enter__(self) -> Progress:
        if self.live_mode:
            self.live = Live(self.table(), console=self.console, refresh_per_second=4)
            self.live.__enter__()
        else:
            print(self.title, file=self.stream, flush=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
            self.live = None

    def on_progress(self, event: Record) -> None:
        """A bus progress event: refresh the caption, or print a throttled plain line."""
        self.caption = status(event, self.round_seconds)
        if self.live is not None:
            self.live.update(self.table())
        elif self.clock() - self.last_line >= PLAIN_EVERY:
            self.last_line = self.clock()
            print(self.caption, file=self.stream, flush=True)

    def __call__(self, rec: Record) -> None:
        if rec.get("kind", "round") != "round":
            return
        cells = _cells(rec)
        self.rows.append(cells)
        self.round_seconds.append(float(rec.get("wall_seconds") or 0.0))
        self.caption = ""
        self.last_line = self.clock()
        if self.live is not None:
            self.live.update(self.table())
        else:
            line = "  ".join(f"{c}={v}" for c, v in zip(COLUMNS, cells))
            print(line, file=self.stream, flush=True)
