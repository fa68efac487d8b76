"""Client algorithms: what a client does differently from plain local SGD, by the name its task
carries. Each changes the gradient before every optimizer step (`prepare`) and/or the trained
weights and the extra tensors it sends back (`finish`); the server's half lives in
`tinyfed.strategies`. Extra tensors travel in the frames under `protocol.EXTRA` and are counted
in the bytes like the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from tinyfed.errors import WireError
from tinyfed.strategies.clipping import clip_update

if TYPE_CHECKING:
    from tinyfed.protocol import ClientTask

Tensors = dict[str, torch.Tensor]
Correction = Callable[[], None]  # called after backward(), before the optimizer step


class ClientAlgorithm(Protocol):
    def prepare(self, model: nn.Module, global_weights: Tensors, extras: Tensors,
                task: ClientTask) -> Correction | None: ...

    def finish(self, local: Tensors, global_weights: Tensors, extras: Tensors, task: ClientTask,
               metrics: dict[str, float]) -> tuple[Tensors, Tensors]: ...


def param(task: ClientTask, name: str) -> float:
    if name not in task.params:
        raise WireError(f"task for {task.algorithm!r} lacks parameter {name!r}")
    return task.params[name]


def _trainable(model: nn.Module, reference: Tensors) -> list[tuple[nn.Parameter, torch.Tensor]]:
    return [(p, reference[name]) for name, p in model.named_parameters() if p.requires_grad]


class Plain:
    """Local SGD as in FedAvg (McMahan et al. 2017): nothing added."""

    def prepare(self, model, global_weights, extras, task):
        return None

    def finish(self, local, global_weights, extras, task, metrics):
        return local, {}


class Proximal(Plain):
    """FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks"): the local
    objective gains (μ/2)‖w − w_global‖², i.e. μ·(w − w_global) on every gradient."""

    def prepare(self, model, global_weights, extras, task):
        mu = param(task, "mu")
        pairs = _trainable(model, global_weights)

        def correct() -> None:
            with torch.no_grad():
                for p, g in pairs:
                    if p.grad is not None:
                        p.grad.add_(p - g, alpha=mu)

        return correct if mu > 0 else None


class Scaffold(Plain):
    """SCAFFOLD (Karimireddy et al. 2020), option II. The task brings the server variate c and
    this client's c_i (kept by the server for clients that keep nothing between rounds); every
    gradient gets + (c − c_i); afterwards c_i⁺ = c_i − c + (x − y_i)/(K·η) with K the local
    steps taken and η the local learning rate, and the client sends Δc_i = c_i⁺ − c_i."""

    def prepare(self, model, global_weights, extras, task):
        pairs = []
        for name, p in model.named_parameters():
            c, ci = extras.get(f"c/{name}"), extras.get(f"ci/{name}")
            if c is None or ci is None:
                raise WireError(f"SCAFFOLD task lacks the control variates of {name!r}")
            pairs.append((p, c - ci))

        def correct() -> None:
            with torch.no_grad():
                for p, shift in pairs:
                    if p.grad is not None:
                        p.grad.add_(shift)

        return correct

    def finish(self, local, global_weights, extras, task, metrics):
        steps, lr = float(metrics.get("steps", 0)), task.settings.lr
        if steps <= 0:
            raise WireError("SCAFFOLD needs at least one local step")
        out = {}
        for key in local:
            if f"c/{key}" in extras:
                drift = (global_weights[key] - local[key]) / (steps * lr)
                out[f"dc/{key}"] = drift - extras[f"c/{key}"]  # c_i⁺ − c_i = −c + drift
        return local, out


class Clipped(Plain):
    """DP-FedAvg's client half (McMahan et al. 2018, "Learning Differentially Private Recurrent
    Language Models"): the update w − w_global is clipped to L2 norm `clip` before it leaves.
    The server clips again (it cannot trust the client to) and adds the noise. The client
    reports whether its update was within the bound (`within_clip`), which adaptive clipping
    (Andrew et al. 2021) needs."""

    def finish(self, local, global_weights, extras, task, metrics):
        bound = param(task, "clip")
        clipped, norm = clip_update(local, global_weights, bound)
        metrics["within_clip"] = 1.0 if norm <= bound else 0.0  # adaptive clipping's b_k
        return clipped, {}


# By the name a task carries; adding one is adding an entry (and, if the server must do
# something different too, a strategy).
CLIENT_ALGORITHMS: dict[str, ClientAlgorithm] = {
    "": Plain(),
    "fedprox": Proximal(),
    "scaffold": Scaffold(),
    "dp": Clipped(),
}


def register_client_algorithm(name: str, algorithm: ClientAlgorithm) -> None:
    """Add a client algorithm from Python (in-process runs; other processes learn it by the
    `package.module:Class` form, which they import)."""
    CLIENT_ALGORITHMS[name] = algorithm


def client_algorithm(name: str) -> ClientAlgorithm:
    """A registered algorithm, or `package.module:Class` naming a subclass of `Plain` (the
    class is checked before it is called, so a task cannot make a client call any other
    callable; importing the module is trusting the server, as a user model's name already is)."""
    found = CLIENT_ALGORITHMS.get(name)
    if found is not None:
        return found
    if ":" in name:
        from tinyfed.importpath import load_callable

        cls = load_callable(name, "client algorithm", WireError)
        if not (isinstance(cls, type) and issubclass(cls, Plain)):
            raise WireError(f"client algorithm {name[:80]!r} is not a subclass of "
                            f"tinyfed.algorithms.Plain")
        CLIENT_ALGORITHMS[name] = found = cls()
        return found
    raise WireError(f"unknown client algorithm {name[:40]!r}; this client knows "
                    f"{', '.join(repr(k) for k in CLIENT_ALGORITHMS)} or package.module:Class")
