"""Channels-last (NHWC) convolution weights while a known-safe conv model trains or evaluates.

oneDNN's NHWC convolutions are faster on this CPU than NCHW ones: a throwaway timing put the
paper's CNN at 1.15-1.4x a training step and 1.5x an evaluation (the whole autograd path is in
docs/benchmarks.md, sections 4 and 7). With the
weights channels-last, PyTorch runs every convolution (and its backward) channels-last, and the
activations stay so until `nn.Flatten`, which reshapes in logical (NCHW) order: the same
function, only float rounding differs (and it is the same run to run). Only an `nn.Sequential`
of layers whose forward is known not to depend on strides qualifies: a user's own `forward`
may call `.view()` on a conv output, which fails on a channels-last tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

# exact types: a subclass may override forward with layout-dependent code
LAYOUT_FREE = (nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Linear,
               nn.Dropout, nn.Identity)


def channels_last_safe(model: nn.Module) -> bool:
    """An `nn.Sequential` of layout-free layers, at least one of them a convolution."""
    if type(model) is not nn.Sequential:
        return False
    layers = list(model)
    return (all(type(layer) in LAYOUT_FREE for layer in layers)
            and any(type(layer) is nn.Conv2d for layer in layers))


@contextlib.contextmanager
def channels_last(model: nn.Module, on: bool = True) -> Iterator[None]:
    """The model's 4-D weights channels-last for the block, contiguous again after it (its state
    dict, aggregation and the wire see the usual layout). Parameters stay the same objects
    (`Module.to` swaps their data), so an optimizer or a client algorithm's references hold."""
    if not on:
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)
