"""Linear layers that take their plain SGD step inside the backward, for autograd-trained
`nn.Sequential` models (the paper's CNN).

The CNN's first linear layer holds 1.6 M of its 1.66 M weights. At B=10 its products are
memory-bound, and autograd writes a 6.4 MB weight gradient each step that the optimizer then
reads back with the weights. Under plain SGD (no momentum, no weight decay, nothing correcting
the gradients) the step can go straight into the weights in the gradient's own product
(`addmm_` with α = −lr), as `tinyfed.fused` does for the 2NN: no gradient tensor is written,
the weights are read and written once. The layer's input gradient is computed first, from the
weights as they were, so every gradient is the one autograd computes; only rounding differs.
A throwaway timing on this machine: 1.13x a step alone, 1.18x with two clients side by side
(the whole autograd path: docs/benchmarks.md, sections 4 and 7).
"""

from __future__ import annotations

import torch
from torch import nn

from tinyfed.client import TrainSettings


class _LinearStep(torch.autograd.Function):
    """y = x Wᵀ + b forward; backward returns dL/dx and applies W -= lr·dyᵀx, b -= lr·Σdy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                lr: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias)
        ctx.lr = lr
        return torch.addmm(bias, x, weight.t())

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, bias = ctx.saved_tensors
        dx = dy.mm(weight) if ctx.needs_input_grad[0] else None  # before the step
        with torch.no_grad():
            weight.addmm_(dy.t(), x, alpha=-ctx.lr)
            bias.add_(dy.sum(0), alpha=-ctx.lr)
        return dx, None, None, None  # no weight gradient: the optimizer skips these


class _SteppingLinear(nn.Module):
    """A view of an `nn.Linear` (its own parameters, not copies) that steps in backward."""

    def __init__(self, linear: nn.Linear, lr: float) -> None:
        super().__init__()
        self.linear, self.lr = linear, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"a linear layer stepping in backward takes 2-D inputs, got "
                             f"{x.dim()}-D")
        return _LinearStep.apply(x, self.linear.weight, self.linear.bias, self.lr)


def stepping(model: nn.Sequential, settings: TrainSettings, correct) -> nn.Module:
    """`model` itself, or, under plain SGD with nothing correcting its gradients, a Sequential
    over the same layers whose linear layers step in backward. Only for an `nn.Sequential` whose
    layers' forwards are known (the caller checks: `layout.channels_last_safe`) and whose linear
    layers all train, with a bias, and carry no hooks."""
    if correct is not None or not settings.plain_sgd:
        return model
    linears = [layer for layer in model if type(layer) is nn.Linear]
    if not linears or any(
            layer.bias is None or not layer.weight.requires_grad or not layer.bias.requires_grad
            or layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks
            for layer in linears) or model._forward_hooks or model._forward_pre_hooks:
        return model
    return nn.Sequential(*(_SteppingLinear(layer, settings.lr) if type(layer) is nn.Linear
                           else layer for layer in model))
