"""End-to-end runs: outputs, determinism, resume after a real SIGKILL, eval and plot commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import small_config
from tinyfed.cli import main
from tinyfed.rundir import RunDir
from tinyfed.runner import execute, summary

SYNTH = ["--dataset", "synthetic", "--set", "synthetic_size=600", "--model", "mlp128",
         "--clients", "4", "--batch-size", "20", "--lr", "0.1", "--seed", "3"]


def run_api(tmp_path: Path, name: str, **over):
    cfg = small_config(out=str(tmp_path / name), **over)
    run_dir = RunDir.create(cfg)
    return execute(run_dir.saved_config(), run_dir, live=False, stream=open(os.devnull, "w"))


def weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_writes_every_output(tmp_path):
    res = run_api(tmp_path, "r", rounds=3)
    d = res.run_dir.path
    for name in ("config.toml", "metrics.jsonl", "partition.json", "model.safetensors",
                 "result.png"):
        assert (d / name).is_file(), name
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == [
        "round-000001.safetensors", "round-000002.safetensors", "round-000003.safetensors"]
    records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["clients_selected"] == 4 and r["clients_succeeded"] == 4
        assert r["clients_failed"] == 0 and 0 <= r["test_accuracy"] <= 1
        assert r["bytes_down"] > 0 and r["bytes_up"] > 0
    assert records[-1]["cum_bytes_down"] == sum(r["bytes_down"] for r in records)
    part = json.loads((d / "partition.json").read_text())
    assert sum(c["size"] for c in part["clients"]) == 600
    assert "test accuracy" in summary(res)


def test_learns_above_chance(tmp_path):
    res = run_api(tmp_path, "r", rounds=4, synthetic_size=1200)
    assert res.state.records[-1]["test_accuracy"] > 0.5  # 10 classes: chance is 0.1


def test_same_seed_same_model_bit_for_bit(tmp_path):
    a = run_api(tmp_path, "a", deterministic=True, fraction=0.5, clients=6)
    b = run_api(tmp_path, "b", deterministic=True, fraction=0.5, clients=6)
    c = run_api(tmp_path, "c", deterministic=True, fraction=0.5, clients=6, seed=4)
    assert weights_equal(a.state.weights, b.state.weights)
    assert not weights_equal(a.state.weights, c.state.weights)
    assert [r["test_accuracy"] for r in a.state.records] == [
        r["test_accuracy"] for r in b.state.records]


def test_fedsgd_is_one_full_batch_step(tmp_path):
    res = run_api(tmp_path, "sgd", batch_size=0, rounds=2, clients=2)
    # each of the 2 clients holds 300 examples and takes one full-batch step per round
    assert [r["steps"] for r in res.state.records] == [2, 2]
    assert all(r["num_examples"] == 600 for r in res.state.records)
    # against minibatches of 10: 30 steps per client per epoch, E=2 doubles them
    mini = run_api(tmp_path, "mini", batch_size=10, epochs=2, rounds=1, clients=2)
    assert mini.state.records[0]["steps"] == 2 * 2 * 30


def test_target_accuracy_stops_early(tmp_path):
    res = run_api(tmp_path, "t", rounds=20, target_accuracy=0.2, synthetic_size=1200)
    assert res.state.round < 20
    assert res.stop_reason == "target accuracy reached"


def test_eval_command_reports_accuracy_and_confusion(tmp_path, capsys):
    res = run_api(tmp_path, "r", rounds=2)
    assert main(["eval", str(res.run_dir.path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"] == pytest.approx(res.state.records[-1]["test_accuracy"])
    conf = torch.tensor(report["confusion"])
    assert conf.sum() == report["examples"] == 120
    assert conf.diag().sum() / conf.sum() == pytest.approx(report["accuracy"])
    ckpt = res.run_dir.checkpoints / "round-000001.safetensors"
    assert main(["eval", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "confusion matrix" in out and "per-class accuracy" in out


def test_plot_command_compares_runs(tmp_path, capsys):
    a = run_api(tmp_path, "a", rounds=2)
    b = run_api(tmp_path, "b", rounds=2, lr=0.05)
    out = tmp_path / "cmp.png"
    assert main(["plot", str(a.run_dir.path), str(b.run_dir.path), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    a.run_dir.plot.unlink()
    assert main(["plot", str(a.run_dir.path)]) == 0
    assert a.run_dir.plot.is_file()


def cli(args, env, **kw):
    return subprocess.run([sys.executable, "-m", "tinyfed", *args], env=env, capture_output=True,
                          text=True, timeout=120, **kw)


@pytest.mark.parametrize("codecs", [[], ["--codec", "delta+topk:0.1+int8+zstd", "--down-codec",
                                          "delta+stc:0.1+zstd", "--fraction", "0.5"]],
                         ids=["fp32", "error-feedback-and-steps"])
def test_resume_after_sigkill_is_bit_identical(tmp_path, cli_env, codecs):
    common = [*SYNTH, "--set", "synthetic_size=2000", "--epochs", "3", "--rounds", "7",
              "--checkpoint-every", "2", "--deterministic", *codecs]
    ref = cli(["run", *common, "--out", str(tmp_path / "ref")], cli_env)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "tinyfed", "run", *common, "--out", str(run),
                             "--plain"], env=cli_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert not (run / "model.safetensors").exists(), "the run finished before it was killed"
    done = len(metrics.read_text().splitlines())
    assert 3 <= done < 7
    res = cli(["run", "--resume", str(run), "--plain"], cli_env)
    assert res.returncode == 0, res.stderr
    got, want = load_file(run / "model.safetensors"), load_file(tmp_path / "ref/model.safetensors")
    assert weights_equal(got, want)
    rounds = [json.loads(line)["round"] for line in metrics.read_text().splitlines()]
    assert rounds == list(range(1, 8))


def test_run_refuses_to_overwrite_a_run(tmp_path, cli_env):
    res = run_api(tmp_path, "r", rounds=1)
    before = (res.run_dir.metrics).read_bytes()
    out = cli(["run", *SYNTH, "--out", str(res.run_dir.path)], cli_env)
    assert out.returncode == 2
    assert "already exists" in out.stderr and "Traceback" not in out.stderr
    assert res.run_dir.metrics.read_bytes() == before


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "--fraction", "0"], "'fraction' = 0"),
        (["run", "--fraction", "1.5"], "'fraction' = 1.5"),
        (["run", "--clients", "-3"], "'clients' = -3"),
        (["run", "--dataset", "imagenet"], "'dataset'"),
        (["run", "--model", "resnet"], "'model'"),
        (["run", "--partition", "magic"], "'partition'"),
        (["run", "--alpha", "0", "--partition", "dirichlet"], "'alpha' = 0"),
        (["run", "--rounds", "many"], "invalid int value"),
        (["run", "--set", "colour=red"], "unknown config key 'colour'"),
        (["run", "--config", "/nonexistent.toml"], "does not exist"),
        (["run", *SYNTH, "--clients", "5000"], "5000"),
        (["run", *SYNTH, "--partition", "shards", "--shards-per-client", "7"], "shard"),
        (["run", *SYNTH, "--model", "no_such_module:make"], "cannot import"),
        (["eval", "/nonexistent"], "does not exist"),
        (["plot", "/tmp"], "metrics.jsonl"),
        (["run", "--resume", "/tmp"], "not a tinyfed run folder"),
        (["run", "--dataset", "mnist", "--data-dir", "/nonexistent-dir"], "mnist"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, cli_env, args, needle):
    env = {**cli_env, "TINYFED_MIRROR": "http://127.0.0.1:9/"}
    out = cli([*args, "--out", str(tmp_path / "x")] if args[0] == "run" and "--resume" not in
              args else args, env, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_resume_rejects_an_incompatible_config(tmp_path, cli_env):
    res = run_api(tmp_path, "r", rounds=1)
    out = cli(["run", "--resume", str(res.run_dir.path), "--lr", "0.9"], cli_env)
    assert out.returncode == 2
    assert "cannot resume" in out.stderr and "lr" in out.stderr
    ok = cli(["run", "--resume", str(res.run_dir.path), "--rounds", "2", "--plain"], cli_env)
    assert ok.returncode == 0, ok.stderr
    assert len(res.run_dir.metrics.read_text().splitlines()) == 2


def test_user_model_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "from torch import nn\n"
        "def make(shape, n):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(shape[0] * shape[1] * shape[2], n))\n")
    monkeypatch.chdir(tmp_path)
    res = run_api(tmp_path, "u", model="mymodels:make", rounds=1)
    assert set(res.state.weights) == {"1.weight", "1.bias"}
    assert res.state.weights["1.weight"].shape == (10, 784)


def test_ctrl_c_raises_now_and_again_at_the_next_result_if_it_was_swallowed():
    from tinyfed.core import RunCore
    from tinyfed.experiment import Experiment
    from tinyfed.metrics import EventBus
    from tinyfed.protocol import ClientResult
    from tinyfed.runner import interrupts

    core = RunCore(Experiment.build(small_config()), EventBus())
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), interrupts(core):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            pass  # swallowed, as Python does inside a finalizer
        core.admit(ClientResult(0, 1, False, reason="x"), {}, {})  # raises it again
    assert core.interrupted and signal.getsignal(signal.SIGINT) is before
