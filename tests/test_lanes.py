"""In-process lanes: with the autograd trainer, clients train side by side on threads of their
own (one torch thread each), their results arriving as they finish."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_small, same_tensors
from tinyfed.faults import FAULT_ENV
from tinyfed.runtimes.lanes import lane_count
from tinyfed.server import RoundFailed


def rounds(res) -> list[dict]:
    return [r for r in res.state.records if r["kind"] == "round"]


def test_lane_count_follows_the_trainer_and_the_config():
    assert lane_count("autograd", False, threads=2, wanted=0) == 2  # one per torch thread
    assert lane_count("autograd", False, threads=1, wanted=0) == 1  # deterministic: one
    assert lane_count("autograd", False, threads=1, wanted=3) == 3  # forced
    assert lane_count("fused", False, threads=2, wanted=0) == 1  # fused: faster alone
    assert lane_count("vectorized", True, threads=2, wanted=4) == 1  # stacking instead


def test_deterministic_lanes_are_bit_identical_to_one_at_a_time(tmp_path):
    """Each lane trains a whole client on one thread and the server merges in selection order:
    forcing two lanes under `deterministic` changes nothing, bit for bit, bytes included."""
    common = dict(trainer="autograd", deterministic=True, rounds=2)
    one = run_small(tmp_path, "one", lanes=1, **common)
    two = run_small(tmp_path, "two", lanes=2, **common)
    assert same_tensors(one.state.weights, two.state.weights)
    assert [(r["bytes_down"], r["bytes_up"], r["train_loss"]) for r in rounds(one)] == \
        [(r["bytes_down"], r["bytes_up"], r["train_loss"]) for r in rounds(two)]
    assert two.trainer.reason.endswith("; 2 clients at a time in this process, one torch "
                                       "thread each"), two.trainer.reason
    assert "at a time" not in one.trainer.reason


def test_lanes_by_default_on_two_threads_agree_with_one_at_a_time(tmp_path):
    """Not deterministic, two torch threads: autograd clients get one lane per thread by
    default (a client trained on one thread instead of two: equal to float tolerance)."""
    two = run_small(tmp_path, "two", trainer="autograd", threads=2, rounds=2)
    one = run_small(tmp_path, "one", trainer="autograd", threads=2, rounds=2, lanes=1)
    assert "2 clients at a time" in two.trainer.reason
    for k, v in one.state.weights.items():
        torch.testing.assert_close(two.state.weights[k], v, rtol=1e-4, atol=1e-5)
    assert torch.get_num_threads() == 2  # the lanes' one thread is not left behind


def test_a_client_that_sleeps_holds_only_its_own_lane(tmp_path, monkeypatch):
    """Client 0 (first in selection order) answers round 1 only after 8 s, past its 4 s
    deadline. With two lanes the other three train on the other lane meanwhile and are merged;
    one at a time they wait behind it and the round fails with it."""
    monkeypatch.setenv(FAULT_ENV, "sleep=8:0:1")
    common = dict(trainer="autograd", threads=2, rounds=2, round_timeout=4.0, round_retries=0)
    res = run_small(tmp_path, "lanes", **common)
    r1, r2 = rounds(res)
    assert [f["client_id"] for f in r1["failures"]] == [0]
    assert "deadline: no result" in r1["failures"][0]["reason"]
    assert "cannot stop it" in r1["failures"][0]["reason"]
    assert r1["clients_succeeded"] == 3
    assert r2["clients_succeeded"] == 4 and r2["failures"] == []
    with pytest.raises(RoundFailed, match="round 1: 0 of 4 clients succeeded"):
        run_small(tmp_path, "one", lanes=1, **common)
