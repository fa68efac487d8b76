"""A real Fashion-MNIST FedAvg run whose accuracy is checked against published figures.

REFERENCE: a centralized MLP reaches ≈88% on Fashion-MNIST; two FedAvg rounds of the 2NN with
IID clients already pass 80%.
"""

import os

from tests.conftest import needs_fmnist
from tinyfed.config import build_config
from tinyfed.rundir import RunDir
from tinyfed.runner import execute


@needs_fmnist
def test_fedavg_on_fashion_mnist_learns(tmp_path):
    cfg = build_config(dict(clients=20, fraction=0.25, rounds=2, lr=0.05, batch_size=10,
                            out=str(tmp_path / "fm")))
    run = RunDir.create(cfg)
    with open(os.devnull, "w") as null:
        res = execute(run.saved_config(), run, live=False, stream=null)
    recs = res.state.records
    assert [r["clients_succeeded"] for r in recs] == [5, 5]
    assert recs[-1]["test_accuracy"] > 0.80
    assert recs[-1]["test_accuracy"] > recs[0]["test_accuracy"] - 0.01
    # 2NN weights at fp32 are 796,840 B; a task frame adds a small JSON header and framing.
    per_client = recs[0]["bytes_down"] / 5
    assert 796_840 < per_client < 796_840 * 1.01
