"""The same FedAvg work in Flower (simulation engine, Ray backend), for bench/bench_flower.py.

Runs inside the separate virtual environment that `bench_flower.py --setup` makes (flwr is not a
tinyfed dependency), so it imports nothing from tinyfed: it reads Fashion-MNIST from Debian's
files, normalizes as tinyfed does, splits IID with the same kind of seeded permutation, and
trains the paper's 2NN with plain SGD. Prints one JSON line at the end.

    .flower-venv/bin/python bench/flower_fedavg.py --clients 100 --fraction 0.1 --rounds 20
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = struct.unpack(">" + "I" * dims, data[4: 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load():
    x = idx(FMNIST / "train-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    y = idx(FMNIST / "train-labels-idx1-ubyte.gz").astype(np.int64)
    tx = idx(FMNIST / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    ty = idx(FMNIST / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    mean, std = x.mean(), x.std()
    return (x - mean) / std, y, (tx - mean) / std, ty


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200),
                         nn.ReLU(), nn.Linear(200, 10))


def get_weights(model):
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def set_weights(model, arrays):
    model.load_state_dict({k: torch.from_numpy(np.asarray(a)) for k, a in
                           zip(model.state_dict().keys(), arrays)})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--actors", type=int, default=2)
    args = ap.parse_args()

    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    t0 = time.monotonic()
    x, y, tx, ty = load()
    parts = np.array_split(np.random.default_rng(0).permutation(len(y)), args.clients)
    per_round = max(1, round(args.fraction * args.clients))

    class Client(NumPyClient):
        def __init__(self, cid: int):
            self.x = torch.from_numpy(x[parts[cid]])
            self.y = torch.from_numpy(y[parts[cid]])
            self.model = mlp()

        def fit(self, parameters, config):
            torch.set_num_threads(1)
            set_weights(self.model, parameters)
            opt = torch.optim.SGD(self.model.parameters(), lr=args.lr)
            loss_fn = nn.CrossEntropyLoss()
            gen = torch.Generator().manual_seed(int(config.get("round", 0)))
            for _ in range(args.epochs):
                order = torch.randperm(len(self.y), generator=gen)
                for i in range(0, len(order), args.batch_size):
                    b = order[i: i + args.batch_size]
                    opt.zero_grad()
                    loss_fn(self.model(self.x[b]), self.y[b]).backward()
                    opt.step()
            return get_weights(self.model), len(self.y), {}

    def client_fn(context: Context):
        return Client(int(context.node_config["partition-id"])).to_client()

    accuracy: list[float] = []

    def evaluate(server_round, parameters, config):
        model = mlp()
        set_weights(model, parameters)
        with torch.no_grad():
            acc = (model(torch.from_numpy(tx)).argmax(1) == torch.from_numpy(ty)).float().mean()
        accuracy.append(float(acc))
        return 0.0, {"accuracy": float(acc)}

    def server_fn(context: Context):
        strategy = FedAvg(fraction_fit=args.fraction, fraction_evaluate=0.0,
                          min_fit_clients=per_round, min_evaluate_clients=0,
                          min_available_clients=args.clients,
                          initial_parameters=ndarrays_to_parameters(get_weights(mlp())),
                          evaluate_fn=evaluate,
                          on_fit_config_fn=lambda rnd: {"round": rnd})
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=args.rounds))

    run_simulation(server_app=ServerApp(server_fn=server_fn),
                   client_app=ClientApp(client_fn=client_fn), num_supernodes=args.clients,
                   backend_config={"client_resources": {"num_cpus": 2 / args.actors,
                                                        "num_gpus": 0.0}})
    print(json.dumps({"seconds": time.monotonic() - t0,
                      "accuracy": accuracy[-1] if accuracy else None}))


if __name__ == "__main__":
    main()
