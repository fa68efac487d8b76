"""Aggregation rules, looked up by name (no if/elif over algorithm names)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tinyfed.errors import ConfigError
from tinyfed.strategies.async_merge import AsyncRule, FedAsync, FedBuff, SeedMerge, parse_staleness
from tinyfed.strategies.base import Aggregator, Strategy, select_clients
from tinyfed.strategies.fedavg import FedAvg, RunningMean

STRATEGIES: dict[str, Callable[[Any], Strategy]] = {
    "fedavg": lambda config: FedAvg(),
}


def make_strategy(config: Any) -> Strategy:
    make = STRATEGIES.get(config.strategy)
    if make is None:
        raise ConfigError(
            f"unknown strategy {config.strategy!r}; allowed: {', '.join(sorted(STRATEGIES))}"
        )
    return make(config)


# Asynchronous rules (mode = "async"), chosen by config.async_rule.
ASYNC_RULES: dict[str, Callable[[Any], AsyncRule]] = {
    "seed-merge": lambda config: SeedMerge(),
    "fedasync": lambda config: FedAsync(config.async_alpha, parse_staleness(config.staleness)),
    "fedbuff": lambda config: FedBuff(config.buffer_size or config.clients_per_round,
                                      config.server_lr, parse_staleness(config.staleness)),
}


def make_async_rule(config: Any) -> AsyncRule:
    make = ASYNC_RULES.get(config.async_rule)
    if make is None:
        raise ConfigError(
            f"unknown async_rule {config.async_rule!r}; allowed: {', '.join(sorted(ASYNC_RULES))}"
        )
    return make(config)


__all__ = ["ASYNC_RULES", "Aggregator", "AsyncRule", "FedAvg", "RunningMean", "STRATEGIES",
           "Strategy", "make_async_rule", "make_strategy", "select_clients"]
