"""Staleness functions s(τ) for asynchronous merging, parsed from the config's `staleness` text.

Kept free of torch so the config can check the text when it is read.

Convention: here τ counts the merges since the model the client trained from, so a fresh
update has τ = 0 and s(0) = 1: `async_alpha` is exactly the weight a fresh update gets. Xie et
al. 2019 (FedAsync, Alg. 1) write t − τ, which is 1 for a fresh update; their polynomial and
hinge functions at t − τ = k + 1 are ours at τ = k shifted by one. The effect, for an update
k merges stale: polynomial:a weighs it ((k+2)/(k+1))^a times the paper's (2^a for a fresh
one, √2 ≈ 1.41 at a = 0.5, fading toward 1 as k grows); hinge:a,b keeps full weight for one
more merge than the paper's (τ ≤ b here is t − τ ≤ b + 1 there); constant is the same. To
reproduce the paper's numbers exactly, use hinge with b − 1, or polynomial with α·2^−a for
fresh updates in mind.
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
