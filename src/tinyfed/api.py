"""The Python API: `tinyfed.run(...)` does what `tinyfed run` does, and the CLI is a thin layer
over the same `runner.execute`.

    import tinyfed
    result = tinyfed.run(dataset=(train_x, train_y, test_x, test_y), model=make_model,
                         clients=20, partition="dirichlet", rounds=10,
                         callbacks=[lambda record: print(record["round"])])
    result.history, result.weights, result.run_dir.path

Everything `Config` holds can be given as a keyword; `config` may be a `Config`, a dict or a
TOML path, and keywords override it. A model, data set or strategy given as a Python object
is used as is; for runtimes that start other processes, a data set must be named by
`package.module:factory` (a function every process can import). The pieces, for people who
write their own loop: `Experiment`, `RunCore`, `Server` / `AsyncServer`, the runtimes.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tinyfed.config import Config, build_config, read_toml
from tinyfed.errors import ConfigError
from tinyfed.metrics import Record
from tinyfed.runner import RunResult, execute, open_run


def make_config(config: Config | dict | str | Path | None = None, **settings: Any) -> Config:
    """A validated Config from a Config, dict or TOML path, with keyword overrides."""
    if config is None:
        values: dict[str, Any] = {}
    elif isinstance(config, Config):
        values = config.model_dump()
    elif isinstance(config, dict):
        values = dict(config)
    elif isinstance(config, (str, Path)):
        values = read_toml(config)
    else:
        raise ConfigError(f"config must be a Config, a dict or a TOML path, not "
                          f"{type(config).__name__}")
    values.update(settings)
    return build_config(values)


def run(config: Config | dict | str | Path | None = None, *,
        model: str | Callable | None = None,
        dataset: str | Any | None = None,
        strategy: str | Any | None = None,
        callbacks: Iterable[Callable[[Record], None]] = (),
        resume: str | Path | None = None,
        progress: bool = False,
        **settings: Any) -> RunResult:
    """Train to the end and return the run's result (folder, final weights, history).

    `model`: a built-in name, `package.module:factory`, or a factory
    `(input_shape, num_classes) -> torch.nn.Module`. `dataset`: a built-in name,
    `package.module:factory`, or a data set object (see `tinyfed.data.user`). `strategy`: a
    registered name or an object with `begin_round`, `state_dict` and `load_state_dict`.
    `callbacks` receive every record as it is published. `progress` prints the console table.
    """
    from tinyfed import models
    from tinyfed.data import user

    if callable(model) and not isinstance(model, str):
        settings["model"] = models.register(model)
    elif model is not None:
        settings["model"] = model
    if dataset is not None and not isinstance(dataset, str):
        settings["dataset"] = user.register(dataset)
    elif dataset is not None:
        settings["dataset"] = dataset
    if strategy is not None and not isinstance(strategy, str):
        for method in ("begin_round", "state_dict", "load_state_dict"):
            if not callable(getattr(strategy, method, None)):
                raise ConfigError(f"strategy object {type(strategy).__name__} has no "
                                  f"{method}(); see tinyfed.strategies.Strategy")
    elif strategy is not None:
        settings["strategy"] = strategy
    cfg = make_config(config, **settings)
    local = [name for name, is_local in (
        (cfg.dataset, cfg.dataset.startswith(user.LOCAL_PREFIX)),
        (cfg.model, cfg.model.startswith("__main__:") or "<locals>" in cfg.model)) if is_local]
    if local and cfg.runtime != "inprocess":
        raise ConfigError(f"{local[0]!r} exists in this Python process only; runtime "
                          f"{cfg.runtime!r} starts other processes: give it as "
                          "'package.module:factory' (a top-level function of an importable "
                          "module)")
    run_dir, cfg = open_run(cfg, str(resume) if resume else None, settings if resume else {})
    stream = sys.stderr if progress else io.StringIO()
    return execute(cfg, run_dir, resuming=bool(resume), stream=stream,
                   live=None if progress else False, subscribers=list(callbacks),
                   strategy=strategy if not isinstance(strategy, (str, type(None))) else None)
