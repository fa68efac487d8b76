"""Bytes to target accuracy per codec: Fashion-MNIST, 2NN, K=100, C=0.1, E=1, B=10.

For IID and Dirichlet(0.5): rounds to the target (85%, or the best the fp32 run reaches if
lower), MB up and down until then, and final accuracy, for fp32, fp16, int8, top-k 1% with error
feedback, and top-k 1% + int8 (also with an int8 downlink). Bytes are the measured frame bytes
of the run's records (cumulative at the first evaluated round at or above the target).

Rerun:  PYTHONPATH=src python bench/bench_bytes_to_target.py [--rounds 60] [--partitions iid dirichlet]
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

from tinyfed.config import build_config
from tinyfed.metrics import rounds_to_target
from tinyfed.runner import execute, open_run

CONFIGS = [  # (label, uplink codec, downlink codec)
    ("fp32", "", ""),
    ("fp16", "fp16", ""),
    ("int8", "int8", ""),
    ("topk 1% + EF", "delta+topk:0.01", ""),
    ("topk 1% + int8", "delta+topk:0.01+int8", ""),
    ("topk 1% + int8, down int8", "delta+topk:0.01+int8", "int8"),
]


def run_one(partition: str, codec: str, down: str, rounds: int, out: Path, args) -> list[dict]:
    cfg = build_config(dict(
        dataset="fmnist", model="mlp", clients=100, fraction=0.1, epochs=1, batch_size=10,
        lr=args.lr, partition=partition, alpha=0.5, rounds=rounds, eval_every=args.eval_every,
        checkpoint_every=10_000, seed=args.seed, codec=codec, down_codec=down, out=str(out)))
    run_dir, cfg = open_run(cfg, None, {})
    result = execute(cfg, run_dir, stream=io.StringIO(), live=False)
    return [r for r in result.state.records if r.get("kind", "round") == "round"]


def at_target(records: list[dict], target: float) -> dict:
    rt = rounds_to_target(records, target)
    best = max((r["test_accuracy"] for r in records if r["test_accuracy"] is not None), default=0)
    hit = next((r for r in records if r["test_accuracy"] is not None
                and r["test_accuracy"] >= target), None)
    final = [r for r in records if r["test_accuracy"] is not None][-1]
    return {
        "rounds_to_target": rt,
        "mb_up": hit["cum_bytes_up"] / 1e6 if hit else None,
        "mb_down": hit["cum_bytes_down"] / 1e6 if hit else None,
        "final_accuracy": final["test_accuracy"],
        "best_accuracy": best,
        "mb_up_run": records[-1]["cum_bytes_up"] / 1e6,
        "mb_down_run": records[-1]["cum_bytes_down"] / 1e6,
    }


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--target", type=float, default=0.85)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=1)
    ap.add_argument("--partitions", nargs="+", default=["iid", "dirichlet"])
    ap.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    args = ap.parse_args()
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for partition in args.partitions:
            target = args.target
            base = None
            for i, (label, codec, down) in enumerate(CONFIGS):
                t0 = time.time()
                recs = run_one(partition, codec, down, args.rounds,
                               Path(tmp) / f"{partition}-{i}", args)
                if i == 0:
                    best = max(r["test_accuracy"] for r in recs if r["test_accuracy"] is not None)
                    target = min(args.target, best)
                row = {"partition": partition, "config": label, "codec": codec, "down": down,
                       "target": target, **at_target(recs, target),
                       "seconds": round(time.time() - t0, 1)}
                if base is None:
                    base = row
                total = (row["mb_up"] or 0) + (row["mb_down"] or 0)
                base_total = base["mb_up"] + base["mb_down"]
                row["total_reduction"] = base_total / total if row["mb_up"] else None
                row["up_reduction"] = base["mb_up_run"] / row["mb_up_run"]
                table.append(row)
                print(f"{partition:9} {label:26} target {100 * target:.1f}%  rounds "
                      f"{fmt(row['rounds_to_target'], '5.1f')}  up {fmt(row['mb_up'], '8.2f')} MB"
                      f"  down {fmt(row['mb_down'], '8.2f')} MB  total ×"
                      f"{fmt(row['total_reduction'], '5.1f')}  uplink/round ×"
                      f"{row['up_reduction']:5.1f}  final {100 * row['final_accuracy']:.2f}%"
                      f"  best {100 * row['best_accuracy']:.2f}%  ({row['seconds']} s)",
                      flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))
    print("rerun: PYTHONPATH=src python bench/bench_bytes_to_target.py "
          f"--rounds {args.rounds} --partitions {' '.join(args.partitions)}")


if __name__ == "__main__":
    main()
