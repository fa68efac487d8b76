"""Whole-tree memory and time to the first round: in-process against the process runtime.

Runs `tinyfed run` (Fashion-MNIST, 2NN, K=100, C=0.1, E=1, B=10, a few rounds) as a child
process and samples the proportional set size (PSS, /proc/PID/smaps_rollup) of it and all its
descendants every 0.1 s; PSS splits a page shared by n processes n ways, so the sum is the
tree's real footprint. Time to first round is from launch to the first line of metrics.jsonl.
Runtimes alternate, `--repeats` times; min/median/max are printed.

    PYTHONPATH=src python bench/bench_memory.py [--rounds 3] [--repeats 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        todo += [int(k) for k in kids]
    return out


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def one(runtime: str, workers: int, rounds: int) -> tuple[float, float, float]:
    """(peak tree PSS MiB, seconds to the first round, total seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "tinyfed", "run", "--clients", "100", "--fraction", "0.1",
               "--rounds", str(rounds), "--runtime", runtime, "--out", str(out), "--plain"]
        if runtime != "inprocess":
            cmd += ["--workers", str(workers)]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peak, first = 0, None
        while proc.poll() is None:
            peak = max(peak, sum(pss_kib(p) for p in tree(proc.pid)))
            if first is None and (out / "metrics.jsonl").exists() and \
                    (out / "metrics.jsonl").stat().st_size:
                first = time.monotonic() - t0
            time.sleep(0.1)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed with {proc.returncode}")
        return peak / 1024, first or float("nan"), time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    rows: dict[str, list[tuple[float, float, float]]] = {"inprocess": [], "processes": []}
    for _ in range(args.repeats):
        for runtime in rows:
            rows[runtime].append(one(runtime, args.workers, args.rounds))
    for runtime, vals in rows.items():
        cols = list(zip(*vals))
        print(f"{runtime:10s} peak tree PSS MiB min/med/max "
              f"{min(cols[0]):.0f}/{statistics.median(cols[0]):.0f}/{max(cols[0]):.0f}  "
              f"first round s {min(cols[1]):.1f}/{statistics.median(cols[1]):.1f}/"
              f"{max(cols[1]):.1f}  total s {statistics.median(cols[2]):.1f}")
    ratio = statistics.median(v[0] for v in rows["processes"]) / \
        statistics.median(v[0] for v in rows["inprocess"])
    print(f"processes ({args.workers} workers) / inprocess peak PSS = {ratio:.2f}; load average "
          f"{os.getloadavg()[0]:.2f}")
    print(f"rerun: PYTHONPATH=src python bench/bench_memory.py --rounds {args.rounds} "
          f"--repeats {args.repeats} --workers {args.workers}")


if __name__ == "__main__":
    main()
