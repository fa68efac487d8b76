"""How much two clients side by side can beat one client on every core: the two-core ceiling.

The paper's CNN trains through autograd (tinyfed's path for a known conv `nn.Sequential`:
channels-last convolutions, linear layers stepped in backward, `trainers.train_known_sequential`).
Training clients side by side (in-process lanes, or worker processes) beats one client after
another on all cores by at most (the rate of two one-thread clients running at once) ÷ (the rate
of one client on every thread). This measures both, per SGD step at B=10 on a synthetic shard:

- one client alone on 1 torch thread, and alone on every thread;
- two clients at once on 1 torch thread each: as two Python threads of one process (lanes) and
  as two processes (workers).

Modes alternate, `--repeats` times; min/median/max of the milliseconds per step are printed, then
the ratios. Run on an otherwise idle machine.

    PYTHONPATH=src python bench/bench_side_by_side.py [--steps 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

from tinyfed.client import Shard, TrainSettings
from tinyfed.models import build_model
from tinyfed.trainers import train_known_sequential

BATCH = 10
WARM_STEPS = 20


def step_ms(steps: int, seed: int = 0) -> float:
    """Milliseconds per SGD step of one CNN client trained on this thread (after a warm-up)."""
    model = build_model("cnn", (1, 28, 28), 10, seed)
    settings = TrainSettings(epochs=1, batch_size=BATCH, lr=0.05)
    gen = torch.Generator().manual_seed(seed)

    def shard(n: int) -> Shard:
        return Shard(torch.randn(n * BATCH, 1, 28, 28, generator=gen),
                     torch.randint(0, 10, (n * BATCH,), generator=gen))

    train_known_sequential(model, shard(WARM_STEPS), settings, seed)
    work = shard(steps)
    t0 = time.perf_counter()
    train_known_sequential(model, work, settings, seed)
    return (time.perf_counter() - t0) / steps * 1e3


def alone(steps: int, threads: int) -> list[float]:
    torch.set_num_threads(threads)
    return [step_ms(steps)]


def lanes(steps: int) -> list[float]:
    """Two clients on two Python threads of this process, torch on one thread (as lanes)."""
    torch.set_num_threads(1)
    out: list[float] = []
    pool = [threading.Thread(target=lambda s=s: out.append(step_ms(steps, s))) for s in (1, 2)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return out


def processes(steps: int) -> list[float]:
    """Two clients in two processes, torch on one thread each (as worker processes)."""
    cmd = [sys.executable, __file__, "--child", "--steps", str(steps)]
    kids = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [k.communicate()[0] for k in kids]
    if any(k.returncode for k in kids):
        raise SystemExit("a child process failed")
    return [float(o.strip().splitlines()[-1]) for o in outs]


def show(label: str, values: list[float]) -> None:
    values = sorted(values)
    print(f"{label:<44} {values[0]:6.2f} / {statistics.median(values):6.2f} / "
          f"{values[-1]:6.2f} ms a step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(f"{alone(args.steps, 1)[0]:.4f}")
        return
    cores = os.cpu_count() or 1
    modes = {
        "one client, 1 thread": lambda: alone(args.steps, 1),
        f"one client, {cores} threads": lambda: alone(args.steps, cores),
        "two clients at once: lanes (threads)": lambda: lanes(args.steps),
        "two clients at once: processes": lambda: processes(args.steps),
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    print(f"CNN, B={BATCH}, {args.steps} steps a client, {args.repeats} alternating repeats, "
          f"load {os.getloadavg()[0]:.2f} at start")
    for _ in range(args.repeats):
        for name, run in modes.items():
            times[name] += run()
    for name, values in times.items():
        show(name, values)
    one = statistics.median(times["one client, 1 thread"])
    many = statistics.median(times[f"one client, {cores} threads"])
    print(f"one client on {cores} threads ÷ on 1: {one / many:.2f}×")
    for name in ("two clients at once: lanes (threads)", "two clients at once: processes"):
        both = 2 * one / statistics.median(times[name])
        print(f"{name}: {both:.2f}× one thread's rate; ceiling against one client on {cores} "
              f"threads: {both * many / one:.2f}×")
    print(f"load {os.getloadavg()[0]:.2f} at end\n"
          f"rerun: PYTHONPATH=src python bench/bench_side_by_side.py --steps {args.steps} "
          f"--repeats {args.repeats}")


if __name__ == "__main__":
    main()
