"""Bytes to accuracy, both directions: every codec pair against fp32 FedAvg on Fashion-MNIST.

For each partition the fp32 run sets the target, its final accuracy minus 0.5 points; every
codec pair (uplink, downlink) then runs until it reaches that target (or `--max-rounds`), and
the table gives its bytes down and up at the first round at or above the target, the rounds it
took, and the total against fp32's own bytes to that target. One figure: accuracy against
cumulative bytes (down + up), log scale, one panel per partition.

Rerun:  PYTHONPATH=src python bench/bench_communication.py [--rounds 100] [--max-rounds 200]
        [--partitions iid dirichlet] [--out docs/benchmarks/communication.png]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from tinyfed.api import run
from tinyfed.errors import TinyfedError

# (uplink, downlink); the first is the baseline
PAIRS = [
    ("", ""),
    ("delta+topk:0.01+int8+zstd", ""),
    ("delta+qsgd:4+zstd", "qsgd:8+zstd"),
    ("delta+topk:0.01+int8+zstd", "delta+topk:0.01+int8+zstd"),
    ("delta+stc:0.01+zstd", "delta+stc:0.01+zstd"),
    ("delta+stc:0.01+zstd", "delta+stc:0.005+zstd"),
    ("delta+stc:0.005+zstd", "delta+stc:0.005+zstd"),
    ("delta+topk:0.02+qsgd:5+zstd", "delta+topk:0.02+qsgd:5+zstd"),
]


def one_run(folder: Path, partition: str, up: str, down: str, rounds: int, target: float | None,
            args) -> list[dict]:
    name = f"{partition}-{up or 'fp32'}-{down or 'fp32'}".replace(":", "_").replace("+", "_")
    result = run(dataset="fmnist", model="mlp", clients=100, fraction=0.1, epochs=args.epochs,
                 batch_size=args.batch_size, lr=args.lr, rounds=rounds, seed=args.seed,
                 partition=partition, alpha=0.5, codec=up, down_codec=down,
                 down_history=args.history, target_accuracy=target, checkpoint_every=10**6,
                 out=str(folder / name))
    return [r for r in result.history if r.get("kind", "round") == "round"]


def first_at(records: list[dict], target: float) -> dict | None:
    return next((r for r in records if (r.get("test_accuracy") or 0) >= target), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=100, help="rounds of the fp32 baseline")
    ap.add_argument("--max-rounds", type=int, default=200, help="most rounds a codec pair gets")
    ap.add_argument("--partitions", nargs="+", default=["iid", "dirichlet"])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--history", type=int, default=200, help="down_history of step downlinks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs", type=int, nargs="*", help="indices into PAIRS (default: all)")
    ap.add_argument("--out", default="docs/benchmarks/communication.png")
    ap.add_argument("--json", default=None, help="also write every run's records here")
    args = ap.parse_args()
    pairs = [PAIRS[i] for i in args.pairs] if args.pairs else PAIRS
    if pairs[0] != PAIRS[0]:
        pairs = [PAIRS[0], *pairs]
    curves: dict[str, dict[str, list[dict]]] = {}
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        for partition in args.partitions:
            base = one_run(Path(tmp), partition, "", "", args.rounds, None, args)
            target = round(base[-1]["test_accuracy"] - 0.005, 6)
            hit = first_at(base, target)
            base_bytes = hit["cum_bytes_down"] + hit["cum_bytes_up"]
            curves[partition] = {"fp32 / fp32": base}
            print(f"\n{partition}: fp32 final {100 * base[-1]['test_accuracy']:.2f}% after "
                  f"{args.rounds} rounds; target {100 * target:.2f}%, reached by fp32 in round "
                  f"{hit['round']} with {base_bytes / 1e6:.1f} MB")
            print(f"{'uplink':30} {'downlink':28} {'down MB':>9} {'up MB':>8} {'rounds':>6} "
                  f"{'at tgt %':>8} {'× less':>7}")
            for up, down in pairs:
                t0 = time.monotonic()
                try:
                    recs = base if (up, down) == PAIRS[0] else one_run(
                        Path(tmp), partition, up, down, args.max_rounds, target, args)
                except TinyfedError as exc:  # e.g. a pair that diverges: say so, go on
                    print(f"{up or 'fp32':30} {down or 'fp32':28} failed: {exc}")
                    continue
                curves[partition][f"{up or 'fp32'} / {down or 'fp32'}"] = recs
                at = first_at(recs, target)
                last = recs[-1]
                if at is None:
                    print(f"{up or 'fp32':30} {down or 'fp32':28} {'—':>9} {'—':>8} "
                          f"{'>' + str(len(recs)):>6} {100 * last['test_accuracy']:>7.2f} "
                          f"{'not reached':>7}   ({time.monotonic() - t0:.0f} s)")
                    continue
                total = at["cum_bytes_down"] + at["cum_bytes_up"]
                print(f"{up or 'fp32':30} {down or 'fp32':28} {at['cum_bytes_down'] / 1e6:>9.2f} "
                      f"{at['cum_bytes_up'] / 1e6:>8.2f} {at['round']:>6} "
                      f"{100 * at['test_accuracy']:>7.2f} {base_bytes / total:>7.1f}   "
                      f"({time.monotonic() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(curves))
    plot(curves, Path(args.out))
    print(f"\nfigure: {args.out}")
    print("rerun: PYTHONPATH=src python bench/bench_communication.py --rounds "
          f"{args.rounds} --max-rounds {args.max_rounds} --partitions {' '.join(args.partitions)}"
          f" --batch-size {args.batch_size} --lr {args.lr} --history {args.history}")


def plot(curves: dict[str, dict[str, list[dict]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(7 * len(curves), 4.6), squeeze=False)
    for ax, (partition, runs) in zip(axes[0], curves.items()):
        for label, recs in runs.items():
            pts = [((r["cum_bytes_down"] + r["cum_bytes_up"]) / 1e6, 100 * r["test_accuracy"])
                   for r in recs if r.get("test_accuracy") is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label,
                    ls="--" if label.startswith("fp32") else "-")
        ax.set(xscale="log", title=f"FMNIST 2NN, K=100, C=0.1, {partition}",
               xlabel="cumulative bytes, down + up (MB)", ylabel="test accuracy (%)")
        ax.set_ylim(bottom=60)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
