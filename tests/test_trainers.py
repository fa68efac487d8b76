"""The fused trainer (no autograd) against the autograd loop it replaces, and the choice
between them: the same updates to float tolerance on every setting, bit-identical run to run,
and a model it cannot train detected before training, with the reason."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from tests.conftest import run_small, same_tensors
from tinyfed.algorithms import Proximal, Scaffold
from tinyfed.client import Shard, TrainSettings, train
from tinyfed.errors import ConfigError
from tinyfed.fused import train_fused, unfusable
from tinyfed.models import build_model, state_of
from tinyfed.protocol import ClientTask
from tinyfed.trainers import choose

SHAPE = (1, 6, 6)


def shard(n: int = 23, seed: int = 0) -> Shard:
    g = torch.Generator().manual_seed(seed)
    return Shard(torch.randn(n, *SHAPE, generator=g), torch.randint(0, 5, (n,), generator=g))


def mlp(*layers: nn.Module) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), *layers)


def two_nn() -> nn.Sequential:
    return mlp(nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))


def both(make, settings: TrainSettings, data: Shard, seed: int = 7, correct=None):
    """(autograd's weights and metrics, fused's) from the same start."""
    a, f = make(), make()
    f.load_state_dict(a.state_dict())
    ma = train(a, data, settings, seed, correct(a) if correct else None)
    mf = train_fused(f, data, settings, seed, correct(f) if correct else None)
    return (state_of(a), ma), (state_of(f), mf)


def close(a: dict, b: dict, tol: float = 2e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=tol, atol=tol, msg=k)


SETTINGS = {
    "B=10 uneven last batch": TrainSettings(epochs=1, batch_size=10, lr=0.1),
    "E=3": TrainSettings(epochs=3, batch_size=8, lr=0.05),
    "FedSGD (B=all)": TrainSettings(epochs=2, batch_size=0, lr=0.3),
    "momentum": TrainSettings(epochs=2, batch_size=5, lr=0.05, momentum=0.9),
    "weight decay + momentum": TrainSettings(epochs=2, batch_size=6, lr=0.05, momentum=0.5,
                                             weight_decay=0.01),
    "B > shard": TrainSettings(epochs=1, batch_size=100, lr=0.1),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_fused_matches_autograd(name):
    (wa, ma), (wf, mf) = both(two_nn, SETTINGS[name], shard())
    close(wa, wf)
    assert ma["steps"] == mf["steps"]
    assert mf["train_loss"] == pytest.approx(ma["train_loss"], rel=1e-5)
    assert not same_tensors(wf, state_of(two_nn()))  # it did train


@pytest.mark.parametrize("make", [
    lambda: mlp(nn.Linear(36, 5)),  # logistic regression: one layer
    lambda: mlp(nn.Linear(36, 9, bias=False), nn.ReLU(), nn.Linear(9, 5)),
    lambda: mlp(nn.Linear(36, 9), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 5)),  # no ReLU between
], ids=["one layer", "no bias", "linear after linear"])
def test_fused_matches_autograd_on_other_stacks(make):
    assert unfusable(make()) is None
    (wa, _), (wf, _) = both(make, TrainSettings(epochs=2, batch_size=4, lr=0.1), shard())
    close(wa, wf)


def task_with(algorithm: str, **params) -> ClientTask:
    return ClientTask(client_id=0, round=1, seed=7, settings=SETTINGS["momentum"],
                      algorithm=algorithm, params=params)


def test_a_client_algorithms_correction_applies_to_fused_gradients():
    """FedProx's proximal term and SCAFFOLD's variates change the gradients through the same
    hook in both trainers."""
    start = two_nn().state_dict()
    global_w = {k: v.clone() for k, v in start.items()}
    prox = Proximal()
    (wa, _), (wf, _) = both(two_nn, SETTINGS["momentum"], shard(), correct=lambda m: prox.prepare(
        m, global_w, {}, task_with("fedprox", mu=0.5)))
    close(wa, wf)
    g = torch.Generator().manual_seed(3)
    extras = {f"{p}/{k}": torch.randn(v.shape, generator=g) * 0.1
              for k, v in start.items() for p in ("c", "ci")}
    (sa, _), (sf, _) = both(two_nn, SETTINGS["momentum"], shard(), correct=lambda m: Scaffold(
    ).prepare(m, global_w, extras, task_with("scaffold")))
    close(sa, sf)
    assert not same_tensors(sa, wa)  # the corrections did change the result


def test_fused_is_bit_identical_run_to_run():
    outs = [both(two_nn, SETTINGS["weight decay + momentum"], shard(), seed=11)[1][0]
            for _ in range(2)]
    assert same_tensors(*outs)


@pytest.mark.parametrize("model, reason", [
    (lambda: build_model("cnn", (1, 28, 28), 10, 0), "layer 0 is Conv2d"),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.BatchNorm1d(8), nn.Linear(8, 5)),
     "buffers"),
    (lambda: mlp(nn.Linear(36, 8), nn.Dropout(), nn.Linear(8, 5)), "layer 2 is Dropout"),
    (lambda: mlp(nn.Linear(36, 8), nn.Tanh(), nn.Linear(8, 5)), "layer 2 is Tanh"),
    (lambda: nn.Sequential(nn.Linear(36, 5)), "layer 0 is Linear, not nn.Flatten()"),
    (lambda: type("Mine", (nn.Sequential,), {})(nn.Flatten(), nn.Linear(36, 5)), "Mine"),
    (lambda: mlp(type("MyLinear", (nn.Linear,), {})(36, 5)), "layer 1 is MyLinear"),
    (lambda: mlp(nn.Linear(36, 5).double()), "float64"),
    (lambda: mlp(nn.ReLU(), nn.Linear(36, 5)), "does not follow a Linear"),
], ids=["cnn", "batch norm", "dropout", "tanh", "no flatten", "subclass", "own linear",
        "float64", "relu first"])
def test_what_fused_cannot_train_is_named(model, reason):
    m = model()
    assert reason in (unfusable(m) or "")
    choice = choose(m, "auto", "sgd")
    assert choice.name == "autograd" and reason in choice.reason
    with pytest.raises(ConfigError, match="trainer 'fused' cannot train this model"):
        choose(m, "fused", "sgd")


def test_hooks_and_frozen_parameters_are_not_fused():
    m = two_nn()
    m[1].register_forward_hook(lambda *a: None)
    assert "hooks" in unfusable(m)
    m = two_nn()
    m[1].weight.requires_grad_(False)
    assert "frozen" in unfusable(m)


def test_choice_follows_optimizer_and_config():
    m = two_nn()
    assert choose(m, "auto", "sgd").name == "fused"
    assert choose(m, "autograd", "sgd").name == "autograd"
    adam = choose(m, "auto", "adam")
    assert adam.name == "autograd" and "adam" in adam.reason
    with pytest.raises(ConfigError, match="adam"):
        choose(m, "fused", "adam")


def test_runs_on_either_trainer_agree_and_the_report_says_which(tmp_path):
    """A whole run (frames, aggregation, evaluation) on each trainer: the same model to float
    tolerance, the path named in the report."""
    from tinyfed.runner import summary

    # one thread at B=50: auto trains one client at a time (it would stack at smaller batches)
    same = dict(momentum=0.5, threads=1, batch_size=50)
    fused = run_small(tmp_path, "fused", trainer="fused", **same)
    auto = run_small(tmp_path, "auto", **same)
    slow = run_small(tmp_path, "autograd", trainer="autograd", **same)
    assert same_tensors(fused.weights, auto.weights)
    close(slow.weights, fused.weights, tol=1e-4)
    assert "client trainer   fused" in summary(fused)
    assert "client trainer   autograd (chosen by the config)" in summary(slow)
    assert "start-up before round 1" in summary(fused)


def test_forcing_fused_on_a_cnn_is_a_one_line_error(tmp_path, cli_env):
    proc = subprocess.run(
        [sys.executable, "-m", "tinyfed", "run", "--dataset", "synthetic", "--model", "cnn",
         "--trainer", "fused", "--rounds", "1", "--out", str(tmp_path / "r")],
        capture_output=True, text=True, env=cli_env, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "trainer 'fused' cannot train this model" in lines[0], lines
    assert "Conv2d" in lines[0] and "Traceback" not in proc.stderr
