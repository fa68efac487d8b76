"""How a run spends its clients, by name (config `mode`): synchronous rounds or asynchronous
merging. Both are policies over the same run core and runtime; a new one (e.g. semi-sync) is
one entry here and a module of its own."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinyfed.errors import ConfigError
from tinyfed.experiment import Experiment
from tinyfed.metrics import EventBus
from tinyfed.runtimes.base import Runtime


def synchronous(experiment: Experiment, runtime: Runtime, bus: EventBus,
                checkpoint_dir: Path | None, strategy: Any = None) -> Any:
    """Rounds: select, train, aggregate (server.Server with the config's strategy, or one
    given from Python)."""
    from tinyfed.server import Server
    from tinyfed.strategies import make_strategy

    return Server(experiment, runtime,
                  strategy or make_strategy(experiment.config, experiment.initial), bus,
                  checkpoint_dir)


def asynchronous(experiment: Experiment, runtime: Runtime, bus: EventBus,
                 checkpoint_dir: Path | None, strategy: Any = None) -> Any:
    """Every accepted update merged as it arrives (async_loop.AsyncServer, config async_rule)."""
    from tinyfed.async_loop import AsyncServer
    from tinyfed.strategies import make_async_rule

    if strategy is not None:
        raise ConfigError("a strategy object applies to mode 'sync'; async merges by async_rule")
    return AsyncServer(experiment, runtime, make_async_rule(experiment.config), bus,
                       checkpoint_dir)


MODES: dict[str, Callable[..., Any]] = {
    "sync": synchronous,
    "async": asynchronous,
}
