"""Channels-last convolutions (`tinyfed.layout`): the same training and evaluation as NCHW to
float tolerance, bit-identical run to run, the model's layout and parameter objects unchanged
afterwards, and only models known to allow it converted."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tinyfed.algorithms import Proximal
from tinyfed.client import Shard, TrainSettings, evaluate, train
from tinyfed.layout import channels_last, channels_last_safe
from tinyfed.models import build_model, state_of
from tinyfed.protocol import ClientTask
from tinyfed.trainers import choose, train_known_sequential

SHAPE = (1, 12, 12)


def small_cnn() -> nn.Module:
    return build_model("cnn", SHAPE, 5, seed=3)


def shard(n: int = 37, seed: int = 0) -> Shard:
    g = torch.Generator().manual_seed(seed)
    return Shard(torch.randn(n, *SHAPE, generator=g), torch.randint(0, 5, (n,), generator=g))


class ViewsItsConvOutput(nn.Module):
    """A user's model whose forward `.view()`s a conv output: breaks on channels-last."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 12 * 12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.fc(h.view(h.size(0), -1))


@pytest.mark.parametrize("settings", [
    TrainSettings(epochs=2, batch_size=10, lr=0.05),
    TrainSettings(epochs=1, batch_size=4, lr=0.05, momentum=0.9, weight_decay=0.01),
])
def test_channels_last_trains_what_nchw_trains(settings):
    a, b = small_cnn(), small_cnn()
    params_before = [id(p) for p in b.parameters()]
    ma = train(a, shard(), settings, seed=11)
    mb = train_known_sequential(b, shard(), settings, seed=11)
    assert ma["steps"] == mb["steps"] and abs(ma["train_loss"] - mb["train_loss"]) < 1e-5
    sa, sb = state_of(a), state_of(b)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5, msg=k)
        assert sb[k].is_contiguous(), k  # the wire and aggregation see the usual layout
    assert [id(p) for p in b.parameters()] == params_before
    assert all(p.is_contiguous() for p in b.parameters())
    # the point: it did run channels-last, so results differ from NCHW in rounding only
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)


def test_channels_last_is_bit_identical_run_to_run():
    settings = TrainSettings(epochs=2, batch_size=5, lr=0.1, momentum=0.5)
    runs = []
    for _ in range(2):
        m = small_cnn()
        train_known_sequential(m, shard(), settings, seed=4)
        runs.append(state_of(m))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_a_client_algorithms_correction_holds_its_parameters_through_the_switch():
    """FedProx's correction refers to the model's parameters: still the ones that train."""
    settings = TrainSettings(epochs=1, batch_size=8, lr=0.1)
    task = ClientTask(client_id=0, round=1, seed=1, settings=settings, params={"mu": 0.5})
    results = []
    for trainer in (train, train_known_sequential):
        m = small_cnn()
        start = state_of(m)
        correct = Proximal().prepare(m, start, {}, task)
        trainer(m, shard(), settings, 2, correct)
        results.append(state_of(m))
    plain = small_cnn()
    train(plain, shard(), settings, 2)
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(results[0][k], state_of(plain)[k]) for k in results[0])


def test_evaluation_agrees_and_leaves_the_layout():
    from tinyfed.client import _evaluate

    m = small_cnn()
    data = shard(300, seed=5)
    with torch.no_grad():
        reference = _evaluate(m, data.x, data.y, 5)  # NCHW: no layout switch at all
    fast = evaluate(m, data.x, data.y, 5)  # channels-last: the model qualifies
    assert abs(fast["loss"] - reference["loss"]) < 1e-5
    assert abs(fast["accuracy"] - reference["accuracy"]) <= 1 / 300
    assert all(p.is_contiguous() for p in m.parameters())


def test_only_models_known_to_allow_it_are_converted():
    assert channels_last_safe(small_cnn())
    assert channels_last_safe(build_model("cifar_cnn", (3, 32, 32), 10, seed=0))
    assert not channels_last_safe(build_model("mlp", SHAPE, 5, seed=0))  # no convolution
    user = ViewsItsConvOutput()
    assert not channels_last_safe(user)
    x = torch.randn(3, *SHAPE)
    with channels_last(user), pytest.raises(RuntimeError, match="view"):
        user(x)  # what converting it would do: the reason for the allow-list
    assert user(x).shape == (3, 5)  # and it trains normally, NCHW
    choice = choose(user, "auto", "sgd")
    assert choice.train is train and "channels-last" not in choice.reason
    cnn = choose(small_cnn(), "auto", "sgd")
    assert cnn.train is train_known_sequential
    assert "convolutions channels-last (NHWC)" in cnn.reason
    forced = choose(small_cnn(), "autograd", "adam")
    assert forced.train is train_known_sequential


def test_a_sequential_with_a_custom_layer_keeps_nchw():
    class Reshape(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.view(x.size(0), -1)

    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), Reshape(), nn.Linear(2 * 10 * 10, 5))
    assert not channels_last_safe(m)

    class MyConv(nn.Conv2d):  # a subclass may override forward: not trusted either
        pass

    assert not channels_last_safe(nn.Sequential(MyConv(1, 2, 3), nn.Flatten()))


def test_a_cnn_run_is_bit_identical_in_process_and_in_worker_processes(tmp_path):
    """The faster autograd path is taken the same way in every runtime (the report says so)."""
    from tests.conftest import run_small, same_tensors
    from tinyfed.runner import summary

    over = dict(model="cnn", deterministic=True, rounds=2, batch_size=10)
    inproc = run_small(tmp_path, "inproc", **over)
    procs = run_small(tmp_path, "procs", runtime="processes", workers=2, **over)
    assert same_tensors(inproc.weights, procs.weights)
    for done in (inproc, procs):
        assert "convolutions channels-last (NHWC), linear layers stepped" in summary(done)
