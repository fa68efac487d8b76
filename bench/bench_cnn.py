"""The paper's CNN (B=10, E=5): clients side by side, in one process (lanes, one torch thread
each: the in-process default for autograd models) and in worker processes (one thread each),
against one client after another in one process (torch on 1 thread, and on every core), and
against a plain PyTorch loop training one client after another on every core
(`plain_fedavg.py --model cnn`: no framework, NCHW as PyTorch defaults).

Each contestant is a whole `tinyfed run` process (FMNIST, K=100, C=0.1, lr 0.05); its wall time
and its rounds' time (from metrics.jsonl) are measured, contestants alternating, `--repeats`
times, min/median/max printed.

    PYTHONPATH=src python bench/bench_cnn.py [--rounds 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_flower import measure  # noqa: E402


def commands(rounds: int, out: Path) -> dict[str, list[str]]:
    cores = os.cpu_count() or 1
    run = [sys.executable, "-m", "tinyfed", "run", "--model", "cnn", "--clients", "100",
           "--fraction", "0.1", "--epochs", "5", "--batch-size", "10", "--lr", "0.05",
           "--rounds", str(rounds), "--plain", "--checkpoint-every", "1000000"]
    plain = [sys.executable, str(Path(__file__).resolve().parent / "plain_fedavg.py"), "--model",
             "cnn", "--clients", "100", "--fraction", "0.1", "--epochs", "5", "--batch-size",
             "10", "--lr", "0.05", "--rounds", str(rounds)]
    return {
        f"plain loop, {cores} threads": [*plain, "--threads", str(cores), "--out",
                                         str(out / "plain")],
        "one after another, 1 thread": [*run, "--threads", "1", "--set", "lanes=1", "--out",
                                        str(out / "t1")],
        f"one after another, {cores} threads": [*run, "--threads", str(cores), "--set",
                                                "lanes=1", "--out", str(out / "tn")],
        f"in-process, {cores} lanes": [*run, "--threads", str(cores), "--out",
                                       str(out / "lanes")],
        f"processes ({cores} workers)": [*run, "--runtime", "processes", "--workers",
                                         str(cores), "--out", str(out / "procs")],
    }


def round_seconds(folder: Path) -> float:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return sum(json.loads(line)["wall_seconds"] for line in lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load "
          f"{os.getloadavg()[0]:.2f}, {os.cpu_count()} cores")
    walls: dict[str, list[float]] = {}
    rounds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for label, cmd in commands(args.rounds, Path(tmp) / str(i)).items():
                walls.setdefault(label, []).append(measure(cmd)[0])
                rounds.setdefault(label, []).append(round_seconds(Path(cmd[-1])))
    print(f"{'contestant':32} {'wall s (min/med/max)':>22} {'in rounds s (min/med/max)':>27}")
    for label in walls:
        w, r = sorted(walls[label]), sorted(rounds[label])
        print(f"{label:32} {w[0]:7.1f}/{statistics.median(w):6.1f}/{w[-1]:6.1f}   "
              f"{r[0]:9.1f}/{statistics.median(r):6.1f}/{r[-1]:6.1f}")
    baselines, sides = list(walls)[:3], list(walls)[3:]
    for side in sides:
        for base in baselines:
            print(f"{side} against {base}: "
                  f"{statistics.median(walls[base]) / statistics.median(walls[side]):.2f}× "
                  f"(median wall), "
                  f"{statistics.median(rounds[base]) / statistics.median(rounds[side]):.2f}× "
                  f"(in rounds)")
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    print(f"rerun: PYTHONPATH=src python bench/bench_cnn.py --rounds {args.rounds} "
          f"--repeats {args.repeats}")


if __name__ == "__main__":
    main()
