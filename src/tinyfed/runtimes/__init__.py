"""Runtimes by name: a transport (imported only when chosen, so optional extras stay optional)
under the one dispatcher."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tinyfed.errors import ConfigError
from tinyfed.extras import require

if TYPE_CHECKING:  # the names stay importable without torch (the config checks against them)
    from tinyfed.runtimes.base import Runtime

RUNTIMES: dict[str, str] = {
    "inprocess": "tinyfed.runtimes.inprocess:InProcessRuntime",
    "processes": "tinyfed.runtimes.processes:ProcessRuntime",
    "http": "tinyfed.runtimes.http.local:LocalHttpRuntime",
    "ray": "tinyfed.runtimes.ray_runtime:RayRuntime",
}


def make_runtime(name: str, config) -> Runtime:
    """The named transport under a `Dispatcher` (deadlines, late drops)."""
    from tinyfed.runtimes.dispatch import as_runtime

    target = RUNTIMES.get(name)
    if target is None:
        raise ConfigError(f"unknown runtime {name!r}; allowed: {', '.join(sorted(RUNTIMES))}")
    module, _, cls = target.partition(":")
    factory = getattr(require(module, f"runtime {name!r}"), cls)
    transport = factory(config)
    if config.fleet:  # the simulator: real training inside, a simulated device clock around it
        from tinyfed.runtimes.simulated import SimulatedTransport

        transport = SimulatedTransport(transport, config)
    return as_runtime(transport, config.round_timeout)
