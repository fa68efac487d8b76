"""tinyfed: federated learning in one process, over OS pipes, over HTTP or on Ray.

`tinyfed.run(...)` trains from Python (see `tinyfed.api`); the names are imported on first
use, so `import tinyfed` (and the CLI's `--help`) stays light.
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = {"run": "tinyfed.api", "make_config": "tinyfed.api", "Config": "tinyfed.config",
        "RunResult": "tinyfed.runner", "Experiment": "tinyfed.experiment",
        "Dataset": "tinyfed.data.dataset"}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'tinyfed' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
