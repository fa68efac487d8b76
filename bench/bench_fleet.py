"""A study on a simulated fleet: time and energy to accuracy for sync FedAvg (with and without a
deadline and over-selection) and FedBuff async, each at fp32 and with the best codec pair; what
the slowest 10% of devices cost a synchronous run; and the simulator's wall-time overhead.

FMNIST, 2NN, K=100, C=0.1, E=1, B=50, lr 0.1, on the fleet below (10% NB-IoT meters: the slow
tail). Real training happens; only the clock and the energy are simulated.

Rerun:  PYTHONPATH=src python bench/bench_fleet.py [--rounds 100] [--overhead-repeats 3]
        [--out docs/fleet.png]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from tinyfed.api import run
from tinyfed.errors import TinyfedError

FLEET = "phones-lte:0.6,raspberry-pi-wifi:0.3,nbiot-meters:0.1"
BEST = ("delta+stc:0.01+zstd", "delta+stc:0.005+zstd")  # see docs/benchmarks/communication.md
COMMON = dict(dataset="fmnist", model="mlp", clients=100, fraction=0.1, epochs=1, batch_size=50,
              lr=0.1, seed=0, checkpoint_every=10**6, sim_start_hour=22, down_history=300)


def setups(rounds: int, deadline: float) -> list[tuple[str, dict]]:
    out = []
    for tag, (up, down) in (("fp32", ("", "")), ("stc", BEST)):
        codecs = dict(codec=up, down_codec=down)
        out += [
            (f"sync, {tag}", dict(rounds=rounds, **codecs)),
            (f"sync + deadline {deadline:g} s + over-select 1.3, {tag}",
             dict(rounds=rounds, sim_deadline=deadline, over_select=1.3, **codecs)),
            (f"fedbuff async, {tag}", dict(rounds=rounds, mode="async", async_rule="fedbuff",
                                           concurrency=20, buffer_size=10, **codecs)),
        ]
    for _, over in out:
        if over.get("mode") == "async" and over["down_codec"].startswith("delta"):
            over["down_codec"] = "qsgd:8+zstd"  # steps need rounds; async sends whole models
    return out


def first_at(records, target):
    return next((r for r in records if (r.get("test_accuracy") or 0) >= target), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--deadline", type=float, default=60.0, help="sim seconds a sync round")
    ap.add_argument("--target", type=float, default=0.80)
    ap.add_argument("--overhead-repeats", type=int, default=3)
    ap.add_argument("--overhead-rounds", type=int, default=30)
    ap.add_argument("--out", default="docs/fleet.png")
    args = ap.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load "
          f"{os.getloadavg()[0]:.2f}; fleet {FLEET}; target {100 * args.target:.0f}%")
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'setup':48} {'final %':>7} {'sim h':>7} {'kJ':>8} {'h to tgt':>8} "
              f"{'kJ to tgt':>9} {'missed':>6} {'over':>5} {'unavail':>7}")
        for label, over in setups(args.rounds, args.deadline):
            name = label.replace(" ", "_").replace(",", "").replace("+", "")
            try:
                res = run(fleet=FLEET, out=str(Path(tmp) / name), **{**COMMON, **over})
            except TinyfedError as exc:
                print(f"{label:48} failed: {exc}")
                continue
            recs = [r for r in res.history if r.get("kind", "round") == "round"]
            curves[label] = recs
            last, hit = recs[-1], first_at(recs, args.target)
            sums = {k: sum(r.get(k, 0) for r in recs) for k in ("missed_deadline",
                                                                 "over_selected", "unavailable")}
            to_h = f"{hit['sim_hours']:.2f}" if hit else "—"
            to_j = f"{hit['cum_energy_j'] / 1e3:.2f}" if hit else "—"
            print(f"{label:48} {100 * last['test_accuracy']:>7.2f} {last['sim_hours']:>7.2f} "
                  f"{last['cum_energy_j'] / 1e3:>8.2f} {to_h:>8} {to_j:>9} "
                  f"{sums['missed_deadline']:>6} {sums['over_selected']:>5} "
                  f"{sums['unavailable']:>7}")
        overhead(Path(tmp), args)
    plot(curves, Path(args.out))
    print(f"figure: {args.out}")
    print(f"rerun: PYTHONPATH=src python bench/bench_fleet.py --rounds {args.rounds} --deadline "
          f"{args.deadline:g} --target {args.target} --overhead-repeats {args.overhead_repeats}")


def overhead(tmp: Path, args) -> None:
    """The same run with and without the fleet, alternating; wall time in rounds."""
    ratios, walls = [], {"plain": [], "fleet": []}
    for i in range(args.overhead_repeats):
        for kind in ("plain", "fleet"):
            extra = dict(fleet=FLEET) if kind == "fleet" else {}
            res = run(out=str(tmp / f"oh-{kind}-{i}"), **{**COMMON, "rounds":
                                                          args.overhead_rounds, **extra})
            walls[kind].append(res.state.elapsed)
        ratios.append(walls["fleet"][-1] / walls["plain"][-1])
    print(f"overhead, {args.overhead_rounds} rounds, in-process, alternating: plain "
          f"{min(walls['plain']):.1f}/{statistics.median(walls['plain']):.1f}/"
          f"{max(walls['plain']):.1f} s, fleet {min(walls['fleet']):.1f}/"
          f"{statistics.median(walls['fleet']):.1f}/{max(walls['fleet']):.1f} s "
          f"(min/median/max); pair ratio {min(ratios):.3f}/{statistics.median(ratios):.3f}/"
          f"{max(ratios):.3f}")


def plot(curves, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    for label, recs in curves.items():
        pts = [(r["sim_hours"], r["cum_energy_j"] / 1e3, 100 * r["test_accuracy"]) for r in recs
               if r.get("test_accuracy") is not None]
        style = "--" if "fp32" in label else "-"
        axes[0].plot([p[0] for p in pts], [p[2] for p in pts], style, label=label)
        axes[1].plot([p[1] for p in pts], [p[2] for p in pts], style, label=label)
    axes[0].set(title=f"FMNIST 2NN on {FLEET}", xlabel="simulated hours (log)",
                ylabel="test accuracy (%)", xscale="log")
    axes[1].set(title="… against the energy of all devices", xlabel="energy (kJ, log)",
                ylabel="test accuracy (%)", xscale="log")
    for ax in axes:
        ax.set_ylim(bottom=50)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
