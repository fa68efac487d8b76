"""What one client task costs besides its training: the per-task wire work of issue 14, item 3.

For the 2NN (Fashion-MNIST shape, fp32 updates, no codec) and one client of 600 examples at
B=10, times each step of a task as every runtime runs it: the server builds the task frame
(`protocol.task_frame`, the payload's CRC memoized once a round), the worker answers it
(`ClientWorker.handle`: frame and CRC checks, decoding, the finiteness check of the global
model, loading, training, encoding the update and its frame) and the server admits the update
(`protocol.read_update`: frame, CRC, header, shapes, finiteness and bounds of every value).
Training alone is timed on the same task (`prepare` + `train_one`), so the worker's wire work
is `handle` minus it. min/median/max over the tasks; one torch thread.

Then a worker reading a batch of 10 task frames that carry the same weights (decoding, checks
and `prepare`, no training), each frame alone against the batch's `wire.PayloadMemo` (the
weights' CRC and finiteness check once a batch), alternating.

    PYTHONPATH=src python bench/bench_task_cost.py [--tasks 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from tinyfed import wire
from tinyfed.client import TrainSettings, task_seed
from tinyfed.config import build_config
from tinyfed.experiment import Experiment
from tinyfed.protocol import ClientTask, ClientWorker, Expectation, read_update, task_frame


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = build_config(dict(dataset="synthetic", synthetic_size=6000, model="mlp", clients=10))
    exp = Experiment.build(cfg)
    worker = ClientWorker(cfg.model, exp.dataset.input_shape, exp.dataset.num_classes,
                          exp.shard)
    payload = wire.encode_tensors(exp.initial)
    crc = wire.CrcMemo()(payload)
    settings = TrainSettings(epochs=1, batch_size=10, lr=0.05)
    times: dict[str, list[float]] = {"task frame": [], "handle": [], "training": [],
                                     "admit update": []}
    for i in range(args.tasks + 5):
        task = ClientTask(i % 10, 1, task_seed(0, 1, i), settings, "")
        t0 = time.perf_counter()
        frame = task_frame(task, payload, crc)
        t1 = time.perf_counter()
        reply = worker.handle(frame)
        t2 = time.perf_counter()
        worker.train_one(worker.prepare(task, wire.decode_frame(frame).tensors))
        t3 = time.perf_counter()
        result = read_update(reply, Expectation(task, exp.initial, exp.spec, 10**6))
        t4 = time.perf_counter()
        assert result.ok, result.reason
        if i >= 5:  # the first tasks warm caches
            for key, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[key].append(seconds * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, load "
          f"{os.getloadavg()[0]:.2f}; 2NN, 600 examples, B=10, {args.tasks} tasks; "
          f"frames {len(frame):,} B down, {len(reply):,} B up")
    for key, values in times.items():
        print(f"  {key:13} {min(values):7.3f} / {med[key]:7.3f} / {max(values):7.3f} ms")
    wire_ms = med["task frame"] + med["handle"] - med["training"] + med["admit update"]
    print(f"  per-task wire work (medians: frame + handle − training + admit): {wire_ms:.2f} ms"
          f" = {100 * wire_ms / med['training']:.1f} % of the task's training")
    batch = [task_frame(ClientTask(i, 1, task_seed(0, 1, i), settings, ""), payload, crc)
             for i in range(10)]
    per_task: dict[str, list[float]] = {"each frame alone": [], "one memo a batch": []}
    for i in range(args.tasks + 5):
        for label in per_task:
            memo = wire.PayloadMemo() if label == "one memo a batch" else None
            t0 = time.perf_counter()
            for frame in batch:
                msg = wire.decode_frame(frame, worker.max_frame, memo)
                worker.prepare(ClientTask.from_header(msg.header), msg.tensors, msg.memory,
                               memo.checked if memo is not None else None)
            if i >= 5:
                per_task[label].append((time.perf_counter() - t0) * 1e3 / len(batch))
    print("  reading a batch of 10 task frames (decode + checks + prepare), per task:")
    for label, values in per_task.items():
        print(f"    {label:17} {min(values):7.3f} / {statistics.median(values):7.3f} / "
              f"{max(values):7.3f} ms")
    saved = statistics.median(per_task["each frame alone"]) - statistics.median(
        per_task["one memo a batch"])
    print(f"    saved per task: {saved:.3f} ms = {100 * saved / med['training']:.1f} % of the "
          f"task's training")
    print(f"rerun: PYTHONPATH=src python bench/bench_task_cost.py --tasks {args.tasks}")


if __name__ == "__main__":
    main()
