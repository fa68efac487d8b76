"""Aggregation rules, looked up by name (no if/elif over algorithm names).

A synchronous strategy is built from the config and the initial weights; `package.module:Class`
names a user's own (called the same way). See `base.Strategy` for what one offers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tinyfed.errors import ConfigError
from tinyfed.strategies.async_merge import AsyncRule, FedAsync, FedBuff, SeedMerge, parse_staleness
from tinyfed.strategies.base import Aggregator, Defaults, Instructions, Strategy, select_clients
from tinyfed.strategies.dp import DPFedAvg
from tinyfed.strategies.fedavg import FedAvg, RunningMean
from tinyfed.strategies.fednova import FedNova
from tinyfed.strategies.fedopt import FedAvgM, FedOpt
from tinyfed.strategies.fedprox import FedProx
from tinyfed.strategies.robust import Krum, Median, TrimmedMean
from tinyfed.strategies.scaffold import Scaffold
from tinyfed.wire import Tensors

Factory = Callable[[Any, Tensors], Strategy]


def _lr(config: Any, default: float) -> float:
    return config.server_lr if config.server_lr is not None else default


def _fedopt(name: str, default_lr: float) -> Factory:
    return lambda c, w: FedOpt(name, _lr(c, default_lr), c.beta1, c.beta2, c.tau)


def _dp(c: Any, w: Tensors) -> DPFedAvg:
    return DPFedAvg(clip=c.dp_clip, noise=c.dp_noise, delta=c.dp_delta,
                    planned=c.clients_per_round, num_clients=c.clients, seed=c.seed,
                    adaptive=c.dp_adaptive, quantile=c.dp_quantile, clip_lr=c.dp_clip_lr,
                    target_epsilon=c.target_epsilon)


STRATEGIES: dict[str, Factory] = {
    "fedavg": lambda c, w: FedAvg(),
    "fedavg-uniform": lambda c, w: FedAvg(weighted=False),
    "fedavgm": lambda c, w: FedAvgM(_lr(c, 1.0), c.server_momentum),
    "fedprox": lambda c, w: FedProx(c.mu),
    "scaffold": lambda c, w: Scaffold(w, c.clients, _lr(c, 1.0)),
    "fednova": lambda c, w: FedNova(c.epochs, c.batch_size, c.momentum),
    "fedadagrad": _fedopt("fedadagrad", 0.03),
    "fedadam": _fedopt("fedadam", 0.01),
    "fedyogi": _fedopt("fedyogi", 0.01),
    "median": lambda c, w: Median(),
    "trimmed-mean": lambda c, w: TrimmedMean(c.trim_fraction),
    "krum": lambda c, w: Krum(c.krum_f, 1),
    "multi-krum": lambda c, w: Krum(c.krum_f, c.krum_m or c.clients_per_round - c.krum_f),
    "dp-fedavg": _dp,
}


def pick(registry: dict[str, Callable[..., Any]], key: str, name: str, *args: Any) -> Any:
    """Build the registry entry `name` for config field `key`, or say what is allowed."""
    make = registry.get(name)
    if make is None:
        raise ConfigError(f"unknown {key} {name!r}; allowed: {', '.join(sorted(registry))}")
    return make(*args)


def make_strategy(config: Any, initial: Tensors) -> Strategy:
    """The config's strategy: a registered name, or `package.module:Class` called with
    (config, initial weights)."""
    if ":" in config.strategy:
        from tinyfed.importpath import load_callable

        return load_callable(config.strategy, "strategy", ConfigError)(config, initial)
    return pick(STRATEGIES, "strategy", config.strategy, config, initial)


# Asynchronous rules (mode = "async"), chosen by config.async_rule.
ASYNC_RULES: dict[str, Callable[[Any], AsyncRule]] = {
    "seed-merge": lambda config: SeedMerge(),
    "fedasync": lambda config: FedAsync(config.async_alpha, parse_staleness(config.staleness)),
    "fedbuff": lambda config: FedBuff(config.buffer_size or config.clients_per_round,
                                      _lr(config, 1.0), parse_staleness(config.staleness)),
}


def make_async_rule(config: Any) -> AsyncRule:
    return pick(ASYNC_RULES, "async_rule", config.async_rule, config)


__all__ = ["ASYNC_RULES", "Aggregator", "AsyncRule", "DPFedAvg", "Defaults", "FedAvg",
           "FedAvgM", "FedNova", "FedOpt", "FedProx", "Instructions", "Krum", "Median",
           "RunningMean", "STRATEGIES", "Scaffold", "Strategy", "TrimmedMean",
           "make_async_rule", "make_strategy", "select_clients"]
