"""A plain PyTorch FedAvg loop with no framework: the baseline tinyfed's overhead is measured
against. Same model, split, hyper-parameters and seed policy as `tinyfed run`; no frames, no
checkpoints, no metrics files. Prints one JSON line per round.

    python bench/plain_fedavg.py --clients 100 --fraction 0.1 --rounds 20 [--model cnn]
        [--out DIR: also DIR/metrics.jsonl with each round's wall_seconds, as tinyfed writes]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from tinyfed.client import task_seed
from tinyfed.data import load_dataset, partition
from tinyfed.models import build_model
from tinyfed.strategies import select_clients


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads; 0 = torch's default")
    ap.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_dataset("fmnist")  # loading is not what is measured
    parts = partition(data.train_y, args.clients, "iid", seed=args.seed)
    shards = [(data.train_x[torch.as_tensor(p)], data.train_y[torch.as_tensor(p)]) for p in parts]
    model = build_model(args.model, data.input_shape, data.num_classes, args.seed)
    global_w = {k: v.clone() for k, v in model.state_dict().items()}
    per_round = max(1, round(args.fraction * args.clients))
    loss_fn = nn.CrossEntropyLoss()
    metrics = None
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        metrics = (args.out / "metrics.jsonl").open("w")
    for rnd in range(1, args.rounds + 1):
        start = time.monotonic()
        sums = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_w.items()}
        total = 0
        for cid in select_clients(list(range(args.clients)), per_round, args.seed, rnd):
            x, y = shards[cid]
            model.load_state_dict(global_w)
            opt = torch.optim.SGD(model.parameters(), lr=args.lr)
            gen = torch.Generator().manual_seed(task_seed(args.seed, rnd, cid))
            model.train()
            for _ in range(args.epochs):
                order = torch.randperm(len(y), generator=gen)
                for lo in range(0, len(y), args.batch_size):
                    idx = order[lo : lo + args.batch_size]
                    opt.zero_grad()
                    loss_fn(model(x[idx]), y[idx]).backward()
                    opt.step()
            for k, v in model.state_dict().items():
                sums[k] += v.double() * len(y)
            total += len(y)
        global_w = {k: (s / total).float() for k, s in sums.items()}
        model.load_state_dict(global_w)
        model.eval()
        with torch.no_grad():  # in chunks of 1,000, as tinyfed evaluates (the CNN's activations)
            pred = torch.cat([model(xb).argmax(1) for xb in data.test_x.split(1000)])
            acc = float((pred == data.test_y).float().mean())
        seconds = time.monotonic() - start
        print(json.dumps({"round": rnd, "seconds": seconds, "accuracy": acc}), flush=True)
        if metrics is not None:
            metrics.write(json.dumps({"round": rnd, "wall_seconds": seconds}) + "\n")
            metrics.flush()


if __name__ == "__main__":
    main()
