"""Partitions: disjoint, complete where promised, the label structure each scheme claims, and
deterministic in the seed; bad arguments are one-line DataErrors naming the field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinyfed.data import PARTITIONS, label_histogram, partition
from tinyfed.errors import DataError

N_PER_CLASS = 600
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(10), N_PER_CLASS))


def assert_disjoint(parts: list[np.ndarray], n: int) -> np.ndarray:
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx), "clients share an example"
    assert allidx.min() >= 0 and allidx.max() < n
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "indices are sorted ascending"
    return allidx


def raises(match: str, **kwargs) -> DataError:
    args = {"labels": LABELS, "num_clients": 10, "scheme": "iid", "seed": 0} | kwargs
    with pytest.raises(DataError, match=match) as info:
        partition(args.pop("labels"), args.pop("num_clients"), args.pop("scheme"), **args)
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize("scheme", PARTITIONS)
def test_every_scheme_is_disjoint_and_deterministic(scheme: str) -> None:
    parts = partition(LABELS, 10, scheme, seed=3)
    assert len(parts) == 10
    assert_disjoint(parts, LABELS.size)
    again = partition(LABELS, 10, scheme, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    if scheme != "ranges":  # ranges is positional, it has nothing to draw
        other = partition(LABELS, 10, scheme, seed=4)
        assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


@pytest.mark.parametrize("scheme", ["iid", "shards", "ranges", "classes"])
def test_complete_when_sizes_divide(scheme: str) -> None:
    parts = partition(LABELS, 20, scheme, seed=1)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(LABELS.size))


def test_torch_labels_are_accepted() -> None:
    a = partition(torch.from_numpy(LABELS), 10, "dirichlet", seed=5)
    b = partition(LABELS, 10, "dirichlet", seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_iid_paper_split_and_remainder_dropped() -> None:
    labels = np.arange(60_000) % 10
    parts = partition(labels, 100, "iid", seed=0)
    assert [p.size for p in parts] == [600] * 100
    parts = partition(np.arange(6005) % 10, 10, "iid", seed=0)
    assert [p.size for p in parts] == [600] * 10
    assert np.concatenate(parts).size == 6000  # N mod K = 5 dropped
    hist = np.array(label_histogram(LABELS, partition(LABELS, 10, "iid", seed=0), 10))
    assert hist.min() > 20  # every client sees every class


def test_shards_paper_split_gives_at_most_two_labels() -> None:
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 6000))
    parts = partition(labels, 100, "shards", seed=0, shards_per_client=2)
    assert [p.size for p in parts] == [600] * 100
    per_client = [np.unique(labels[p]).size for p in parts]
    assert max(per_client) <= 2
    assert per_client.count(1) < 50  # shards really are mixed across clients


def test_shards_that_do_not_divide_are_an_error() -> None:
    err = raises("do not divide", scheme="shards", num_clients=7, shards_per_client=3)
    assert "num_clients=7" in str(err) and "shards_per_client=3" in str(err)
    raises("shards_per_client", scheme="shards", shards_per_client=0)


def test_dirichlet_honours_min_size_and_skews_with_small_alpha() -> None:
    parts = partition(LABELS, 20, "dirichlet", seed=2, alpha=0.1, min_size=50)
    assert min(p.size for p in parts) >= 50
    hist = np.array(label_histogram(LABELS, parts, 10))
    assert hist.sum(axis=1).tolist() == [p.size for p in parts]
    skewed = (hist.max(axis=1) / hist.sum(axis=1)).mean()
    flat = np.array(label_histogram(LABELS, partition(LABELS, 20, "dirichlet", seed=2,
                                                      alpha=1000.0), 10))
    assert skewed > 0.5 > (flat.max(axis=1) / flat.sum(axis=1)).mean()


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf")])
def test_dirichlet_rejects_bad_alpha(alpha: float) -> None:
    raises("alpha", scheme="dirichlet", alpha=alpha)


def test_dirichlet_impossible_min_size_is_an_error() -> None:
    err = raises("max_retries=5", scheme="dirichlet", num_clients=100, alpha=0.01,
                 min_size=55, max_retries=5)
    assert "alpha=0.01" in str(err) and "min_size=55" in str(err)
    raises("min_size", scheme="dirichlet", num_clients=100, min_size=61)
    raises("min_size", scheme="dirichlet", min_size=0)


def test_ranges_are_contiguous() -> None:
    parts = partition(LABELS, 7, "ranges", seed=0)
    size = LABELS.size // 7
    assert [p.tolist() for p in parts] == [list(range(i * size, (i + 1) * size))
                                           for i in range(7)]
    parts = partition(LABELS, 3, "ranges", seed=0, range_size=100)
    assert [(p[0], p[-1], p.size) for p in parts] == [(0, 99, 100), (100, 199, 100),
                                                      (200, 299, 100)]
    raises("range_size", scheme="ranges", range_size=601)
    raises("range_size", scheme="ranges", range_size=0)


def test_classes_gives_exactly_k_labels_spread_evenly() -> None:
    parts = partition(LABELS, 10, "classes", seed=0, classes_per_client=2)
    hist = np.array(label_histogram(LABELS, parts, 10))
    assert ((hist > 0).sum(axis=1) == 2).all()
    assert ((hist > 0).sum(axis=0) == 2).all()  # every class held by exactly two clients
    assert set(hist[hist > 0].tolist()) == {300}  # each holder gets half of that class
    parts = partition(LABELS, 7, "classes", seed=0, classes_per_client=3)
    hist = np.array(label_histogram(LABELS, parts, 10))
    assert ((hist > 0).sum(axis=1) == 3).all()
    holders = (hist > 0).sum(axis=0)
    assert holders.max() - holders.min() <= 1


@pytest.mark.parametrize("k", [0, 11])
def test_classes_per_client_out_of_range(k: int) -> None:
    raises("classes_per_client", scheme="classes", classes_per_client=k)


@pytest.mark.parametrize("clients", [0, -3, LABELS.size + 1])
def test_bad_num_clients(clients: int) -> None:
    raises("num_clients", num_clients=clients)


def test_bad_scheme_and_labels() -> None:
    err = raises("unknown partition scheme", scheme="noniid")
    assert all(s in str(err) for s in PARTITIONS)
    raises("labels", labels=LABELS.reshape(60, 100))
    raises("labels", labels=LABELS.astype(np.float32))
    raises("labels", labels=np.array([0, -1, 2]), num_clients=1)


def test_label_histogram_counts() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    assert label_histogram(labels, [np.array([0, 1]), np.array([2, 3, 4, 5])], 4) == [
        [1, 1, 0, 0], [0, 1, 3, 0]]
    with pytest.raises(DataError, match="num_classes"):
        label_histogram(labels, [np.arange(6)], 2)
