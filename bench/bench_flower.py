"""tinyfed against a plain PyTorch loop and Flower (simulation engine, Ray, 2 actors), same work.

Each contestant is a separate process; its whole wall time and its process tree's peak PSS
(sampled every 0.1 s, as bench_memory.py does) are measured, contestants alternating, `--repeats`
times; min/median/max are printed. Flower is not a tinyfed dependency: `--setup` makes its own
virtual environment (`.flower-venv`, flwr[simulation] 1.42.0 and torch 2.13.0) and
`bench/flower_fedavg.py` runs there.

Configs (FMNIST, 2NN, lr 0.05, IID): A = K 100, C 0.1, E 1, B 10, 20 rounds;
B = K 10, C 1, E 1, B 10, 5 rounds.

    PYTHONPATH=src python bench/bench_flower.py --setup          # once: the Flower venv
    PYTHONPATH=src python bench/bench_flower.py [--configs A B] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import pss_kib, tree  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".flower-venv"
CONFIGS = {"A": dict(clients=100, fraction=0.1, epochs=1, batch=10, rounds=20),
           "B": dict(clients=10, fraction=1.0, epochs=1, batch=10, rounds=5)}


def setup() -> None:
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "flwr[simulation]==1.42.0",
                    "torch==2.13.0", "numpy"], check=True)


def commands(c: dict, out: Path) -> dict[str, list[str]]:
    common = ["--clients", str(c["clients"]), "--fraction", str(c["fraction"]), "--epochs",
              str(c["epochs"]), "--batch-size", str(c["batch"]), "--rounds", str(c["rounds"])]
    tiny = [sys.executable, "-m", "tinyfed", "run", *common, "--lr", "0.05", "--plain",
            "--checkpoint-every", "1000000"]
    return {
        "plain loop": [sys.executable, str(ROOT / "bench" / "plain_fedavg.py"), *common],
        "tinyfed inprocess": [*tiny, "--out", str(out / "inproc")],
        "tinyfed processes (2)": [*tiny, "--runtime", "processes", "--workers", "2", "--out",
                                  str(out / "procs")],
        "flower + ray (2 actors)": [str(VENV / "bin" / "python"),
                                    str(ROOT / "bench" / "flower_fedavg.py"), *common,
                                    "--actors", "2"],
    }


def final_accuracy(stdout: str) -> float | None:
    """The last test accuracy a contestant printed: a JSON line's (plain loop, Flower) or
    tinyfed's report line."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{") and '"accuracy"' in line:
            return json.loads(line)["accuracy"]
        found = re.match(r"test accuracy\s+([\d.]+)%", line)
        if found:
            return float(found.group(1)) / 100
    return None


def measure(cmd: list[str]) -> tuple[float, float, float | None]:
    """(wall seconds, peak tree PSS MiB, final test accuracy) of one command run to its end."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, env=env)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, sum(pss_kib(p) for p in tree(proc.pid)))
            time.sleep(0.1)
        wall = time.monotonic() - t0
        if proc.returncode:
            err = proc.stderr.read().decode(errors="replace").strip().splitlines()
            raise SystemExit(f"{cmd[:4]}… failed ({proc.returncode}): {err[-1] if err else ''}")
        out.seek(0)
        return wall, peak / 1024, final_accuracy(out.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setup", action="store_true", help="make .flower-venv and exit")
    ap.add_argument("--configs", nargs="+", default=["A", "B"], choices=sorted(CONFIGS))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.setup:
        setup()
        return
    if not (VENV / "bin" / "python").exists():
        raise SystemExit(f"no Flower environment at {VENV}; run with --setup first")
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load "
          f"{os.getloadavg()[0]:.2f}, {os.cpu_count()} cores")
    for name in args.configs:
        results: dict[str, list[tuple[float, float, float | None]]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.repeats):
                for label, cmd in commands(CONFIGS[name], Path(tmp) / str(i)).items():
                    results.setdefault(label, []).append(measure(cmd))
        print(f"\nconfig {name}: {json.dumps(CONFIGS[name])}")
        print(f"{'contestant':26} {'wall s (min/med/max)':>24} {'peak PSS MiB (min/med/max)':>28}"
              f"  final accuracy")
        for label, runs in results.items():
            w = [r[0] for r in runs]
            m = [r[1] for r in runs]
            acc = sorted({f"{100 * r[2]:.2f}%" for r in runs if r[2] is not None})
            print(f"{label:26} {min(w):>7.1f}/{statistics.median(w):>6.1f}/{max(w):>6.1f}   "
                  f"{min(m):>8.0f}/{statistics.median(m):>6.0f}/{max(m):>6.0f}  {', '.join(acc)}")
        plain = statistics.median(r[0] for r in results["plain loop"])
        flower = statistics.median(r[0] for r in results["flower + ray (2 actors)"])
        for label in ("tinyfed inprocess", "tinyfed processes (2)"):
            mine = statistics.median(r[0] for r in results[label])
            print(f"Flower / {label}: {flower / mine:.2f}× (median wall); {label} / plain loop: "
                  f"{mine / plain:.2f}×")
    print(f"rerun: PYTHONPATH=src python bench/bench_flower.py --configs {' '.join(args.configs)}"
          f" --repeats {args.repeats}")


if __name__ == "__main__":
    main()
