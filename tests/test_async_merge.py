"""Asynchronous merge rules against hand-computed results."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import small_config
from tinyfed.errors import ConfigError
from tinyfed.staleness import parse_staleness
from tinyfed.strategies import make_async_rule
from tinyfed.strategies.async_merge import FedAsync, FedBuff, SeedMerge


def t(*xs):
    return {"w": torch.tensor(xs, dtype=torch.float32)}


def test_seed_merge_sequence_by_hand():
    rule = SeedMerge()
    w = t(0.0, 0.0)
    # a=0: the first update replaces the model
    w = rule.merge(w, t(2.0, 4.0), 10, 0, w)
    assert torch.equal(w["w"], torch.tensor([2.0, 4.0])) and rule.a == 10
    # (10·[2,4] + 30·[5,1]) / 40 = [4.25, 1.75]
    w = rule.merge(w, t(5.0, 1.0), 30, 3, w)
    assert torch.equal(w["w"], torch.tensor([4.25, 1.75])) and rule.a == 40
    # (40·[4.25,1.75] + 40·[0,8]) / 80 = [2.125, 4.875]
    w = rule.merge(w, t(0.0, 8.0), 40, 1, w)
    assert torch.equal(w["w"], torch.tensor([2.125, 4.875])) and rule.a == 80
    assert w["w"].dtype == torch.float32


def test_seed_merge_a_grows_by_exactly_the_reported_count():
    rule = SeedMerge()
    w = t(1.0)
    for n in (7, 1, 600, 13):
        before = rule.a
        w = rule.merge(w, t(float(n)), n, 0, w)
        assert rule.a - before == n
    other = SeedMerge()
    other.load_state_dict(rule.state_dict())
    assert other.a == 621


def test_fedasync_polynomial_staleness_by_hand():
    rule = FedAsync(0.5, parse_staleness("polynomial:0.5"))
    w, u = t(4.0, 8.0), t(8.0, 0.0)
    # τ=0: α_t = 0.5 → [6, 4]
    assert torch.equal(rule.merge(w, u, 5, 0, w)["w"], torch.tensor([6.0, 4.0]))
    # τ=3: α_t = 0.5·(1+3)^−0.5 = 0.25 → 0.75·[4,8] + 0.25·[8,0] = [5, 6]
    assert torch.equal(rule.merge(w, u, 5, 3, w)["w"], torch.tensor([5.0, 6.0]))


def test_staleness_functions():
    assert parse_staleness("constant")(100) == 1.0
    assert parse_staleness("polynomial:1")(3) == 0.25
    hinge = parse_staleness("hinge:1,2")
    assert hinge(2) == 1.0 and hinge(5) == 0.25  # 1/(1·(5−2)+1)
    for bad in ("poly", "hinge:1", "polynomial:-1", "constant:3", "polynomial:x", ""):
        with pytest.raises(ConfigError, match="staleness"):
            parse_staleness(bad)


def test_fedbuff_flushes_every_size_updates():
    rule = FedBuff(2, 1.0, parse_staleness("constant"))
    w = t(1.0, 1.0)
    # delta [2,4] from base [0,0]: buffered, model unchanged
    assert rule.merge(w, t(2.0, 4.0), 9, 1, t(0.0, 0.0)) is None
    # delta [0,2] from base [1,1]; flush: [1,1] + 1·mean([2,4],[0,2]) = [2, 4]
    out = rule.merge(w, t(1.0, 3.0), 9, 0, w)
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0]))
    assert rule.count == 0 and rule.tensor_state() == {}


def test_fedbuff_staleness_weight_and_server_lr():
    rule = FedBuff(2, 0.5, parse_staleness("polynomial:1"))
    w = t(0.0)
    assert rule.merge(w, t(4.0), 1, 1, t(0.0)) is None  # 4·(1+1)^−1 = 2
    out = rule.merge(w, t(6.0), 1, 0, t(0.0))  # 6·1 = 6; 0 + 0.5·(2+6)/2 = 2
    assert torch.equal(out["w"], torch.tensor([2.0]))


def test_fedbuff_buffer_survives_a_checkpoint():
    a = FedBuff(2, 1.0, parse_staleness("constant"))
    assert a.merge(t(1.0), t(3.0), 1, 0, t(1.0)) is None
    b = FedBuff(2, 1.0, parse_staleness("constant"))
    b.load_state_dict(a.state_dict())
    b.load_tensor_state(a.tensor_state())
    ra = a.merge(t(1.0), t(2.0), 1, 0, t(1.0))["w"]
    rb = b.merge(t(1.0), t(2.0), 1, 0, t(1.0))["w"]
    assert torch.equal(ra, rb) and torch.equal(ra, torch.tensor([2.5]))


def test_config_names_and_checks():
    assert isinstance(make_async_rule(small_config(async_rule="seed-merge")), SeedMerge)
    buff = make_async_rule(small_config(async_rule="fedbuff", fraction=0.5))
    assert isinstance(buff, FedBuff) and buff.size == 2
    with pytest.raises(ConfigError, match="async_rule"):
        small_config(async_rule="fedavg")
    with pytest.raises(ConfigError, match="concurrency"):
        small_config(concurrency=5)
    with pytest.raises(ConfigError, match="staleness"):
        small_config(staleness="hinge:1")


def test_async_flags_reach_the_config():
    import argparse

    from tinyfed.commands.experiment_flags import add_experiment_flags, config_from

    parser = argparse.ArgumentParser()
    add_experiment_flags(parser)
    args = parser.parse_args(["--mode", "async", "--async-rule", "fedbuff", "--concurrency", "3",
                              "--staleness", "hinge:2,4", "--buffer-size", "5", "--server-lr",
                              "0.5", "--async-alpha", "0.3", "--clients", "4"])
    cfg = config_from(args)
    assert (cfg.mode, cfg.async_rule, cfg.concurrency, cfg.staleness, cfg.buffer_size,
            cfg.server_lr, cfg.async_alpha) == ("async", "fedbuff", 3, "hinge:2,4", 5, 0.5, 0.3)
