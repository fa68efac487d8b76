"""Async runs over real HTTP checked against hand-computed models.

A real `tinyfed serve --mode async` process on 127.0.0.1 (free port, tokens file) is driven by a
real client process (tests/async_driver.py) that posts crafted updates — every tensor filled with
a constant the test chose, a chosen `num_examples` — one at a time, each once the previous one
has been merged. The test recomputes every global model from the rule's formula written out here
(float64 arithmetic, float32 result, as the server stores it) and compares the model served
before each post and the run's final model.safetensors with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import small_config
from tests.http_helpers import Procs, env, wait_for
from tests.test_http_run import free_port
from tinyfed.experiment import Experiment
from tinyfed.runtimes.http.auth import new_tokens, write_tokens

DRIVER = Path(__file__).with_name("async_driver.py")
CLIENTS, CONCURRENCY, PER_ROUND = 4, 3, 2  # --fraction 0.5 of 4 clients: a round is 2 updates
SERVE = dict(dataset="synthetic", synthetic_size=600, model="mlp128", clients=CLIENTS,
             fraction=0.5, batch_size=20, lr=0.1, seed=3, mode="async", concurrency=CONCURRENCY)


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.kill_all()


def run_async(tmp_path: Path, procs: Procs, rounds: int, actions: list[dict], *flags: str):
    """Serve, drive with the plan, wait for both to end; (log, served models, final, records)."""
    tokens, out, drv = tmp_path / "tokens.txt", tmp_path / "run", tmp_path / "driver"
    write_tokens(tokens, new_tokens(range(CLIENTS)))
    drv.mkdir()
    port = free_port()
    server = procs.start(
        "serve", "--dataset", "synthetic", "--set", "synthetic_size=600", "--model", "mlp128",
        "--clients", str(CLIENTS), "--fraction", "0.5", "--concurrency", str(CONCURRENCY),
        "--batch-size", "20", "--lr", "0.1", "--seed", "3", "--mode", "async",
        "--rounds", str(rounds), "--plain", "--port", str(port), "--tokens", str(tokens),
        "--out", str(out), *flags, log=tmp_path / "serve.log")
    wait_for(lambda: "serving on" in (tmp_path / "serve.log").read_text()
             or server.poll() is not None, what="the server")
    plan = {"server": f"http://127.0.0.1:{port}", "tokens": str(tokens), "out": str(drv),
            "clients": list(range(CLIENTS)), "concurrency": CONCURRENCY, "actions": actions}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with (tmp_path / "driver.log").open("wb") as fh:
        driver = subprocess.Popen([sys.executable, str(DRIVER), str(tmp_path / "plan.json")],
                                  env=env(), stdin=subprocess.DEVNULL, stdout=fh,
                                  stderr=subprocess.STDOUT)
    procs.procs.append(driver)  # reaped by pid at teardown like the server
    for proc, name in ((driver, "driver"), (server, "serve")):
        wait_for(lambda p=proc: p.poll() is not None, what=f"the {name} process to end")
        assert proc.returncode == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    log = json.loads((drv / "log.json").read_text())
    served = [load_file(str(drv / f"model-{i}.safetensors")) for i in range(len(actions))]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    return log, served, load_file(str(out / "model.safetensors")), records


# -- the rules, written out by hand (float64 inside, float32 stored) ---------------------------

def f64(w):
    return {k: v.to(torch.float64) for k, v in w.items()}


def f32(w):
    return {k: v.to(torch.float32) for k, v in w.items()}


def filled(like, value: float):
    return {k: torch.full(v.shape, value, dtype=torch.float64) for k, v in like.items()}


class Hand:
    """The global model's history as the rule's formula gives it, one accepted post at a time."""

    def __init__(self, initial, rule: str, alpha=0.0, poly=0.0, size=0, lr=0.0):
        self.rule, self.alpha, self.poly, self.size, self.lr = rule, alpha, poly, size, lr
        self.w, self.version, self.a = initial, 0, 0.0
        self.versions = {0: initial}
        self.sums, self.count = None, 0
        self.staleness: list[int] = []

    def s(self, tau: int) -> float:
        return (1.0 + tau) ** -self.poly  # polynomial:A; A = 0 is the constant function

    def post(self, value: float, n: int, task_version: int) -> None:
        tau = self.version - task_version
        self.staleness.append(tau)
        w, u = f64(self.w), filled(self.w, value)
        if self.rule == "seed-merge":  # (a·w + b·u)/(a+b), a += b
            new = {k: (self.a * w[k] + n * u[k]) / (self.a + n) for k in w}
            self.a += n
        elif self.rule == "fedasync":  # (1 − α·s(τ))·w + α·s(τ)·u
            t = self.alpha * self.s(tau)
            new = {k: (1.0 - t) * w[k] + t * u[k] for k in w}
        else:  # fedbuff: Σ s(τ)·(u − base) over `size` updates, then w + η·Σ/size
            base = f64(self.versions[task_version])
            delta = {k: self.s(tau) * (u[k] - base[k]) for k in w}
            self.sums = delta if self.sums is None else {k: self.sums[k] + delta[k] for k in w}
            self.count += 1
            if self.count < self.size:
                return
            new = {k: w[k] + self.lr / self.count * self.sums[k] for k in w}
            self.sums, self.count = None, 0
        self.w = f32(new)
        self.version += 1
        self.versions[self.version] = self.w


def close(got, want) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], want[k], rtol=2.4e-7, atol=1e-7)  # float32 rounding


def check_run(log, served, final, records, hand: Hand, rounds: int) -> None:
    """Replay the log by hand; every served model, the final one and the records must agree."""
    initial = served[0]
    exp = Experiment.build(small_config(rounds=rounds, **SERVE))
    assert all(torch.equal(initial[k], exp.initial[k]) for k in exp.initial)  # version 0
    accepted = []
    for entry, model in zip(log, served):
        assert entry["model_version"] == hand.version
        close(model, hand.w)
        if entry["status"] == 200:
            action = entry["action"]
            hand.post(action["value"], action["n"], entry["version"])
            accepted.append(entry)
    close(final, hand.w)
    updates = [r for r in records if r["kind"] == "update"]
    total = rounds * PER_ROUND
    assert len(accepted) == total
    assert [u["update"] for u in updates] == list(range(1, total + 1))
    merged = [(u["client_id"], u["task"]) for u in updates]
    assert len(set(merged)) == len(merged)  # no task merged twice
    assert merged == [(e["client_id"], e["round"]) for e in accepted]  # in the order posted
    assert [u["staleness"] for u in updates] == hand.staleness
    assert [u["num_examples"] for u in updates] == [e["action"]["n"] for e in accepted]
    assert updates[-1]["version"] == hand.version
    round_recs = [r for r in records if r["kind"] == "round"]
    assert [r["round"] for r in round_recs] == list(range(1, rounds + 1))
    assert [r["updates"] for r in round_recs] == [PER_ROUND * r for r in range(1, rounds + 1)]


def good(picks: str, values: list[float], ns: list[int]) -> list[dict]:
    return [{"pick": "new" if p == "n" else "old", "value": v, "n": n}
            for p, v, n in zip(picks, values, ns)]


def test_seed_merge_over_http_matches_hand_computation(tmp_path, procs):
    actions = good("onnoon", [0.5, -0.25, 1.0, 0.125, -0.75, 0.375], [3, 7, 2, 9, 5, 4])
    log, served, final, records = run_async(tmp_path, procs, 3, actions,
                                            "--async-rule", "seed-merge")
    check_run(log, served, final, records, Hand(served[0], "seed-merge"), 3)
    # the running example-weighted mean of every constant posted
    want = sum(a["value"] * a["n"] for a in actions) / sum(a["n"] for a in actions)
    assert all(torch.allclose(t, torch.full_like(t, want)) for t in final.values())


def test_fedasync_over_http_weights_stale_updates_less(tmp_path, procs):
    actions = good("oonoon", [0.5, -0.25, 1.0, 0.125, -0.75, 0.375], [3, 7, 2, 9, 5, 4])
    log, served, final, records = run_async(
        tmp_path, procs, 3, actions, "--async-rule", "fedasync", "--async-alpha", "0.6",
        "--staleness", "polynomial:1")
    hand = Hand(served[0], "fedasync", alpha=0.6, poly=1.0)
    check_run(log, served, final, records, hand, 3)
    assert hand.staleness[0] == 0 and max(hand.staleness) >= 2  # s(τ) took several values


def test_fedbuff_over_http_applies_every_two_updates(tmp_path, procs):
    actions = good("onoono", [0.5, -0.25, 1.0, 0.125, -0.75, 0.375], [3, 7, 2, 9, 5, 4])
    log, served, final, records = run_async(
        tmp_path, procs, 3, actions, "--async-rule", "fedbuff", "--buffer-size", "2",
        "--server-lr", "0.8", "--staleness", "polynomial:0.5")
    hand = Hand(served[0], "fedbuff", poly=0.5, size=2, lr=0.8)
    check_run(log, served, final, records, hand, 3)
    assert max(hand.staleness) >= 1  # a stale delta was down-weighted
    updates = [r for r in records if r["kind"] == "update"]
    assert [u["version"] for u in updates] == [0, 1, 1, 2, 2, 3]  # one step per two updates


def test_refused_updates_over_http_leave_the_model_alone(tmp_path, procs):
    actions = [
        {"pick": "old", "value": 0.5, "n": 3},
        {"bad": "dup"},  # the same frame again: 409, nothing merged
        {"pick": "old", "bad": "shape"},  # 422: a tensor of the wrong shape
        {"pick": "new", "value": -0.25, "n": 7},
        {"pick": "old", "bad": "examples"},  # 422: more examples than the client's shard
        {"pick": "old", "value": 1.0, "n": 2},
        {"pick": "new", "value": 0.125, "n": 9},
    ]
    log, served, final, records = run_async(tmp_path, procs, 2, actions, "--async-rule",
                                            "fedasync", "--async-alpha", "0.5")
    assert [e["status"] for e in log] == [200, 409, 422, 200, 422, 200, 200]
    assert "duplicate" in log[1]["response"]["error"]
    assert "shape" in log[2]["response"]["error"]
    assert "num_examples" in log[4]["response"]["error"]
    for i in (1, 2, 4):  # the model served after each refusal is the one served before it
        assert log[i + 1]["model_version"] == log[i]["model_version"]
        assert all(torch.equal(served[i + 1][k], served[i][k]) for k in served[i])
    check_run(log, served, final, records, Hand(served[0], "fedasync", alpha=0.5), 2)
    failures = [f for r in records if r["kind"] == "round" for f in r["failures"]]
    assert sorted((f["client_id"], f["task"]) for f in failures) == sorted(
        (log[i]["client_id"], log[i]["round"]) for i in (2, 4))
    assert all("rejected update" in f["reason"] for f in failures)
