"""tinyfed against a plain PyTorch FedAvg loop, side by side in one run (issue: core overhead).

Both run as child processes, alternately, on Fashion-MNIST, 2NN, K=100, C=0.1, E=1, B=10; the
figure is seconds per round (median over rounds), their ratio, final accuracy, and peak RSS.

    python bench/bench_overhead.py [--rounds 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    args = ap.parse_args()
    common = ["--clients", "100", "--fraction", "0.1", "--epochs", "1", "--batch-size", "10",
              "--lr", "0.05", "--rounds", str(args.rounds), "--seed", "0"]
    plain_args = [*common, "--threads", str(args.threads)]
    tinyfed_args = [*common, "--set", f"threads={args.threads}"]
    rows = {"plain": [], "tinyfed": []}
    for rep in range(args.repeats):
        out, wall, rss = run_with_rss([sys.executable, str(HERE / "plain_fedavg.py"), *plain_args])
        recs = [json.loads(line) for line in out.splitlines()]
        rows["plain"].append(
            (statistics.median(r["seconds"] for r in recs), recs[-1]["accuracy"], rss, wall)
        )
        with tempfile.TemporaryDirectory() as tmp:
            outdir = Path(tmp) / f"run{rep}"
            _, wall, rss = run_with_rss(
                [
                    sys.executable,
                    "-m",
                    "tinyfed",
                    "run",
                    *tinyfed_args,
                    "--model",
                    "mlp",
                    "--out",
                    str(outdir),
                    "--plain",
                ]
            )
            recs = [
                json.loads(line) for line in (outdir / "metrics.jsonl").read_text().splitlines()
            ]
            rows["tinyfed"].append(
                (
                    statistics.median(r["wall_seconds"] for r in recs),
                    recs[-1]["test_accuracy"],
                    rss,
                    wall,
                )
            )
    print(f"Fashion-MNIST 2NN, K=100 C=0.1 E=1 B=10, {args.rounds} rounds, {args.repeats} repeats")
    for name, vals in rows.items():
        sec = min(v[0] for v in vals)
        print(
            f"{name:8s} s/round (median, best repeat) {sec:.3f}  accuracy {vals[-1][1]:.4f}  "
            f"peak RSS {max(v[2] for v in vals) / 2**20:.0f} MiB  process wall {vals[-1][3]:.1f} s"
        )
    ratio = min(v[0] for v in rows["tinyfed"]) / min(v[0] for v in rows["plain"])
    print(f"ratio tinyfed/plain = {ratio:.3f} (goal <= 1.05)")
    for name, vals in rows.items():
        secs = sorted(v[0] for v in vals)
        print(f"{name:8s} s/round over repeats min/median/max {secs[0]:.3f} / "
              f"{statistics.median(secs):.3f} / {secs[-1]:.3f}")
    pairs = sorted(t[0] / p[0] for t, p in zip(rows["tinyfed"], rows["plain"]))
    print(f"ratio of each alternating pair min/median/max {pairs[0]:.3f} / "
          f"{statistics.median(pairs):.3f} / {pairs[-1]:.3f}; load average "
          f"{os.getloadavg()[0]:.2f}")
    print("rerun: python bench/bench_overhead.py " + " ".join(sys.argv[1:]))


def run_with_rss(cmd: list[str]) -> tuple[str, float, int]:
    """Like `run`, reaping the child with wait4 to read its own peak RSS."""
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_f.seek(0)
        err_f.seek(0)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err_f.read()}")
        return out_f.read(), time.monotonic() - start, usage.ru_maxrss * 1024


if __name__ == "__main__":
    main()
