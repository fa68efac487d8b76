"""`tinyfed eval`: the global model of a run folder or checkpoint on the test set."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tinyfed.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run's model on the test set",
                       description="Accuracy, loss, per-class accuracy and confusion matrix.")
    p.add_argument("target", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--data-dir", help="folder holding the data set files")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from tinyfed.evaluation import evaluate_target, render_report

    target = Path(args.target)
    if not target.exists():
        raise ConfigError(f"{str(target)!r} does not exist; give a run folder or a checkpoint file")
    report = evaluate_target(target, args.data_dir)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(render_report(report))
    return 0
