"""Sync overhead of HTTP: the same experiment in-process and over `--runtime http` (loopback,
`--workers` client processes); median seconds per round (round 1 excluded: it includes the
client processes' start-up), and their ratio. Fashion-MNIST 2NN if installed, else synthetic.

    PYTHONPATH=src python bench/bench_http_sync.py [--rounds 6] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def run(runtime: str, rounds: int, workers: int, out: Path) -> list[dict]:
    data = (["--dataset", "fmnist", "--data-dir", str(FMNIST.parent), "--model", "mlp"]
            if FMNIST.is_file() else ["--dataset", "synthetic", "--model", "mlp128"])
    cmd = [sys.executable, "-m", "tinyfed", "run", *data, "--clients", "100", "--fraction",
           "0.1", "--epochs", "1", "--batch-size", "10", "--lr", "0.05", "--rounds", str(rounds),
           "--seed", "0", "--runtime", runtime, "--workers", str(workers), "--out", str(out),
           "--plain", "--deterministic"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind", "round") == "round"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    per = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rt in ("inprocess", "http"):
            recs = run(rt, args.rounds, args.workers, Path(tmp) / rt)
            per[rt] = statistics.median(r["wall_seconds"] for r in recs[1:])
            print(f"{rt:9s} median s/round (rounds 2..{args.rounds}) = {per[rt]:.3f}  "
                  f"round 1 = {recs[0]['wall_seconds']:.2f} s  "
                  f"bytes down/up = {recs[-1]['cum_bytes_down']}/{recs[-1]['cum_bytes_up']}  "
                  f"final acc = {recs[-1]['test_accuracy']:.4f}", flush=True)
    print(f"ratio http / inprocess = {per['http'] / per['inprocess']:.2f}")
    print("rerun: PYTHONPATH=src python bench/bench_http_sync.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
