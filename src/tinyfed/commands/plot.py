"""`tinyfed plot`: re-render a run's result.png, or one figure comparing several runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from tinyfed.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser("plot", help="plot one run or compare several",
                       description="Accuracy and loss per round, accuracy against bytes.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="figure path (default: RUN_DIR/result.png, or compare.png)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from tinyfed.metrics import read_records
    from tinyfed.plot import plot_runs
    from tinyfed.rundir import RunDir

    runs = {}
    for name in args.runs:
        run = RunDir(name)
        if not run.metrics.is_file():
            raise ConfigError(f"{name!r} has no metrics.jsonl; give a tinyfed run folder")
        records, problems = read_records(run.metrics)
        for problem in problems:
            print(f"tinyfed: warning: skipped {problem}")
        label = run.path.resolve().name
        runs[label if label not in runs else str(run.path)] = records
    default = RunDir(args.runs[0]).plot if len(args.runs) == 1 else Path("compare.png")
    out = plot_runs(runs, args.out or default)
    print(f"wrote {out}")
    return 0
