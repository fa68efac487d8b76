"""Asynchronous merge rules against synchronous FedAvg, same budget of client updates.

Fashion-MNIST, 2NN, K=20, C=0.25 (5 clients per "round"), E=1, B=50, lr 0.05, in-process,
deterministic; every run merges rounds × 5 client updates. Async runs keep M=5 clients busy,
so an update is typically 4 merges stale. Prints final test accuracy, the best accuracy, the
mean staleness, wall time and the traffic per run.

    PYTHONPATH=src python bench/bench_async_rules.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

from tinyfed.config import build_config
from tinyfed.rundir import RunDir
from tinyfed.runner import execute

RUNS = {
    "sync fedavg": dict(mode="sync"),
    "async seed-merge": dict(mode="async", async_rule="seed-merge"),
    "async fedasync α=0.5 const": dict(mode="async", async_rule="fedasync", async_alpha=0.5),
    "async fedasync α=0.5 poly:0.5": dict(mode="async", async_rule="fedasync", async_alpha=0.5,
                                          staleness="polynomial:0.5"),
    "async fedbuff K=5 η=1": dict(mode="async", async_rule="fedbuff", buffer_size=5),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    base = dict(dataset="fmnist", model="mlp", clients=20, fraction=0.25, epochs=1,
                batch_size=50, lr=0.05, rounds=args.rounds, seed=0, deterministic=True)
    print(f"{'run':32} {'final acc':>9} {'best acc':>9} {'staleness':>9} {'seconds':>8} "
          f"{'MB moved':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, over in RUNS.items():
            cfg = build_config({**base, **over, "out": str(Path(tmp) / name.replace(" ", "_"))})
            run_dir = RunDir.create(cfg)
            t0 = time.perf_counter()
            res = execute(run_dir.saved_config(), run_dir, live=False, stream=io.StringIO())
            secs = time.perf_counter() - t0
            rounds = [r for r in res.history if r["kind"] == "round"]
            ups = [r for r in res.history if r["kind"] == "update"]
            stale = sum(r["staleness"] for r in ups) / len(ups) if ups else 0.0
            accs = [r["test_accuracy"] for r in rounds if r["test_accuracy"] is not None]
            mb = (res.state.cum_bytes_down + res.state.cum_bytes_up) / 1e6
            print(f"{name:32} {accs[-1]:9.4f} {max(accs):9.4f} {stale:9.2f} {secs:8.1f} "
                  f"{mb:9.1f}", flush=True)
    print(f"rerun: PYTHONPATH=src python bench/bench_async_rules.py --rounds {args.rounds}")


if __name__ == "__main__":
    main()
