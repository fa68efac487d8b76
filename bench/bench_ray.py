"""Ray runtime benchmark: per-round wall time against in-process and the process runtime,
pool start-up time, and the per-call and object-store costs a scaling estimate needs.

FedAvg paper setting: Fashion-MNIST, 2NN, K=100, C=0.1 (10 clients a round), E=1, B=10.
Each round figure is the server's own `wall_seconds` (selection to aggregate, no evaluation),
so start-up is reported apart from rounds; round 1 is reported apart (warm-up).

    PYTHONPATH=src python bench/bench_ray.py [--rounds 6] [--workers 2]
        [--only inprocess,threads,processes,ray]

`--stacking N` instead races, alternating N times, the Ray runtime handing each actor one
client per call (`trainer=fused`) against a batch per actor trained stacked (the default),
and prints min/median/max of start-up and of the rounds' median.

    PYTHONPATH=src python bench/bench_ray.py --stacking 3 [--rounds 6] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from timed_run import timed_run

from tinyfed import wire
from tinyfed.config import build_config
from tinyfed.experiment import Experiment

BASE = dict(dataset="fmnist", model="mlp", clients=100, fraction=0.1, epochs=1, batch_size=10,
            lr=0.05, seed=0, eval_every=1000, checkpoint_every=1000)


def measure(label: str, threads: int, **over) -> dict:
    cfg = build_config({**BASE, **over})
    after = ray_costs if cfg.runtime == "ray" else None
    startup, server, extra = timed_run(cfg, threads, after_run=after)
    walls = [r["wall_seconds"] for r in server.state.records]
    out = dict(label=label, startup=startup, first=walls[0], median=statistics.median(walls[1:]),
               walls=walls, **extra)
    print(f"{label:34s} start-up {startup:6.2f} s   round 1 {walls[0]:6.3f} s   "
          f"rounds 2-{len(walls)} median {out['median']:6.3f} s", flush=True)
    return out


def ray_costs(runtime, exp: Experiment) -> dict:
    """Costs of the Ray plumbing alone, on the pool the run used."""
    import ray

    payload = wire.encode_tensors(exp.initial)
    n = 20
    t0 = time.perf_counter()
    for _ in range(n):
        ray.put(payload)
    put = (time.perf_counter() - t0) / n
    actor = runtime.actors[0]
    ray.get(actor.pid.remote())
    t0 = time.perf_counter()
    for _ in range(n):
        ray.get(actor.pid.remote())
    call = (time.perf_counter() - t0) / n
    return dict(put=put, call=call, payload=len(payload))


def stacking(repeats: int, rounds: int, workers: int) -> None:
    """One client per actor call against a batch per actor, alternating."""
    rows: dict[str, list[dict]] = {"ray, one client per call (fused)": [],
                                   "ray, a batch per actor (stacked)": []}
    for _ in range(repeats):
        for label, trainer in zip(rows, ("fused", "auto")):
            rows[label].append(measure(label, 1, runtime="ray", workers=workers, rounds=rounds,
                                       trainer=trainer))
    print()
    for label, runs in rows.items():
        for key in ("startup", "median"):
            v = sorted(r[key] for r in runs)
            print(f"{label:34s} {'start-up' if key == 'startup' else 'rounds median':14s} "
                  f"{v[0]:.3f} / {statistics.median(v):.3f} / {v[-1]:.3f} s")
    a, b = (statistics.median(r["median"] for r in runs) for runs in rows.values())
    print(f"stacked ÷ one per call, rounds: {a / b:.2f}× faster; load "
          f"{os.getloadavg()[0]:.2f} at end\nrerun: PYTHONPATH=src python bench/bench_ray.py "
          f"--stacking {repeats} --rounds {rounds} --workers {workers}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", default="inprocess,processes,ray",
                    help="rows: inprocess,threads,processes,ray")
    ap.add_argument("--stacking", type=int, default=0, metavar="N",
                    help="race one client per call against stacked batches, N times")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    w = args.workers
    print(f"Fashion-MNIST 2NN, K=100 C=0.1 E=1 B=10, {args.rounds} rounds, {cores} cores, "
          f"load {os.getloadavg()[0]:.2f}")
    if args.stacking:
        stacking(args.stacking, args.rounds, w)
        return
    want = set(args.only.split(","))
    rows = {}
    if "inprocess" in want:
        rows["inprocess"] = measure("inprocess, 1 thread", 1, runtime="inprocess",
                                    rounds=args.rounds)
    if "threads" in want:  # oversubscribed on a loaded machine: opt-in
        rows["threads"] = measure(f"inprocess, {cores} threads", cores, runtime="inprocess",
                                  rounds=args.rounds)
    if "processes" in want:
        rows["processes"] = measure(f"processes, {w} workers", 1, runtime="processes",
                                    workers=w, rounds=args.rounds)
    if "ray" in want:
        rows["ray"] = measure(f"ray, {w} actors × 1 CPU (local)", 1, runtime="ray", workers=w,
                              rounds=args.rounds)
    if not {"inprocess", "ray"} <= rows.keys():
        return
    one, ray_row = rows["inprocess"], rows["ray"]
    m = build_config(BASE).clients_per_round
    t_client = one["median"] / m
    print(f"\nper-client cost (in-process, 1 thread): {1000 * t_client:.1f} ms "
          f"({m} clients a round)")
    print(f"ray.put of the round's weights ({ray_row['payload'] / 1e6:.3f} MB): "
          f"{1000 * ray_row['put']:.2f} ms, once per round")
    print(f"empty actor call round trip: {1000 * ray_row['call']:.2f} ms")
    ideal = t_client * -(-m // w)
    print(f"ray round vs ideal {w}-way split of the in-process work ({ideal:.3f} s): "
          f"overhead {ray_row['median'] - ideal:+.3f} s a round")
    print("\nrerun: PYTHONPATH=src python bench/bench_ray.py "
          f"--rounds {args.rounds} --workers {w} --only {args.only}")


if __name__ == "__main__":
    main()
