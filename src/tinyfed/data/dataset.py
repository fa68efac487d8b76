"""The in-memory data set every runtime trains on, and how raw uint8 images become tensors.

Normalization is fixed per data set (not computed per run) so that every process, on every
machine, turns the same bytes into bit-identical tensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

Split = tuple[np.ndarray, np.ndarray]  # uint8 N×C×H×W images, integer labels


@dataclass(frozen=True)
class Source:
    """A built-in data set: how to load its uint8 splits, and the constants that turn them into
    tensors (per-channel mean and std of the training images scaled to [0, 1])."""

    load: Callable[[str, str | None, bool, int], tuple[Split, Split]]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    shape: tuple[int, int, int]


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


def normalize(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 N×C×H×W -> float32 ((x/255 - mean) / std) per channel, with the set's constants."""
    # Converted by torch, not numpy's astype: the same values, but on these VMs astype's fresh
    # 188 MB (Fashion-MNIST) was faulted in page by page, 0.5-0.6 s of every load. The uint8
    # view is only read (torch warns that the decoded buffer is read-only).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)
    x.div_(255.0)
    x.sub_(torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
    x.div_(torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
    return x


def build_dataset(name: str, train: Split, test: Split, source: Source) -> Dataset:
    """Wrap decoded uint8 images and integer labels into a normalized Dataset."""
    return Dataset(
        name=name,
        train_x=normalize(train[0], source.mean, source.std),
        train_y=torch.from_numpy(train[1].astype(np.int64)),
        test_x=normalize(test[0], source.mean, source.std),
        test_y=torch.from_numpy(test[1].astype(np.int64)),
        classes=source.classes,
    )
