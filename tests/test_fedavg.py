"""Aggregation arithmetic against hand computation."""

import numpy as np
import pytest
import torch

from tinyfed.metrics import rounds_to_target
from tinyfed.server import OrderedFeed
from tinyfed.strategies import FedAvg, select_clients


def test_weighted_mean_by_hand():
    ref = {"w": torch.zeros(2), "b": torch.zeros(1)}
    agg = FedAvg().begin_round(ref, 1)
    agg.add_weights({"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}, 100)
    agg.add_weights({"w": torch.tensor([4.0, 8.0]), "b": torch.tensor([0.0])}, 300)
    out = agg.result()
    # (100·1 + 300·4)/400 = 3.25 ; (100·2 + 300·8)/400 = 6.5 ; (100·3)/400 = 0.75
    assert torch.equal(out["w"], torch.tensor([3.25, 6.5]))
    assert torch.equal(out["b"], torch.tensor([0.75]))
    assert out["w"].dtype == torch.float32


def test_empty_round_has_no_result():
    assert FedAvg().begin_round({"w": torch.zeros(1)}, 1).result() is None


def test_single_client_mean_is_its_weights():
    w = {"w": torch.randn(5)}
    agg = FedAvg().begin_round(w, 1)
    agg.add_weights(w, 7)
    assert torch.equal(agg.result()["w"], w["w"])


def test_selection_count_and_determinism():
    ids = list(range(100))
    a = select_clients(ids, 10, seed=1, round_num=3)
    assert len(a) == 10 and len(set(a)) == 10 and a == sorted(a)
    assert a == select_clients(ids, 10, seed=1, round_num=3)
    assert a != select_clients(ids, 10, seed=1, round_num=4)


def test_ordered_feed_makes_order_irrelevant():
    rng = np.random.default_rng(0)
    ups = [({"w": torch.tensor(rng.normal(size=1000).astype(np.float32))}, int(n))
           for n in rng.integers(1, 1000, size=8)]

    class R:
        def __init__(self, cid, w, n):
            self.client_id, self.weights, self.num_examples = cid, w, n

    def run(order):
        agg = FedAvg().begin_round({"w": torch.zeros(1000)}, 1)
        feed = OrderedFeed(list(range(8)), agg.add, ordered=True)
        for cid in order:
            feed.put(cid, R(cid, *ups[cid]) if cid != 5 else None)
        return agg.result()["w"]

    base = run(range(8))
    for _ in range(5):
        assert torch.equal(base, run(rng.permutation(8).tolist()))


def test_rounds_to_target_interpolates_monotone_curve():
    recs = [{"round": r, "test_accuracy": a} for r, a in
            [(1, 0.5), (2, 0.8), (3, 0.7), (4, 0.9)]]
    # best-so-far: 0.5 0.8 0.8 0.9 ; 0.85 lies halfway between round 3 (0.8) and 4 (0.9)
    assert abs(rounds_to_target(recs, 0.85) - 3.5) < 1e-9
    assert rounds_to_target(recs, 0.95) is None
    assert rounds_to_target(recs, 0.8) == 2.0


def test_rounds_to_target_never_interpolates_before_the_first_evaluation():
    # 0.95 at round 1 with target 0.90 is round 1, not 0.947 (toward an invented (0, 0%))
    assert rounds_to_target([{"round": 1, "test_accuracy": 0.95}], 0.90) == 1.0
    # evaluated every 5 rounds: the first point (round 5) is the answer when it is above
    recs = [{"round": 5, "test_accuracy": 0.92}, {"round": 10, "test_accuracy": 0.96}]
    assert rounds_to_target(recs, 0.90) == 5.0
    assert rounds_to_target(recs, 0.94) == pytest.approx(7.5)  # between the two evaluated points
    # rounds without evaluation (None) are not points
    recs = [{"round": 1, "test_accuracy": 0.5}, {"round": 2, "test_accuracy": None},
            {"round": 3, "test_accuracy": 0.7}]
    assert rounds_to_target(recs, 0.6) == pytest.approx(2.0)
