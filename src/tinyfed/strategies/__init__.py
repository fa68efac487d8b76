"""Aggregation rules, looked up by name (no if/elif over algorithm names)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tinyfed.errors import ConfigError
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


__all__ = ["Aggregator", "FedAvg", "RunningMean", "STRATEGIES", "Strategy", "make_strategy",
           "select_clients"]
