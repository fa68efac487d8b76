"""The strategy library on Fashion-MNIST: non-IID accuracy, robustness under attack, privacy.

Three tables (each run in-process, deterministic, one torch thread, two runs side by side on
the two cores):

- ``niid``: 10 clients, all every round, label skew of 2 classes per client (NIID-Bench's
  #C=2) and Dirichlet(0.5) label shares (NIID-Bench's p_k ~ Dir(0.5)); 2NN, E=1, B=32,
  lr 0.05; FedAvg, FedProx (μ=0.01), SCAFFOLD, FedNova, FedAdam (η=0.01, τ=1e-3). Final and
  best accuracy and rounds to a target (interpolated between evaluated rounds).
- ``attack``: 10 IID clients, all every round, 0 or 2 (20 %) sign-flip attackers
  (attack_scale 10); FedAvg, median, trimmed mean (β=0.2) and Krum (f=2).
- ``privacy``: DP-FedAvg, 1,000 IID clients of 60 examples, 100 a round (q=0.1), clip 1,
  mlp128; noise multiplier z against ε at δ=1e-5 after the run, beside FedAvg without DP.

    PYTHONPATH=src python bench/bench_strategies.py [--table niid|attack|privacy|all]
        [--rounds 30] [--jobs 2]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

NIID = {
    "fedavg": {},
    "fedprox": dict(strategy="fedprox", mu=0.01),
    "scaffold": dict(strategy="scaffold"),
    "fednova": dict(strategy="fednova"),
    "fedadam": dict(strategy="fedadam"),
}
SPLITS = {"#C=2": dict(partition="classes", classes_per_client=2),
          "Dir(0.5)": dict(partition="dirichlet", alpha=0.5)}
ATTACK = {"fedavg": {}, "median": dict(strategy="median"),
          "trimmed-mean": dict(strategy="trimmed-mean", trim_fraction=0.2),
          "krum": dict(strategy="krum", krum_f=2)}


def job(name: str, values: dict, target: float | None) -> dict:
    """One run in a fresh process: its final/best accuracy, rounds to target, ε, seconds."""
    from tinyfed.config import build_config
    from tinyfed.metrics import rounds_to_target
    from tinyfed.rundir import RunDir
    from tinyfed.runner import execute

    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config({**values, "out": str(Path(tmp) / "run")})
        run_dir = RunDir.create(cfg)
        t0 = time.perf_counter()
        res = execute(run_dir.saved_config(), run_dir, live=False, stream=io.StringIO())
        secs = time.perf_counter() - t0
        rounds = [r for r in res.history if r.get("kind", "round") == "round"]
    accs = [r["test_accuracy"] for r in rounds if r.get("test_accuracy") is not None]
    return {"name": name, "final": accs[-1], "best": max(accs), "rounds": len(rounds),
            "to_target": rounds_to_target(rounds, target) if target else None,
            "epsilon": rounds[-1].get("epsilon"), "seconds": secs,
            "mb": (res.state.cum_bytes_down + res.state.cum_bytes_up) / 1e6}


def plan(table: str, rounds: int) -> list[tuple[str, dict, float | None]]:
    base = dict(dataset="fmnist", model="mlp", epochs=1, batch_size=32, lr=0.05,
                rounds=rounds, seed=0, deterministic=True, threads=1, checkpoint_every=1000)
    jobs = []
    if table in ("niid", "all"):
        for split, part in SPLITS.items():
            target = 0.70 if split == "#C=2" else 0.80
            for name, over in NIID.items():
                jobs.append((f"niid {split} {name}", {**base, "clients": 10, "fraction": 1.0,
                                                      **part, **over}, target))
    if table in ("attack", "all"):
        for byz in (0, 2):
            for name, over in ATTACK.items():
                jobs.append((f"attack {byz}/10 {name}", {**base, "clients": 10, "fraction": 1.0,
                                                        "byzantine": byz, "attack": "sign-flip",
                                                        **over}, None))
    if table in ("privacy", "all"):
        dp = {**base, "model": "mlp128", "clients": 1000, "fraction": 0.1, "batch_size": 20,
              "lr": 0.1}
        jobs.append(("privacy no DP", dp, None))
        for z in (0.3, 0.5, 1.0, 2.0):
            jobs.append((f"privacy z={z}", {**dp, "strategy": "dp-fedavg", "dp_noise": z,
                                            "dp_clip": 1.0}, None))
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", default="all", choices=["niid", "attack", "privacy", "all"])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    jobs = plan(args.table, args.rounds)
    print(f"machine: {os.cpu_count()} cores; {len(jobs)} runs, {args.jobs} at a time; "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    print(f"{'run':32} {'final':>7} {'best':>7} {'to target':>9} {'ε':>7} {'s':>7} {'MB':>8}")
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(job, *zip(*jobs)):
            tt = f"{row['to_target']:.1f}" if row["to_target"] is not None else "—"
            eps = f"{row['epsilon']:.2f}" if row["epsilon"] is not None else "—"
            print(f"{row['name']:32} {row['final']:7.4f} {row['best']:7.4f} {tt:>9} {eps:>7} "
                  f"{row['seconds']:7.1f} {row['mb']:8.1f}", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    print(f"rerun: PYTHONPATH=src python bench/bench_strategies.py --table {args.table} "
          f"--rounds {args.rounds} --jobs {args.jobs}")


if __name__ == "__main__":
    main()
