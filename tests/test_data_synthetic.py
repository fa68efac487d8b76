"""The synthetic set: fixed (independent of any seed), MNIST-shaped, balanced, and learnable."""

from __future__ import annotations

import pytest
import torch

from tinyfed.data import load_dataset
from tinyfed.errors import DataError


def test_shapes_balance_and_normalization() -> None:
    ds = load_dataset("synthetic")
    assert ds.train_x.shape == (3000, 1, 28, 28) and ds.test_x.shape == (600, 1, 28, 28)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert torch.bincount(ds.train_y).tolist() == [300] * 10
    assert abs(ds.train_x.mean().item()) < 0.05 and abs(ds.train_x.std().item() - 1) < 0.05
    small = load_dataset("synthetic", synthetic_size=500)
    assert small.train_x.shape[0] == 500 and small.test_x.shape[0] == 100


def test_deterministic_and_global_rng_untouched() -> None:
    torch.manual_seed(1)
    a = load_dataset("synthetic", synthetic_size=200)
    state = torch.get_rng_state()
    b = load_dataset("synthetic", synthetic_size=200)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x[0], a.train_x[1])


@pytest.mark.parametrize("size", [0, 9, 2.5, True])
def test_bad_size(size: object) -> None:
    with pytest.raises(DataError, match="synthetic_size"):
        load_dataset("synthetic", synthetic_size=size)  # type: ignore[arg-type]


def test_a_small_mlp_learns_it_but_not_perfectly() -> None:
    ds = load_dataset("synthetic")
    x, y = ds.train_x.flatten(1), ds.train_y
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(784, 200), torch.nn.ReLU(),
            torch.nn.Linear(200, 200), torch.nn.ReLU(), torch.nn.Linear(200, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(3):
            for b in torch.randperm(len(x)).split(32):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[b]), y[b]).backward()
                opt.step()
    with torch.no_grad():
        acc = (model(ds.test_x.flatten(1)).argmax(1) == ds.test_y).float().mean().item()
    assert 0.7 < acc < 0.995
