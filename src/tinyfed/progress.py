"""Console progress: a live rich table on a terminal, plain lines elsewhere (logs, CI, pipes)."""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from tinyfed.metrics import Record, human_bytes

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


class Progress:
    """A metrics sink. Use as a context manager so the live table is closed on any exit."""

    def __init__(self, title: str, stream: TextIO | None = None, live: bool | None = None):
        self.stream = stream or sys.stdout
        self.live_mode = self.stream.isatty() if live is None else live
        self.title = title
        self.rows: list[tuple[str, ...]] = []
        self.console = Console(file=self.stream)
        self.live: Live | None = None

    def table(self) -> Table:
        table = Table(title=self.title)
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

    def __call__(self, rec: Record) -> None:
        if rec.get("kind", "round") != "round":
            return
        cells = _cells(rec)
        self.rows.append(cells)
        if self.live is not None:
            self.live.update(self.table())
        else:
            line = "  ".join(f"{c}={v}" for c, v in zip(COLUMNS, cells))
            print(line, file=self.stream, flush=True)
