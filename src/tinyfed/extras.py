"""Optional parts of tinyfed (server, plots, dashboard, Ray) and the one-line hint when one is
missing: a device installs only the core, and a missing extra is a user's fix, not a crash."""

from __future__ import annotations

import importlib
from types import ModuleType

from tinyfed.errors import ConfigError

EXTRAS = {"fastapi": "server", "uvicorn": "server", "starlette": "server",
          "matplotlib": "plot", "ray": "ray", "dp_accounting": "dp"}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The extra that provides the module `exc` could not import, if it is one of ours."""
    return EXTRAS.get((exc.name or "").partition(".")[0])


def require(module: str, what: str) -> ModuleType:
    """Import `module` (a tinyfed module needing an extra) or raise ConfigError with the fix."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        extra = missing_extra(exc)
        if extra is None:
            raise
        raise ConfigError(f"{what} needs the '{extra}' extra, which is not installed: "
                          f'pip install "tinyfed[{extra}]"') from None
