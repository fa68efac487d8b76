"""`package.module:attr` names a user's own code (a model factory, a data set factory): one
loader for them all, with the user's working directory importable and one-line errors."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any


def load_callable(name: str, what: str, error: type[Exception]) -> Callable[..., Any]:
    """The callable `name` ('package.module:attr') stands for, or `error` naming `what`."""
    module_name, _, attr = name.partition(":")
    if os.getcwd() not in sys.path:  # `module:attr` names a module of the user's project
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise error(f"{what} {name!r}: cannot import module {module_name!r} ({exc})") from None
    found = getattr(module, attr, None)
    if not callable(found):
        raise error(f"{what} {name!r}: {module_name} has no callable {attr!r}")
    return found
