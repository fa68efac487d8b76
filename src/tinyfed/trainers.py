"""Which local trainer a client runs: the fused one where the model and optimizer allow it
(`tinyfed.fused`: no autograd, 1.6× the samples/s on the 2NN at B=10), else the general
autograd loop (`client.train`). The config's `trainer` forces either; the choice and its
reason are in the run's report, and every runtime makes the same choice from the same config,
so results stay bit-identical across runtimes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from tinyfed.client import train
from tinyfed.errors import ConfigError
from tinyfed.fused import train_fused, unfusable

TRAINERS = ("auto", "fused", "autograd")


@dataclass(frozen=True)
class Choice:
    name: str  # "fused" or "autograd": what runs
    reason: str  # why, for the report
    train: Callable


def choose(model: nn.Module, wanted: str, optimizer: str) -> Choice:
    """The trainer for `model` under the config's `trainer` and `optimizer`. Forcing 'fused'
    on what it cannot train is a config error, never a silent fallback or a wrong result."""
    if wanted not in TRAINERS:
        raise ConfigError(f"trainer {wanted!r} is unknown; allowed: {', '.join(TRAINERS)}")
    if wanted == "autograd":
        return Choice("autograd", "chosen by the config", train)
    why = unfusable(model)
    if why is None and optimizer != "sgd":
        why = f"the optimizer is {optimizer}, not sgd"
    if why is None:
        return Choice("fused", "Linear/ReLU stack with SGD: backward written out, no autograd",
                      train_fused)
    if wanted == "fused":
        raise ConfigError(f"trainer 'fused' cannot train this model: {why}; it trains "
                          f"nn.Flatten + nn.Linear/nn.ReLU stacks with SGD (use 'auto' or "
                          f"'autograd')")
    return Choice("autograd", f"not fusable: {why}", train)
