"""A user model for tinyfed: `tinyfed run --model examples.tiny_model:make` (run from the repo
root, or anywhere the module is importable)."""

from torch import nn


def make(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A logistic-regression model: what fits on the smallest microcontrollers."""
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes))
