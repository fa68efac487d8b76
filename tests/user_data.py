"""Data set factories a test names by `tests.user_data:NAME` (importable from the repo root)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def blobs(n: int = 400, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 1, 6, 6, generator=g) * 0.5
    x[torch.arange(n), 0, y, :] += 2.0  # class c: row c is bright
    return x, y


def good():
    tx, ty = blobs(400, 0)
    vx, vy = blobs(100, 1)
    return {"train_x": tx, "train_y": ty, "test_x": vx, "test_y": vy,
            "classes": ("a", "b", "c", "d")}


def torch_datasets():
    tx, ty = blobs(400, 0)
    vx, vy = blobs(100, 1)
    return TensorDataset(tx, ty), TensorDataset(vx, vy)


def raises():
    raise RuntimeError("the data server is down")


def bad_labels():
    d = good()
    d["train_y"] = d["train_y"].clone()
    d["train_y"][7] = 9
    return d


def nan_pixels():
    d = good()
    d["test_x"] = d["test_x"].clone()
    d["test_x"][3, 0, 0, 0] = float("nan")
    return d


def wrong_shapes():
    d = good()
    d["train_y"] = d["train_y"][:-5]
    return d


def integer_images():
    d = good()
    d["train_x"] = (d["train_x"] * 10).to(torch.uint8)
    return d
