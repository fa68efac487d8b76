"""Which local trainer a client runs: the fused one where the model and optimizer allow it
(`tinyfed.fused`: no autograd, 1.76× the samples/s on the 2NN at B=10), else the general
autograd loop (`client.train`); and whether a worker given several clients at once trains them
as one stacked computation (`tinyfed.vectorized`). The config's `trainer` forces any of them;
the choice and its reason are in the run's report, and every runtime makes the same choice from
the same config and thread count, so results stay bit-identical across runtimes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from tinyfed.client import train
from tinyfed.errors import ConfigError
from tinyfed.fused import train_fused, unfusable
from tinyfed.layout import channels_last, channels_last_safe
from tinyfed.linear_step import stepping
from tinyfed.vectorized import stacking_pays

TRAINERS = ("auto", "vectorized", "fused", "autograd")


@dataclass(frozen=True)
class Choice:
    name: str  # "vectorized", "fused" or "autograd": what runs
    reason: str  # why, for the report
    train: Callable  # one client's trainer
    stacks: bool = False  # clients handed over together train as one stacked computation


def train_known_sequential(model: nn.Module, shard, settings, seed: int,
                           correct: Callable[[], None] | None = None) -> dict[str, float]:
    """`client.train` for a conv `nn.Sequential` whose layers are all known: weights
    channels-last (`tinyfed.layout`), and under plain SGD its linear layers step inside their
    backward (`tinyfed.linear_step`)."""
    with channels_last(model):
        return train(stepping(model, settings, correct), shard, settings, seed, correct)


def _autograd(model: nn.Module, reason: str) -> Choice:
    """The autograd loop, made faster where the model's layers are all known."""
    if channels_last_safe(model):
        return Choice("autograd", f"{reason}; convolutions channels-last (NHWC), linear layers "
                      f"stepped in their backward under plain SGD", train_known_sequential)
    return Choice("autograd", reason, train)


def choose(model: nn.Module, wanted: str, optimizer: str, threads: int = 1,
           batch_size: int = 0, stacking: bool = False) -> Choice:
    """The trainer for `model` under the config's `trainer` and `optimizer`; `stacking`: the
    runtime hands a worker several clients at once, on `threads` torch threads, at
    `batch_size`. Forcing 'fused' or 'vectorized' on what they cannot train is a config error,
    never a silent fallback or a wrong result."""
    if wanted not in TRAINERS:
        raise ConfigError(f"trainer {wanted!r} is unknown; allowed: {', '.join(TRAINERS)}")
    if wanted == "autograd":
        return _autograd(model, "chosen by the config")
    why = unfusable(model)
    if why is None and optimizer != "sgd":
        why = f"the optimizer is {optimizer}, not sgd"
    if why is not None:
        if wanted != "auto":
            raise ConfigError(f"trainer {wanted!r} cannot train this model: {why}; it trains "
                              f"nn.Flatten + nn.Linear/nn.ReLU stacks with SGD (use 'auto' or "
                              f"'autograd')")
        return _autograd(model, f"not fusable: {why}")
    if wanted == "vectorized":
        if stacking:
            return Choice("vectorized", "chosen by the config: a round's clients as one "
                          "stacked computation", train_fused, stacks=True)
        return Choice("fused", "vectorized asked for, but this runtime hands each worker one "
                      "client at a time", train_fused)
    if wanted == "auto" and stacking and stacking_pays(threads, batch_size):
        cores = f"{threads} thread{'s' * (threads != 1)}"
        return Choice("vectorized", f"Linear/ReLU stack with SGD on {cores} at "
                      f"B={batch_size}: a round's clients as one stacked computation",
                      train_fused, stacks=True)
    return Choice("fused", "Linear/ReLU stack with SGD: backward written out, no autograd",
                  train_fused)
