"""Train tinyfed on your own data from Python: `python examples/own_data.py [OUT_DIR]`.

A data set is any four tensors (train images, train labels, test images, test labels); it goes
through the same partitioners, label histograms and byte counting as the built-in sets. Here:
three classes of 8×8 patterns with noise, split among 12 clients by a Dirichlet(0.5) label
skew, trained with FedAvg for 8 rounds, with a callback that prints each round.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import tinyfed


def patterns(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n noisy 1×8×8 images of three classes: horizontal, vertical and diagonal stripes."""
    g = torch.Generator().manual_seed(seed)
    base = torch.zeros(3, 8, 8)
    base[0, ::2, :] = 1
    base[1, :, ::2] = 1
    base[2] = torch.eye(8) + torch.eye(8).flip(1)
    labels = torch.randint(0, 3, (n,), generator=g)
    images = base[labels] + 0.6 * torch.randn(n, 8, 8, generator=g)
    return images.unsqueeze(1), labels


def small_model(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 32), nn.ReLU(),
                         nn.Linear(32, num_classes))


def main(out: str | None = None) -> float:
    train_x, train_y = patterns(2400, seed=1)
    test_x, test_y = patterns(600, seed=2)
    data = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y,
            "classes": ("horizontal", "vertical", "diagonal")}
    result = tinyfed.run(
        dataset=data, model=small_model, clients=12, partition="dirichlet", alpha=0.5,
        fraction=0.5, epochs=2, batch_size=16, lr=0.1, rounds=8, seed=7, out=out,
        callbacks=[lambda r: print(f"round {r['round']}: accuracy {r['test_accuracy']:.3f}, "
                                   f"{r['bytes_down'] + r['bytes_up']} bytes")])
    final = result.history[-1]["test_accuracy"]
    print(f"final accuracy {final:.3f}; run folder {result.run_dir.path}")
    return final


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
