"""The in-memory data set every runtime trains on, and how raw uint8 images become tensors.

Normalization is fixed per data set (not computed per run) so that every process, on every
machine, turns the same bytes into bit-identical tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DATASETS: tuple[str, ...] = ("fmnist", "mnist", "cifar10", "synthetic")

# Per-channel (mean, std) of the training images scaled to [0, 1].
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fmnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "synthetic": ((0.2524,), (0.2043,)),
}

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "fmnist": (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
    "mnist": tuple(str(i) for i in range(10)),
    "cifar10": (
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    ),
    "synthetic": tuple(f"pattern-{i}" for i in range(10)),
}


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test splits as normalized float32 N×C×H×W images and int64 labels."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return (int(c), int(h), int(w))


def normalize(images: np.ndarray, name: str) -> torch.Tensor:
    """uint8 N×C×H×W -> float32 ((x/255 - mean) / std) per channel, with the set's constants."""
    mean, std = NORMALIZATION[name]
    x = torch.from_numpy(images.astype(np.float32))  # astype copies: writable, owns its memory
    x.div_(255.0)
    x.sub_(torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
    x.div_(torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
    return x


def build_dataset(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
) -> Dataset:
    """Wrap decoded uint8 images and integer labels into a normalized Dataset."""
    return Dataset(
        name=name,
        train_x=normalize(train[0], name),
        train_y=torch.from_numpy(train[1].astype(np.int64)),
        test_x=normalize(test[0], name),
        test_y=torch.from_numpy(test[1].astype(np.int64)),
        classes=CLASS_NAMES[name],
    )
