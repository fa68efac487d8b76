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


CLOCK = ("time", "wall_seconds", "elapsed_seconds")  # record fields that read a wall clock


def run_small(tmp_path, name: str, **over):
    """A small synthetic run (`small_config` with `over`) in tmp_path/name, quietly."""
    import io

    from tinyfed.rundir import RunDir
    from tinyfed.runner import execute

    cfg = small_config(out=str(tmp_path / name), **over)
    run_dir = RunDir.create(cfg)
    return execute(run_dir.saved_config(), run_dir, live=False, stream=io.StringIO())


def on_replies(worker, edit) -> None:
    """Let `edit(task frame, reply) -> reply` see, and rewrite, every reply `worker` gives the
    in-process runtime (whose one call into it is `handle_many`, clients stacked or not)."""
    real = worker.handle_many
    worker.handle_many = lambda frames: [edit(f, r) for f, r in zip(frames, real(frames))]


def same_tensors(a, b) -> bool:
    """The same names and bit-identical tensors."""
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def clockless(records) -> list[dict]:
    """Records without their clock readings (what bit-identical runs share)."""
    return [{k: v for k, v in r.items() if k not in CLOCK} for r in records]


def folder_records(folder) -> list[dict]:
    """A run folder's metrics.jsonl records, without their clock readings."""
    import json

    return clockless(json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines())
