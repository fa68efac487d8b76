"""Dealing a round's clients out to workers by their work against by count, on unequal shards.

The process and Ray runtimes hand each worker its share of the clients submitted together, as
one batch (`runtimes.base.deal`). Part 1 computes, on Fashion-MNIST's Dirichlet partitions, how
much work the busiest of 2 workers gets against an even share, over 20 random selections: dealt
by count in submit order (the rule before 2026-12-04) and by work (shard size × epochs,
heaviest first to the lightest worker). Part 2 times whole runs of the process runtime (2
workers, 2NN, K=100, C=0.1, E=1, B=10, Dirichlet α=0.1), the two rules alternating, `--repeats`
times; the seconds in rounds, min/median/max.

    PYTHONPATH=src python bench/bench_deal.py [--rounds 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics

from timed_run import timed_run

from tinyfed.config import build_config
from tinyfed.experiment import Experiment
from tinyfed.runtimes import base, processes

BASE = dict(dataset="fmnist", model="mlp", clients=100, fraction=0.1, epochs=1, batch_size=10,
            lr=0.05, seed=0, partition="dirichlet", alpha=0.1, eval_every=1000,
            checkpoint_every=1000)


def by_count(items: list, parts: int, weight=None, most=None) -> list[list]:
    """The earlier rule: consecutive runs in submit order, sizes within one."""
    return [items[len(items) * i // parts: len(items) * (i + 1) // parts] for i in range(parts)]


def balance(alpha: float, clients: int, fraction: float, draws: int = 20) -> tuple[float, float]:
    """Mean over `draws` random selections of the busiest worker's work ÷ an even share."""
    cfg = build_config({**BASE, "clients": clients, "fraction": fraction, "alpha": alpha})
    exp = Experiment.build(cfg)
    sizes = [exp.shard_size(c) for c in range(clients)]
    rng = random.Random(0)
    out = []
    for rule in (by_count, base.deal):
        worst = []
        for _ in range(draws):
            chosen = [sizes[c] for c in rng.sample(range(clients), cfg.clients_per_round)]
            parts = rule(chosen, 2, float)
            worst.append(max(sum(p) for p in parts) / (sum(chosen) / 2))
        out.append(statistics.mean(worst))
    return out[0], out[1]


def rounds_seconds(rounds: int, rule) -> float:
    cfg = build_config({**BASE, "rounds": rounds, "runtime": "processes", "workers": 2})
    kept = processes.deal
    processes.deal = rule
    try:
        _, server, _ = timed_run(cfg, 1)
    finally:
        processes.deal = kept
    return sum(r["wall_seconds"] for r in server.state.records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"load {os.getloadavg()[0]:.2f} at start\n\nPart 1: busiest of 2 workers ÷ an even "
          "share (mean of 20 random selections)")
    for alpha in (0.1, 0.5, 1.0):
        for clients, fraction in ((10, 1.0), (100, 0.1)):
            count, work = balance(alpha, clients, fraction)
            print(f"  Dirichlet α={alpha:<4} K={clients:<3} C={fraction:<4} by count {count:.3f}"
                  f"   by work {work:.3f}")
    print(f"\nPart 2: process runtime, 2 workers, Dirichlet α=0.1, {args.rounds} rounds; seconds "
          "in rounds")
    times: dict[str, list[float]] = {"by count": [], "by work": []}
    for _ in range(args.repeats):
        for label, rule in (("by count", by_count), ("by work", base.deal)):
            times[label].append(rounds_seconds(args.rounds, rule))
            print(f"  {label}: {times[label][-1]:.2f} s", flush=True)
    for label, v in times.items():
        v = sorted(v)
        print(f"  {label:9s} {v[0]:.2f} / {statistics.median(v):.2f} / {v[-1]:.2f} s")
    ratio = statistics.median(times["by count"]) / statistics.median(times["by work"])
    print(f"  by work: {ratio:.2f}× faster rounds (medians); load {os.getloadavg()[0]:.2f} at end"
          f"\nrerun: PYTHONPATH=src python bench/bench_deal.py --rounds {args.rounds} "
          f"--repeats {args.repeats}")


if __name__ == "__main__":
    main()
