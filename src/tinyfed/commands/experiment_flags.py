"""The experiment flags shared by `run` and `serve`: each maps onto one config key."""

from __future__ import annotations

import argparse
from typing import Any

from tinyfed.config import BUILTIN_MODELS, Config, load_config, parse_set

# (flag, config key, type, help); choices come from the config's own types.
FLAGS: list[tuple[str, str, Any, str]] = [
    ("--dataset", "dataset", str, "fmnist | mnist | cifar10 | synthetic"),
    ("--data-dir", "data_dir", str, "folder holding the data set files (or TINYFED_DATA)"),
    ("--model", "model", str, f"{' | '.join(BUILTIN_MODELS)} | package.module:factory"),
    ("--clients", "clients", int, "number of clients K"),
    ("--partition", "partition", str, "iid | shards | dirichlet | ranges | classes"),
    ("--alpha", "alpha", float, "Dirichlet concentration (dirichlet partition)"),
    ("--shards-per-client", "shards_per_client", int, "shards per client (shards partition)"),
    ("--classes-per-client", "classes_per_client", int, "labels per client (classes partition)"),
    ("--range-size", "range_size", int, "examples per client (ranges partition)"),
    ("--fraction", "fraction", float, "fraction C of clients per round, in (0, 1]"),
    ("--epochs", "epochs", int, "local epochs E"),
    ("--batch-size", "batch_size", int, "local batch size B; 0 = full batch (FedSGD)"),
    ("--lr", "lr", float, "client learning rate"),
    ("--momentum", "momentum", float, "client SGD momentum"),
    ("--optimizer", "optimizer", str, "sgd | adam"),
    ("--lr-decay", "lr_decay", float, "lr multiplier per round, in (0, 1]"),
    ("--rounds", "rounds", int, "number of rounds R"),
    ("--target-accuracy", "target_accuracy", float, "stop when test accuracy reaches this"),
    ("--seed", "seed", int, "run seed"),
    ("--strategy", "strategy", str, "aggregation rule"),
    ("--mode", "mode", str, "sync (rounds) | async (merge each update as it arrives)"),
    ("--async-rule", "async_rule", str, "async merge rule: seed-merge | fedasync | fedbuff"),
    ("--concurrency", "concurrency", int, "async: clients busy at once (default C·K)"),
    ("--async-alpha", "async_alpha", float, "FedAsync mixing weight α in (0, 1]"),
    ("--staleness", "staleness", str, "async staleness: constant | polynomial:A | hinge:A,B"),
    ("--buffer-size", "buffer_size", int, "FedBuff: updates per server step (default C·K)"),
    ("--server-lr", "server_lr", float, "FedBuff: server learning rate η"),
    ("--runtime", "runtime", str, "inprocess | processes | http | ray"),
    ("--workers", "workers", int, "client processes / actors"),
    ("--ray-address", "ray_address", str, "ray runtime: cluster to attach to, auto | HOST:PORT"),
    ("--cpus-per-client", "cpus_per_client", float, "ray runtime: CPUs per actor (default 1)"),
    ("--min-clients", "min_clients", int, "fewest successful clients for a round to count"),
    ("--round-timeout", "round_timeout", float, "seconds before a round drops its stragglers"),
    ("--eval-every", "eval_every", int, "evaluate the global model every N rounds"),
    ("--checkpoint-every", "checkpoint_every", int, "checkpoint every N rounds"),
    ("--codec", "codec", str, "uplink codec pipeline, e.g. delta+topk:0.01+int8"),
    ("--down-codec", "down_codec", str, "downlink codec pipeline"),
    ("--out", "out", str, "run folder (default runs/<time>-<dataset>-<model>)"),
]


def add_experiment_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("experiment (override --config)")
    group.add_argument("--config", metavar="FILE.toml", help="config file with any config keys")
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config key (repeatable)")
    for flag, key, typ, help_text in FLAGS:
        group.add_argument(flag, dest=key, type=typ, default=None, help=help_text)
    group.add_argument("--deterministic", action="store_const", const=True, default=None,
                       help="one thread per client: bit-identical results across runtimes")
    group.add_argument("--respawn", dest="respawn", action="store_const", const=True,
                       default=None, help="restart a failed client process (the default)")
    group.add_argument("--no-respawn", dest="respawn", action="store_const", const=False,
                       default=None, help="do not restart a failed client process")
    group.add_argument("--print-config", action="store_true",
                       help="print the effective config as TOML and exit")


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """--set values, then explicit flags (only those the user gave)."""
    values = parse_set(args.set)
    for key in [*(f[1] for f in FLAGS), "deterministic", "respawn"]:
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    return values


def config_from(args: argparse.Namespace) -> Config:
    return load_config(args.config, overrides_from(args))
