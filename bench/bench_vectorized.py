"""Vectorized clients: a round's clients trained as one stacked computation against one by one.

Part 1 (training only): K clients of the 2NN on shards of 600 Fashion-MNIST-shaped examples,
one round (E=1), trained one by one with the fused trainer (`tinyfed.fused`) and stacked
(`tinyfed.vectorized`), alternating, for each batch size and torch thread count; seconds per
round min/median/max and the ratio of the medians.

Part 2 (whole runs, `--runs`): `tinyfed run` on config A of issue 14 (K=100, C=0.1, E=1, B=10,
20 rounds, in-process) with torch on both cores, `--trainer fused` against `--trainer
vectorized`, alternating; wall time of the whole process and the report's time in rounds.

    PYTHONPATH=src python bench/bench_vectorized.py [--repeats 3] [--clients 10] [--runs]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tinyfed.client import Shard, TrainSettings
from tinyfed.fused import train_fused
from tinyfed.models import build_model
from tinyfed.vectorized import train_stacked

ROOT = Path(__file__).resolve().parent.parent


def one_by_one(model, start, shards, settings, seeds) -> None:
    for shard, seed in zip(shards, seeds):
        model.load_state_dict(start)
        train_fused(model, shard, settings, seed)


def stacked(model, start, shards, settings, seeds) -> None:
    train_stacked(model, [start] * len(shards), shards, settings, seeds)


def spread(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"{xs[0]:.3f}/{statistics.median(xs):.3f}/{xs[-1]:.3f}"


def training(repeats: int, clients: int) -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (1, 28, 28), 10, seed=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    shards = [Shard(torch.randn(600, 1, 28, 28), torch.randint(0, 10, (600,)))
              for _ in range(clients)]
    seeds = list(range(clients))
    print(f"part 1: {clients} clients × 600 examples, 2NN, E=1, one round; seconds "
          f"min/median/max over {repeats} alternating repeats")
    print(f"{'threads':>7} {'B':>4} {'one by one (fused)':>20} {'stacked':>20} {'speed-up':>9}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for batch in (10, 50):
            settings = TrainSettings(epochs=1, batch_size=batch, lr=0.05)
            times: dict[str, list[float]] = {"one": [], "stacked": []}
            stacked(model, start, shards, settings, seeds)  # warm both paths
            one_by_one(model, start, shards, settings, seeds)
            for _ in range(repeats):
                for label, fn in (("one", one_by_one), ("stacked", stacked)):
                    t0 = time.perf_counter()
                    fn(model, start, shards, settings, seeds)
                    times[label].append(time.perf_counter() - t0)
            ratio = statistics.median(times["one"]) / statistics.median(times["stacked"])
            print(f"{threads:>7} {batch:>4} {spread(times['one']):>20} "
                  f"{spread(times['stacked']):>20} {ratio:>8.2f}×")


def runs(repeats: int) -> None:
    common = ["--clients", "100", "--fraction", "0.1", "--epochs", "1", "--batch-size", "10",
              "--rounds", "20", "--lr", "0.05", "--plain", "--checkpoint-every", "1000000",
              "--threads", "0"]
    walls: dict[str, list[float]] = {"fused": [], "vectorized": []}
    rounds: dict[str, list[float]] = {"fused": [], "vectorized": []}
    accuracy: dict[str, str] = {}
    print(f"\npart 2: tinyfed run, config A, in-process, torch on {os.cpu_count()} cores; "
          f"min/median/max over {repeats} alternating runs")
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for trainer in walls:
                out = Path(tmp) / f"{trainer}{r}"
                t0 = time.perf_counter()
                done = subprocess.run([sys.executable, "-m", "tinyfed", "run", *common,
                                       "--trainer", trainer, "--out", str(out)],
                                      capture_output=True, text=True, check=True)
                walls[trainer].append(time.perf_counter() - t0)
                rounds[trainer].append(float(re.search(r"wall time\s+([\d.]+) s in rounds",
                                                       done.stdout)[1]))
                accuracy[trainer] = re.search(r"test accuracy\s+(\S+)", done.stdout)[1]
    for trainer in walls:
        print(f"{trainer:>11}: wall {spread(walls[trainer])} s, in rounds "
              f"{spread(rounds[trainer])} s, accuracy {accuracy[trainer]}")
    print(f"speed-up of vectorized (medians): wall "
          f"{statistics.median(walls['fused']) / statistics.median(walls['vectorized']):.2f}×, "
          f"rounds "
          f"{statistics.median(rounds['fused']) / statistics.median(rounds['vectorized']):.2f}×")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--runs", action="store_true", help="also time whole runs (part 2)")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}; load "
          f"{os.getloadavg()[0]:.2f}")
    training(args.repeats, args.clients)
    if args.runs:
        runs(args.repeats)
    print(f"\nrerun: PYTHONPATH=src python bench/bench_vectorized.py --repeats {args.repeats} "
          f"--clients {args.clients}{' --runs' if args.runs else ''}")


if __name__ == "__main__":
    main()
