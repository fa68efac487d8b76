"""Built-in models (the FedAvg paper's 2NN and CNN, and two more) and user models by import path."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tinyfed.errors import ConfigError
from tinyfed.importpath import load_callable

ModelFactory = Callable[[tuple[int, int, int], int], nn.Module]


def mlp(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The paper's 2NN: 784-200-200-10 with ReLU, 199,210 parameters on 28×28 inputs."""
    n_in = input_shape[0] * input_shape[1] * input_shape[2]
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(n_in, 200),
        nn.ReLU(),
        nn.Linear(200, 200),
        nn.ReLU(),
        nn.Linear(200, num_classes),
    )


def mlp128(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A one-hidden-layer 784-128-10 MLP, small enough for a microcontroller."""
    n_in = input_shape[0] * input_shape[1] * input_shape[2]
    return nn.Sequential(nn.Flatten(), nn.Linear(n_in, 128), nn.ReLU(), nn.Linear(128, num_classes))


def cnn(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The paper's CNN: two 5×5 convs (32, 64) with 2×2 max-pool, FC 512, 1,663,370 parameters."""
    c, h, w = input_shape
    flat = 64 * (h // 4) * (w // 4)
    return nn.Sequential(
        nn.Conv2d(c, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def cifar_cnn(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The paper's CIFAR-10 shape: two 5×5 conv layers (64) with pooling, FC 384 and 192."""
    c, h, w = input_shape
    flat = 64 * (h // 4) * (w // 4)
    return nn.Sequential(
        nn.Conv2d(c, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 384),
        nn.ReLU(),
        nn.Linear(384, 192),
        nn.ReLU(),
        nn.Linear(192, num_classes),
    )


BUILTIN: dict[str, ModelFactory] = {
    "mlp": mlp,
    "mlp128": mlp128,
    "cnn": cnn,
    "cifar_cnn": cifar_cnn,
}


REGISTERED: dict[str, ModelFactory] = {}  # factories given from Python (`tinyfed.run(model=)`)


def register(factory: ModelFactory) -> str:
    """Remember a factory given from Python; returns the name a config carries for it
    (`module:qualname`, which other processes can import when the factory is top-level)."""
    name = f"{factory.__module__}:{factory.__qualname__}"
    REGISTERED[name] = factory
    return name


def resolve_factory(name: str) -> ModelFactory:
    """A built-in name, or 'package.module:factory' taking (input_shape, num_classes)."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name in REGISTERED:
        return REGISTERED[name]
    return load_callable(name, "model", ConfigError)


def build_model(
    name: str, input_shape: tuple[int, int, int], num_classes: int, seed: int
) -> nn.Module:
    """Build a model with weights seeded by `seed` alone, so every runtime starts identical."""
    factory = resolve_factory(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(input_shape, num_classes)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {name!r}: factory returned {type(model).__name__}, not nn.Module")
    return model


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of every floating tensor the model trains or keeps (params and buffers)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
