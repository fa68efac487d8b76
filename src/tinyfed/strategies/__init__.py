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


def pick(registry: dict[str, Callable[[Any], Any]], key: str, name: str, config: Any) -> Any:
    """Build the registry entry `name` for config field `key`, or say what is allowed."""
    make = registry.get(name)
    if make is None:
        raise ConfigError(f"unknown {key} {name!r}; allowed: {', '.join(sorted(registry))}")
    return make(config)


def make_strategy(config: Any) -> Strategy:
    return pick(STRATEGIES, "strategy", config.strategy, config)


# Asynchronous rules (mode = "async"), chosen by config.async_rule.
ASYNC_RULES: dict[str, Callable[[Any], AsyncRule]] = {
    "seed-merge": lambda config: SeedMerge(),
    "fedasync": lambda config: FedAsync(config.async_alpha, parse_staleness(config.staleness)),
    "fedbuff": lambda config: FedBuff(config.buffer_size or config.clients_per_round,
                                      config.server_lr, parse_staleness(config.staleness)),
}


def make_async_rule(config: Any) -> AsyncRule:
    return pick(ASYNC_RULES, "async_rule", config.async_rule, config)


__all__ = ["ASYNC_RULES", "Aggregator", "AsyncRule", "FedAvg", "RunningMean", "STRATEGIES",
           "Strategy", "make_async_rule", "make_strategy", "select_clients"]
