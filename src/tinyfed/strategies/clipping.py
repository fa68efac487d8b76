"""Clipping an update to an L2 bound: DP-FedAvg's client (`algorithms.Clipped`) and server
(`strategies.dp`) do the same arithmetic, so it is written once, here."""

from __future__ import annotations

import math

import torch

Tensors = dict[str, torch.Tensor]


def clip_update(local: Tensors, global_weights: Tensors, bound: float) -> tuple[Tensors, float]:
    """local moved back toward the global model so that ‖local − global‖₂ ≤ bound; also the
    norm before clipping."""
    deltas = {k: v - global_weights[k] for k, v in local.items() if v.is_floating_point()}
    norm = math.sqrt(sum(float(torch.linalg.vector_norm(d.double())) ** 2
                         for d in deltas.values()))
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    if scale == 1.0:
        return local, norm
    return {k: global_weights[k] + deltas[k] * scale if k in deltas else v
            for k, v in local.items()}, norm
