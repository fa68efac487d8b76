"""Rounds to a target accuracy, the shape of the FedAvg paper's Table 2, on Fashion-MNIST.

2NN, IID, K=100, C=0.1, target 85%: FedSGD (E=1, B=full) against FedAvg with (E, B) in
(1,10), (5,10), (5,50), (20,10). Each row tries a small lr grid (multiplicative step 10^(1/3))
and keeps the lr that reaches the target in the fewest rounds, as the paper does.

    python bench/bench_rounds_to_target.py [--max-rounds 300] [--target 0.85]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from tinyfed.config import build_config
from tinyfed.metrics import rounds_to_target
from tinyfed.rundir import RunDir
from tinyfed.runner import execute
from tinyfed.server import RoundFailed

ROWS = [  # (label, E, B, lr grid, eval every)
    ("FedSGD E=1 B=inf", 1, 0, (0.215, 0.464, 1.0), 5),
    ("FedAvg E=1 B=10", 1, 10, (0.0215, 0.0464, 0.1), 1),
    ("FedAvg E=5 B=10", 5, 10, (0.0215, 0.0464), 1),
    ("FedAvg E=5 B=50", 5, 50, (0.0464, 0.1, 0.215), 1),
    ("FedAvg E=20 B=10", 20, 10, (0.01, 0.0215), 1),
]


def rounds_for(epochs: int, batch: int, lr: float, target: float, max_rounds: int,
               every: int, tmp: Path) -> tuple[float | None, float, float]:
    cfg = build_config(dict(clients=100, fraction=0.1, epochs=epochs, batch_size=batch, lr=lr,
                            rounds=max_rounds, target_accuracy=target, eval_every=every,
                            checkpoint_every=max_rounds, seed=0,
                            out=str(tmp / f"e{epochs}b{batch}lr{lr}")))
    run = RunDir.create(cfg)
    start = time.monotonic()
    with open(os.devnull, "w") as null:
        try:
            res = execute(run.saved_config(), run, live=False, stream=null)
        except RoundFailed:  # the lr diverged: every update was non-finite and was rejected
            return None, float("nan"), time.monotonic() - start
    best = max(r["test_accuracy"] or 0 for r in res.state.records)
    return rounds_to_target(res.state.records, target), best, time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-rounds", type=int, default=300)
    ap.add_argument("--target", type=float, default=0.85)
    ap.add_argument("--rows", default="", help="comma-separated row numbers (0-4) to run")
    args = ap.parse_args()
    wanted = {int(r) for r in args.rows.split(",") if r.strip()} or set(range(len(ROWS)))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, e, b, grid, every in (row for i, row in enumerate(ROWS) if i in wanted):
            best_row = None
            for lr in grid:
                r, acc, secs = rounds_for(e, b, lr, args.target, args.max_rounds, every, Path(tmp))
                print(f"  {label:18s} lr={lr:<7} rounds={r if r is None else round(r, 1)} "
                      f"best acc={acc:.4f} ({secs:.0f} s)", flush=True)
                if r is not None and (best_row is None or r < best_row[0]):
                    best_row = (r, lr)
            results.append((label, best_row))
    base = results[0][1][0] if results[0][1] else None
    print(f"\nFashion-MNIST 2NN IID K=100 C=0.1, rounds to {100 * args.target:.0f}% "
          f"(max {args.max_rounds}):")
    print(f"{'setting':18s} {'lr':>8s} {'rounds':>8s} {'speed-up':>9s}")
    for label, row in results:
        if row is None:
            print(f"{label:18s} {'-':>8s} {'>' + str(args.max_rounds):>8s} {'-':>9s}")
            continue
        speed = f"{base / row[0]:.1f}x" if base else "-"
        print(f"{label:18s} {row[1]:>8} {row[0]:>8.1f} {speed:>9s}")
    print("rerun: python bench/bench_rounds_to_target.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
