"""Shared fixtures: small synthetic experiments that run in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def has_fmnist() -> bool:
    return (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file()


needs_fmnist = pytest.mark.skipif(
    not has_fmnist(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's real cache."""
    cache = tmp_path_factory.getbasetemp() / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("TINYFED_DATA", raising=False)
    yield


def small_config(**over):
    from tinyfed.config import build_config

    values = dict(dataset="synthetic", synthetic_size=600, model="mlp128", clients=4,
                  rounds=2, batch_size=20, lr=0.1, seed=3)
    values.update(over)
    return build_config(values)


@pytest.fixture
def cli_env():
    """Environment for running `python -m tinyfed` in a subprocess."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env
