"""The downlink: steps from the model a client holds (the same model on both ends, bit for bit),
a whole model for a client too far behind, whole-model quantizers, and every lie refused."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import small_config
from tinyfed import wire
from tinyfed.broadcast import ModelSteps, SharedModel
from tinyfed.client import TrainSettings
from tinyfed.compress import apply_steps, memory_state, parse_pipeline
from tinyfed.errors import ConfigError, WireError
from tinyfed.experiment import Experiment
from tinyfed.protocol import ClientResult, ClientTask, ClientWorker, task_frame

SPEC = "delta+topk:0.1+int8+zstd"


def drift(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in model.items()}


def test_steps_rebuild_the_servers_model_bit_for_bit_and_feed_back_what_they_leave_out():
    exact = {"w": torch.zeros(40, 10), "b": torch.zeros(10)}
    steps = ModelSteps(SPEC, history=5, seed=1)
    held = steps.prepare(0, exact)
    steps.commit(ClientResult(7, 1, True, version=0))  # client 7 holds version 0
    models = [held]
    for v in range(1, 5):
        exact = drift(exact, v)
        models.append(steps.prepare(v, exact))
    payload, base, codec, memory = steps.for_client(7)
    assert (base, codec) == (0, SPEC) and len(payload) < len(steps.full)
    state = memory_state(memory)
    assert state["held_version"]["v"].tolist() == [0]
    got = apply_steps(wire.decode_tensors(payload), state["held"], 0, 4, SPEC)
    assert all(torch.equal(got[k], models[4][k]) for k in exact)
    # lossy steps, but no drift: what one step leaves out, the next one's difference carries
    gap = max(float((exact[k] - models[4][k]).abs().max()) for k in exact)
    assert 0 < gap < 0.05
    # a client that never took part holds the seeded initial model, version 0
    assert steps.for_client(8)[1:3] == (0, SPEC)
    # one further behind than the history gets the model
    for v in range(5, 11):
        exact = drift(exact, v)
        steps.prepare(v, exact)
    payload, base, _, memory = steps.for_client(7)
    assert base == -1 and memory == {} and payload == steps.full
    assert wire.decode_tensors(payload)["w"].equal(steps.models[10]["w"])
    assert steps.report() == {"down_steps": 2, "down_full": 1}
    assert sorted(steps.models) == [10]  # nobody holds a version within the history


def test_step_history_is_bounded_and_survives_a_checkpoint():
    exact = {"w": torch.zeros(100)}
    steps = ModelSteps("delta+topk:0.5", history=3, seed=0)
    for v in range(8):
        exact = drift(exact, v)
        steps.prepare(v, exact)
    assert sorted(steps.models) == [7] and sorted(steps.steps) == [5, 6, 7]
    steps.commit(ClientResult(2, 8, True, version=7))
    nxt = drift(exact, 98)
    steps.prepare(8, nxt)
    assert sorted(steps.models) == [7, 8]  # the current model and the one client 2 holds
    saved = steps.tensors()
    assert sorted({k.split("/")[1] for k in saved if "::model/" in k}) == ["7"]  # no copy of 8
    again = ModelSteps("delta+topk:0.5", history=3, seed=0)
    again.load(steps.state_dict(), saved)  # replays step 8 onto model 7
    assert again.for_client(2)[:3] == steps.for_client(2)[:3]
    assert torch.equal(again.models[8]["w"], steps.models[8]["w"])
    nxt = drift(exact, 99)
    assert torch.equal(again.prepare(9, nxt)["w"], steps.prepare(9, nxt)["w"])


def test_whole_model_quantizers_are_the_same_for_every_client_and_seeded():
    exact = {"w": torch.randn(3000, generator=torch.Generator().manual_seed(0))}
    a, b = SharedModel("qsgd:8+zstd", seed=4), SharedModel("qsgd:8+zstd", seed=4)
    seen = a.prepare(3, exact)
    assert torch.equal(seen["w"], b.prepare(3, exact)["w"])
    assert a.for_client(1) == a.for_client(2)
    assert float((seen["w"] - exact["w"]).abs().max()) < 0.2
    assert len(a.payload) < 3000 * 4 / 3


@pytest.fixture(scope="module")
def worker():
    cfg = small_config()
    exp = Experiment.build(cfg)
    return exp, ClientWorker(cfg.model, exp.dataset.input_shape, 10, exp.shard)


def answer(worker_, task, payload, memory):
    body, size = wire.join_memory(payload, memory)
    task = ClientTask(**{**task.__dict__, "memory_bytes": size})
    msg = wire.decode_frame(worker_.handle(task_frame(task, body)))
    return msg.kind, msg.header.get("reason", "")


def test_the_worker_refuses_steps_that_do_not_fit_the_model_it_holds(worker):
    exp, w = worker
    steps = ModelSteps(SPEC, history=5, seed=0)
    steps.prepare(0, exp.initial)
    steps.commit(ClientResult(1, 1, True, version=0))
    steps.prepare(1, drift(exp.initial, 1))
    steps.prepare(2, drift(exp.initial, 2))
    payload, base, codec, memory = steps.for_client(1)
    s = TrainSettings(1, 20, "sgd", 0.1, 0.0, 0.0)
    task = ClientTask(1, 3, 5, s, version=2, down_codec=codec, base_version=base)
    assert answer(w, task, payload, memory)[0] == wire.Kind.UPDATE
    other = {**memory, "held_version/v": torch.tensor([1])}
    cases = [
        (task, payload, other, "holds [1]"),  # a delta against a version it never got
        (task, payload, {}, "holds none"),
        (ClientTask(**{**task.__dict__, "version": 3}), payload, memory, "do not lead"),
        (task, wire.encode_tensors({"x/w": torch.zeros(1)}), memory, "'<version>/<name>'"),
        (ClientTask(**{**task.__dict__, "version": 10**12}), payload, memory, "forward steps"),
    ]
    for t, p, m, reason in cases:
        kind, why = answer(w, t, p, m)
        assert kind == wire.Kind.FAILURE and reason in why, why


def test_zstd_blocks_that_lie_about_their_size_are_refused():
    import zstandard

    p = parse_pipeline("int8+zstd", WireError)
    ref = {"w": torch.zeros(100)}
    enc = p.encode({"w": torch.randn(100)}, ref)
    assert p.decode(enc, ref)["w"].shape == (100,)
    big = zstandard.ZstdCompressor().compress(bytes(10_000))  # declares 10,000 bytes
    for block, reason in [(big, "declares 10000"), (b"not zstd at all", "not a zstd frame")]:
        bad = {"::zstd": torch.frombuffer(bytearray(block), dtype=torch.uint8)}
        with pytest.raises(WireError, match=reason):
            p.decode(bad, ref, limit=5_000)
    stream = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(100))
    with pytest.raises(WireError, match="declares"):
        p.decode({"::zstd": torch.frombuffer(bytearray(stream), dtype=torch.uint8)}, ref)


def test_step_downlinks_are_sync_only_and_whole_model_codecs_are_checked():
    with pytest.raises(ConfigError, match="mode 'async'"):
        small_config(mode="async", down_codec="delta+topk:0.1")
    with pytest.raises(ConfigError, match="start with delta"):
        small_config(down_codec="topk:0.1")
    assert small_config(down_codec=" delta + stc:0.05 + zstd").down_codec == \
        "delta+topk:0.05+ternary+zstd"
    assert small_config(mode="async", down_codec="qsgd:4+zstd").down_codec == "qsgd:4+zstd"


def test_the_report_and_the_estimate_show_each_direction(tmp_path, cli_env):
    import io
    import json
    import subprocess
    import sys

    from tinyfed.rundir import RunDir
    from tinyfed.runner import execute, summary

    cfg = small_config(out=str(tmp_path / "r"), clients=6, fraction=0.5, rounds=4,
                       codec="delta+stc:0.1+zstd", down_codec="delta+stc:0.1+zstd")
    run_dir = RunDir.create(cfg)
    res = execute(run_dir.saved_config(), run_dir, live=False, stream=io.StringIO())
    text = summary(res)
    up = next(line for line in text.splitlines() if line.startswith("codec up"))
    down = next(line for line in text.splitlines() if line.startswith("codec down"))
    assert "delta+topk:0.1+ternary+zstd" in up and "less" in up
    steps = sum(r["down_steps"] for r in res.state.records)
    full = sum(r["down_full"] for r in res.state.records)
    assert f"({steps} tasks got steps, {full} the whole model)" in down and steps > 0
    # the up ratio is the fp32 model payload over the mean bytes a task, as printed
    tasks = sum(r["clients_selected"] for r in res.state.records)
    w = len(wire.encode_tensors(res.experiment.initial))
    assert f"×{w / (res.state.cum_bytes_up / tasks):.1f} less" in up
    out = subprocess.run([sys.executable, "-m", "tinyfed", "bandwidth", "--dataset", "fmnist",
                          "--model", "mlp", "--clients", "100", "--fraction", "0.1",
                          "--codec", "delta+stc:0.01+zstd", "--down-codec",
                          "delta+stc:0.01+zstd", "--json"], env=cli_env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    t = json.loads(out.stdout)["traffic"]
    assert t["down_reduction"] > 5 and t["up_reduction"] > 100
    assert "10 such steps a task" in t["codec_size_source"]
