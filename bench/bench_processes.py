"""Process runtime benchmarks: per-round overhead, 2-worker speed-up, cost of a failure.

Each figure is the server's own round wall time (`wall_seconds` of the round records), so
child start-up is reported apart from rounds. Runs the FedAvg paper's 2NN on Fashion-MNIST.

    python bench/bench_processes.py [--rounds 3] [--only overhead,speedup,failure]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from timed_run import timed_run

from tinyfed.config import build_config

BASE = dict(dataset="fmnist", model="mlp", epochs=1, batch_size=10, lr=0.05, seed=0,
            eval_every=1000)


def measure(threads: int | None = None, on_start=None, **over) -> dict:
    """One run; returns start-up seconds and each round's wall seconds."""
    cfg = build_config({**BASE, **over})
    startup, server, _ = timed_run(cfg, threads or os.cpu_count() or 1, on_start)
    recs = server.state.records
    return {"startup": startup, "rounds": [r["wall_seconds"] for r in recs],
            "failed": sum(r["clients_failed"] for r in recs),
            "reasons": [f["reason"] for r in recs for f in r["failures"]]}


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):6.2f} s (rounds: {', '.join(f'{x:.2f}' for x in xs)})"


def overhead(rounds: int) -> None:
    print(f"\n## per-round overhead, K=10 C=1 E=1 B=10, 2NN, {rounds} rounds (median)")
    setup = dict(clients=10, fraction=1.0, rounds=rounds)
    a = measure(runtime="inprocess", **setup)
    b = measure(runtime="processes", workers=1, **setup)
    c = measure(runtime="processes", workers=2, **setup)
    base = statistics.median(a["rounds"])
    print(f"inprocess             {fmt(a['rounds'])}")
    for name, m in (("processes workers=1", b), ("processes workers=2", c)):
        med = statistics.median(m["rounds"])
        print(f"{name}   {fmt(m['rounds'])}  {100 * (med / base - 1):+.1f}% vs inprocess, "
              f"start-up {m['startup']:.2f} s")


def speedup(rounds: int) -> None:
    print("\n## speed-up: 2 workers x 1 torch thread vs inprocess (median round)")
    for clients, fraction, r in ((100, 0.1, max(rounds, 3)), (10, 1.0, rounds)):
        setup = dict(clients=clients, fraction=fraction, rounds=r)
        one = measure(threads=1, runtime="inprocess", **setup)
        dflt = measure(runtime="inprocess", **setup)
        two = measure(runtime="processes", workers=2, **setup)
        m1, md, m2 = (statistics.median(x["rounds"]) for x in (one, dflt, two))
        print(f"K={clients} C={fraction}: inprocess 1 thread {m1:.2f} s, inprocess "
              f"{os.cpu_count()} threads {md:.2f} s, processes 2x1 {m2:.2f} s -> "
              f"speed-up {m1 / m2:.2f}x (vs 1 thread), {md / m2:.2f}x (vs default threads)")


def failure(rounds: int) -> None:
    print("\n## cost of a failure: round 1 with one child SIGKILLed mid-task, K=10 C=1, 2 workers")
    setup = dict(clients=10, fraction=1.0, rounds=max(rounds, 2), runtime="processes",
                 workers=2)
    clean = measure(**setup)
    with tempfile.TemporaryDirectory() as mark:
        os.environ["TINYFED_TEST_CHILD_FAULT"] = "hang:3:1"  # child.py's test hook
        os.environ["TINYFED_TEST_CHILD_MARK"] = mark
        stop = threading.Event()

        def killer() -> None:
            while not stop.is_set():
                for f in Path(mark).glob("fault-*"):
                    os.kill(int(f.name.removeprefix("fault-")), 9)
                    return
                stop.wait(0.01)

        watcher = threading.Thread(target=killer, daemon=True)
        try:
            hurt = measure(on_start=watcher.start, **setup)
        finally:
            stop.set()
            del os.environ["TINYFED_TEST_CHILD_FAULT"], os.environ["TINYFED_TEST_CHILD_MARK"]
    print(f"clean   round 1 {clean['rounds'][0]:.2f} s, round 2 {clean['rounds'][1]:.2f} s")
    print(f"killed  round 1 {hurt['rounds'][0]:.2f} s, round 2 {hurt['rounds'][1]:.2f} s "
          f"({hurt['failed']} failure: {hurt['reasons'][:1]})")
    print(f"extra wall time of the failed round: {hurt['rounds'][0] - clean['rounds'][0]:+.2f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default="overhead,speedup,failure")
    args = p.parse_args()
    print(f"# bench_processes  {time.strftime('%Y-%m-%d %H:%M')}  cpus={os.cpu_count()}  "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)  # import torch._dynamo now,
    # as each child does at start-up, so no runtime's first round pays for it
    for part in args.only.split(","):
        {"overhead": overhead, "speedup": speedup, "failure": failure}[part](args.rounds)
    print(f"\nload average at end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"rerun: PYTHONPATH=src {sys.executable} bench/bench_processes.py --rounds {args.rounds}"
          f" --only {args.only}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
