"""Dealing the jobs submitted together out to workers by their work (`runtimes.base.deal`)."""

from __future__ import annotations

import pytest

from tinyfed.runtimes.base import deal


def test_the_long_clients_are_spread_not_given_to_one_worker():
    # by count in submit order this was [600, 500, 100] + [100, 100, 100]: 1,200 against 300
    sizes = [600, 500, 100, 100, 100, 100]
    parts = deal(sizes, 2, float)
    assert parts == [[600, 100, 100], [500, 100, 100]]
    assert [sum(p) for p in parts] == [800, 700]


def test_equal_work_alternates_and_keeps_each_part_in_submit_order():
    jobs = list("abcde")
    assert deal(jobs, 2, lambda _: 1.0) == [["a", "c", "e"], ["b", "d"]]
    assert deal(jobs, 5, lambda _: 1.0) == [["a"], ["b"], ["c"], ["d"], ["e"]]


def test_at_most_most_items_a_part():
    # one huge job and many small ones: the small ones cannot all pile onto one part
    sizes = [1000, 1, 1, 1, 1, 1]
    assert deal(sizes, 2, float) == [[1000], [1, 1, 1, 1, 1]]
    assert deal(sizes, 2, float, most=3) == [[1000, 1, 1], [1, 1, 1]]


@pytest.mark.parametrize("n,parts", [(1, 1), (7, 3), (10, 2), (3, 3)])
def test_every_job_is_dealt_exactly_once(n, parts):
    jobs = list(range(n))
    dealt = deal(jobs, parts, lambda j: (j * 37) % 11 + 1)
    assert len(dealt) == parts and all(dealt)
    assert sorted(j for p in dealt for j in p) == jobs
    assert all(p == sorted(p) for p in dealt)
