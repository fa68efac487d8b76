"""Staleness functions s(τ) for asynchronous merging, parsed from the config's `staleness` text.

Kept free of torch so the config can check the text when it is read.
"""

from __future__ import annotations

from collections.abc import Callable

from tinyfed.errors import ConfigError

Staleness = Callable[[int], float]

ALLOWED = "constant, polynomial:A (A ≥ 0), hinge:A,B (A, B ≥ 0)"


def parse_staleness(spec: str) -> Staleness:
    """``constant`` → 1 | ``polynomial:a`` → (1+τ)^−a | ``hinge:a,b`` → 1 if τ ≤ b else
    1/(a·(τ−b)+1), the three families of FedAsync (Xie et al. 2019)."""
    name, _, args = spec.partition(":")
    try:
        nums: list[float] | None = [float(x) for x in args.split(",")] if args else []
    except ValueError:
        nums = None
    if name == "constant" and nums == []:
        return lambda tau: 1.0
    if name == "polynomial" and nums is not None and len(nums) == 1 and nums[0] >= 0:
        a = nums[0]
        return lambda tau: (1.0 + tau) ** -a
    if name == "hinge" and nums is not None and len(nums) == 2 and min(nums) >= 0:
        a, b = nums
        return lambda tau: 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)
    raise ConfigError(f"config field 'staleness' = {spec!r}: allowed {ALLOWED}")
