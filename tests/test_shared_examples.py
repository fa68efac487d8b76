"""One copy of the clients' examples, shared by the process runtime's children."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import small_config
from tinyfed.data.shared import attach, client_rows, publish
from tinyfed.errors import DataError
from tinyfed.experiment import Experiment


def test_published_examples_are_each_clients_rows_in_order_and_copy_on_write():
    x, y = torch.randn(50, 1, 3, 3), torch.randint(0, 10, (50,))
    parts = [np.array([4, 9, 30]), np.array([1]), np.array([], dtype=np.int64), np.array([7, 8])]
    desc = publish(x, y, parts, 10)
    try:
        mx, my = attach(desc)
        for cid, part in enumerate(parts):
            rows = client_rows(desc.starts, cid)
            assert torch.equal(mx[rows], x[part]) and torch.equal(my[rows], y[part])
        mx[0].fill_(99.0)  # a child that writes changes its own pages only
        assert torch.equal(attach(desc)[0][0], x[4])
        with pytest.raises(DataError, match="description says"):
            attach(dataclasses.replace(desc, count=desc.count + 1))
    finally:
        os.close(desc.fd)


def test_an_experiment_that_shares_keeps_every_shard_size_and_histogram():
    exp = Experiment.build(small_config(clients=5, partition="dirichlet"))
    before = [exp.shard(c) for c in exp.client_ids]
    hist, sizes = exp.histogram(), [exp.shard_size(c) for c in exp.client_ids]
    exp.share_examples()
    assert exp.histogram() == hist and [exp.shard_size(c) for c in exp.client_ids] == sizes
    for cid, old in enumerate(before):
        new = exp.shard(cid)
        assert torch.equal(new.x, old.x) and torch.equal(new.y, old.y)


def test_process_children_map_the_parents_copy_instead_of_loading_their_own(tmp_path):
    from tinyfed.runtimes.processes import ProcessRuntime

    cfg = small_config(runtime="processes", workers=2)
    exp = Experiment.build(cfg)
    rt = ProcessRuntime(cfg)
    rt.start(exp)
    try:
        for pid in rt.pids():
            maps = Path(f"/proc/{pid}/maps").read_text()
            assert "memfd:tinyfed-examples" in maps, pid
        assert "memfd:tinyfed-examples" in Path("/proc/self/maps").read_text()
    finally:
        rt.close()
