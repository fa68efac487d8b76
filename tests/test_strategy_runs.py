"""Strategies in whole runs: resume bit-identical with each one's state, SCAFFOLD's variates
over real transports with their bytes counted, robust rules under attack, DP's budget, a
user's strategy, and the one-line errors for bad settings."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import folder_records as records
from tests.conftest import run_small as run
from tests.conftest import same_tensors as same
from tests.conftest import small_config
from tinyfed import wire
from tinyfed.client import TrainSettings
from tinyfed.experiment import Experiment
from tinyfed.protocol import ClientTask, ClientWorker, Expectation, read_update, task_frame
from tinyfed.rundir import RunDir
from tinyfed.runner import execute
from tinyfed.strategies import STRATEGIES

STATEFUL = {"fedavgm", "fedadagrad", "fedadam", "fedyogi", "scaffold", "dp-fedavg"}
EXTRA = {"dp-fedavg": dict(dp_noise=0.3, dp_clip=2.0, dp_adaptive=False), "krum": dict(krum_f=1),
         "multi-krum": dict(krum_f=1)}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_resume_is_bit_identical_with_every_strategy(tmp_path, strategy):
    over = dict(strategy=strategy, rounds=4, clients=6, fraction=1.0, keep_checkpoints=10,
                **EXTRA.get(strategy, {}))
    full = run(tmp_path, "full", **over)
    copy = tmp_path / "copy"
    shutil.copytree(full.run_dir.path, copy)
    for n in (3, 4):
        (copy / "checkpoints" / f"round-00000{n}.safetensors").unlink()
    (copy / "model.safetensors").unlink()
    resumed = execute(RunDir(copy).saved_config(), RunDir(copy), resuming=True, live=False,
                      stream=io.StringIO())
    assert same(resumed.state.weights, full.state.weights)
    assert records(copy) == records(full.run_dir.path)
    if strategy in STATEFUL:  # the state really was in the checkpoint, and it mattered
        from safetensors.torch import load_file

        saved = load_file(str(copy / "checkpoints" / "round-000002.safetensors"))
        has_tensors = any(k.startswith("policy::") for k in saved)
        assert has_tensors or strategy == "dp-fedavg"


def test_scaffold_over_processes_and_http_equals_inprocess_with_its_bytes_counted(tmp_path):
    over = dict(strategy="scaffold", rounds=2, clients=4, fraction=1.0, deterministic=True)
    plain = run(tmp_path, "fedavg", **{**over, "strategy": "fedavg"})
    base = run(tmp_path, "inprocess", **over)
    model = len(wire.encode_tensors(Experiment.build(small_config()).initial))
    for runtime, workers in (("processes", 2), ("http", 4)):
        other = run(tmp_path, runtime, runtime=runtime, workers=workers, **over)
        assert same(other.state.weights, base.state.weights), runtime
        for a, b in zip(other.state.records, base.state.records):
            assert (a["bytes_down"], a["bytes_up"]) == (b["bytes_down"], b["bytes_up"]), runtime
    for a, b in zip(base.state.records, plain.state.records):
        # down: the model + c + c_i; up: the weights + Δc_i (fp32, the model's size each)
        extra_down, extra_up = a["bytes_down"] - b["bytes_down"], a["bytes_up"] - b["bytes_up"]
        assert 2 * 4 * model <= extra_down <= 2 * 4 * model * 1.01
        assert 4 * model <= extra_up <= 4 * model * 1.01


def test_a_scaffold_result_without_its_variate_is_refused_not_merged():
    cfg = small_config()
    exp = Experiment.build(cfg)
    worker = ClientWorker(cfg.model, exp.dataset.input_shape, exp.dataset.num_classes,
                          exp.shard)
    task = ClientTask(0, 1, 5, TrainSettings(batch_size=20))  # a client that ignores SCAFFOLD
    reply = worker.handle(task_frame(task, wire.encode_tensors(exp.initial)))
    expect = Expectation(task, exp.initial, exp.spec, 10_000,
                         extras={f"dc/{k}": s for k, s in exp.spec.items()})
    result = read_update(reply, expect)
    assert not result.ok and "missing tensors" in result.reason and "dc/" in result.reason


@pytest.mark.parametrize("attack", ["sign-flip", "scale"])
def test_robust_rules_hold_under_attack_where_fedavg_falls(tmp_path, attack):
    """2 of 10 clients attack with attack_scale 10. (At that strength gaussian noise and label
    flipping do not break FedAvg on this data: docs/benchmarks.md.)"""
    over = dict(clients=10, fraction=1.0, rounds=5, synthetic_size=2000, byzantine=2,
                attack=attack, krum_f=2, trim_fraction=0.2, seed=4)
    acc = {}
    for strategy in ("fedavg", "median", "trimmed-mean", "krum"):
        res = run(tmp_path, strategy, strategy=strategy, **over)
        acc[strategy] = res.state.records[-1]["test_accuracy"]
        chosen = res.state.records[0]["byzantine"]
        assert len(chosen) == 2 and all(r["byzantine"] == chosen for r in res.state.records)
    clean = run(tmp_path, "clean", **{**over, "byzantine": 0}).state.records[-1]["test_accuracy"]
    assert acc["fedavg"] < 0.6 * clean, (acc, clean)
    for strategy in ("median", "trimmed-mean", "krum"):
        assert acc[strategy] > 0.9 * clean, (strategy, acc, clean)


def test_dp_run_reports_epsilon_every_round_and_stops_at_the_target(tmp_path):
    res = run(tmp_path, "dp", strategy="dp-fedavg", clients=20, fraction=0.5, rounds=50,
              dp_noise=1.0, dp_clip=1.0, target_epsilon=8.0)
    eps = [r["epsilon"] for r in res.state.records]
    assert eps == sorted(eps) and eps[-1] <= 8.0 and len(eps) < 50
    assert "privacy budget" in res.stop_reason
    from tinyfed.runner import summary

    assert f"ε = {eps[-1]:.3f} at δ = 1e-05" in summary(res)


def test_a_user_strategy_by_module_path(tmp_path):
    res = run(tmp_path, "user", strategy="tests.user_strategy:Halfway", rounds=2)
    assert [r["halfway_rounds"] for r in res.state.records] == [1, 2]


def test_a_user_client_algorithm_by_module_path_runs_in_child_processes(tmp_path):
    over = dict(rounds=1, clients=2, fraction=1.0, deterministic=True)
    plain = run(tmp_path, "plain", **over)
    inproc = run(tmp_path, "in", strategy="tests.user_strategy:WithSignSGD", **over)
    procs = run(tmp_path, "procs", strategy="tests.user_strategy:WithSignSGD",
                runtime="processes", workers=2, **over)
    assert same(inproc.state.weights, procs.state.weights)
    assert not same(inproc.state.weights, plain.state.weights)  # the algorithm really ran


def test_a_task_cannot_make_a_client_call_an_arbitrary_callable():
    from tinyfed.algorithms import client_algorithm
    from tinyfed.errors import WireError

    with pytest.raises(WireError, match="not a subclass of tinyfed.algorithms.Plain"):
        client_algorithm("os:getcwd")
    with pytest.raises(WireError, match="unknown client algorithm 'nope'"):
        client_algorithm("nope")


@pytest.mark.parametrize("args, words", [
    (["--strategy", "fedmagic"], ["strategy", "fedmagic", "fedavg", "krum"]),
    (["--attack", "bribe", "--byzantine", "1"], ["attack", "bribe", "sign-flip"]),
    (["--mu", "-0.1"], ["mu", "-0.1", "greater than or equal to 0"]),
    (["--trim-fraction", "0.5"], ["trim_fraction", "0.5", "less than 0.5"]),
    (["--strategy", "krum", "--krum-f", "2", "--clients", "6"],
     ["krum_f = 2", "2f+3", "f ≤ 1"]),
    (["--dp-clip", "0"], ["dp_clip", "greater than 0"]),
    (["--dp-noise", "-1"], ["dp_noise", "greater than or equal to 0"]),
    (["--dp-delta", "1"], ["dp_delta", "less than 1"]),
    (["--byzantine", "99"], ["byzantine (99) exceeds clients"]),
])
def test_bad_strategy_settings_exit_2_with_one_line(tmp_path, cli_env, args, words):
    proc = subprocess.run([sys.executable, "-m", "tinyfed", "run", "--dataset", "synthetic",
                           "--out", str(tmp_path / "r"), *args], env=cli_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert all(w in err for w in words), err


def test_a_target_epsilon_already_spent_at_resume_is_exit_2(tmp_path, cli_env):
    out = tmp_path / "dp"
    base = [sys.executable, "-m", "tinyfed", "run", "--plain"]
    first = subprocess.run([*base, "--dataset", "synthetic", "--model", "mlp128", "--clients",
                            "20", "--fraction", "0.5", "--rounds", "3", "--strategy",
                            "dp-fedavg", "--dp-noise", "1", "--out", str(out)],
                           env=cli_env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    spent = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["epsilon"]
    late = subprocess.run([*base, "--resume", str(out), "--rounds", "6", "--target-epsilon",
                           "1"], env=cli_env, capture_output=True, text=True, timeout=300)
    assert late.returncode == 2 and "Traceback" not in late.stderr
    assert late.stderr.strip() == (f"tinyfed: error: target_epsilon = 1: the 3 rounds already "
                                   f"run spent ε = {spent:.4g} (δ=1e-05); allowed: a target of "
                                   f"at least {spent:.4g}")
    ok = subprocess.run([*base, "--resume", str(out), "--rounds", "6", "--target-epsilon",
                         str(round(spent + 0.5, 2))], env=cli_env, capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0 and "privacy budget: round 4 would bring ε to" in ok.stdout
