"""What the runtime benchmarks share: one loaded experiment per setting, and one timed run of
the server loop over a chosen runtime (start-up timed apart from the rounds)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from tinyfed.config import Config
from tinyfed.experiment import Experiment
from tinyfed.metrics import EventBus
from tinyfed.runtimes import make_runtime
from tinyfed.server import Server
from tinyfed.strategies import make_strategy

_experiments: dict[tuple, Experiment] = {}


def cached_experiment(cfg: Config) -> Experiment:
    """Load the data set and partition once per setting; the config itself is always `cfg`."""
    key = (cfg.dataset, cfg.model, cfg.clients, cfg.seed, cfg.partition)
    if key not in _experiments:
        _experiments[key] = Experiment.build(cfg)
    e = _experiments[key]
    return Experiment(cfg, e.dataset, e.parts, e.initial, e.spec, e.num_parameters)


def timed_run(cfg: Config, threads: int, on_start: Callable[[], None] | None = None,
              after_run: Callable[[Any, Experiment], dict] | None = None
              ) -> tuple[float, Server, dict]:
    """(start-up seconds, the finished server, `after_run(runtime, exp)` taken before close)."""
    exp = cached_experiment(cfg)
    torch.set_num_threads(threads)
    runtime = make_runtime(cfg.runtime, cfg)
    server = Server(exp, runtime, make_strategy(cfg, exp.initial), EventBus(), None)
    t0 = time.perf_counter()
    try:
        runtime.start(exp)
        startup = time.perf_counter() - t0
        if on_start:
            on_start()
        server.run()
        extra = after_run(runtime, exp) if after_run else {}
    finally:
        runtime.close()
    return startup, server, extra
