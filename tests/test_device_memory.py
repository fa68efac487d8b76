"""A device's error-feedback memory: carried with its task, replaced only when the server admits
the update, saved in checkpoints (resume bit-identical with every codec), never counted as link
traffic, and refused when it does not fit the model."""

from __future__ import annotations

import io
import shutil

import pytest
import torch

from tests.conftest import folder_records as records
from tests.conftest import run_small as run
from tests.conftest import same_tensors as same
from tests.conftest import small_config
from tinyfed import wire
from tinyfed.client import TrainSettings
from tinyfed.compress import parse_pipeline
from tinyfed.errors import WireError
from tinyfed.experiment import Experiment
from tinyfed.memory import DeviceMemory
from tinyfed.protocol import (
    ClientResult,
    ClientTask,
    ClientWorker,
    Expectation,
    read_update,
    task_frame,
)
from tinyfed.rundir import RunDir
from tinyfed.runner import execute

CODEC = "delta+topk:0.1+int8"
SETTINGS = TrainSettings(1, 20, "sgd", 0.1, 0.0, 0.0)


@pytest.fixture(scope="module")
def setup():
    cfg = small_config(codec=CODEC)
    exp = Experiment.build(cfg)
    worker = ClientWorker(cfg.model, exp.dataset.input_shape, exp.dataset.num_classes, exp.shard)
    return cfg, exp, worker


def ask(exp, worker, memory: dict, round_num: int = 1, codec: str = CODEC):
    """Run one task for client 1 with `memory`; the reply frame and what the server reads."""
    task = ClientTask(1, round_num, 7, SETTINGS, codec)
    payload, size = wire.join_memory(wire.encode_tensors(exp.initial), memory)
    task = ClientTask(1, round_num, 7, SETTINGS, codec, memory_bytes=size)
    reply = worker.handle(task_frame(task, payload))
    spec = parse_pipeline(codec).memory_spec(exp.spec)
    expect = Expectation(task, exp.initial, exp.spec, exp.shard_size(1), memory=spec)
    return reply, read_update(reply, expect)


def test_the_worker_keeps_nothing_and_the_memory_comes_back_with_the_update(setup):
    _, exp, worker = setup
    first, got = ask(exp, worker, {})
    assert got.ok, got.reason
    want = parse_pipeline(CODEC).memory_spec(exp.spec)
    assert set(got.memory) == set(want) and len(want) == len([
        v for v in exp.initial.values() if v.is_floating_point()])
    # the link carries the frame without the memory section
    msg = wire.decode_frame(first)
    assert got.bytes_up == len(first) - msg.memory_bytes and msg.memory_bytes > 0
    # the same task with the same memory is the same update, byte for byte (a retry)
    again, _ = ask(exp, worker, {})
    assert again == first
    # with the returned residual the next update differs, and adds back what was held back
    second, got2 = ask(exp, worker, got.memory)
    assert second != first and got2.ok
    residual = torch.cat([v for _, v in sorted(got.memory.items())])
    assert float(residual.abs().sum()) > 0


def test_memory_that_does_not_fit_the_model_is_refused(setup):
    _, exp, worker = setup
    reply, got = ask(exp, worker, {})
    msg = wire.decode_frame(reply)
    name = sorted(got.memory)[0]
    for bad, reason in [({**got.memory, name: got.memory[name][:-1]}, "shape"),
                        ({**got.memory, name: torch.full_like(got.memory[name], float("nan"))},
                         "non-finite"),
                        ({k: v for k, v in got.memory.items() if k != name}, "missing"),
                        ({**got.memory, "topk_residual/ghost": torch.zeros(3)}, "unknown")]:
        body, size = wire.join_memory(wire.encode_tensors(msg.tensors), bad)
        frame = wire.encode_frame(wire.Kind.UPDATE, {**msg.header, "memory_bytes": size}, body)
        task = ClientTask(1, 1, 7, SETTINGS, CODEC)
        expect = Expectation(task, exp.initial, exp.spec, exp.shard_size(1),
                             memory=parse_pipeline(CODEC).memory_spec(exp.spec))
        result = read_update(frame, expect)
        assert not result.ok and "device memory" in result.reason and reason in result.reason


@pytest.mark.parametrize("size", [-1, 10**9, "x", True])
def test_a_memory_size_that_lies_is_a_wire_error(size):
    frame = wire.encode_frame(wire.Kind.UPDATE, {"memory_bytes": size},
                              wire.encode_tensors({"a": torch.zeros(2)}))
    with pytest.raises(WireError, match="memory_bytes"):
        wire.decode_frame(frame)


def test_memory_changes_only_when_the_server_admits_the_update(setup):
    cfg, exp, _ = setup
    mem = DeviceMemory(CODEC, exp.spec)
    task = ClientTask(1, 1, 7, SETTINGS, CODEC)
    sent, payload = mem.attach(task, b"model")
    assert sent.memory_bytes == 0 and payload == b"model"  # first task: nothing to send
    assert mem.report() == {"memory_fresh": 1, "memory_clients": 0}
    held = {k: torch.ones(s.shape) for k, s in mem.spec.items()}
    mem.commit(ClientResult(1, 1, True, memory=held))
    failed = ClientResult.failure(task, "deadline")
    failed.memory = {k: torch.zeros(s.shape) for k, s in mem.spec.items()}
    mem.commit(failed)  # a failure never replaces it
    sent, payload = mem.attach(task, b"model")
    assert sent.memory_bytes > 0 and payload.startswith(b"model")
    restored = DeviceMemory(CODEC, exp.spec)
    restored.load(mem.tensors())
    assert all(torch.equal(restored.store[1][k], held[k]) for k in held)
    assert mem.report() == {"memory_fresh": 0, "memory_clients": 1}
    assert DeviceMemory("delta+int8", exp.spec).spec == {}  # a stateless codec keeps none


UP = ["", "fp16", "int8:channel", "int8+zstd", "qsgd:8", "delta+int8", "delta+qsgd:4+zstd",
      "delta+topk:0.2", "delta+topk:0.2+int8+zstd", "delta+stc:0.2", "delta+topk:0.1+qsgd:5"]
DOWN = ["fp16", "int8+zstd", "qsgd:6", "delta+topk:0.2+int8+zstd", "delta+stc:0.1",
        "delta+qsgd:6"]
PAIRS = [(up, "") for up in UP] + [("delta+topk:0.2+int8", down) for down in DOWN]


@pytest.mark.parametrize("codec,down_codec", PAIRS)
def test_resume_is_bit_identical_with_every_codec(tmp_path, codec, down_codec):
    over = dict(codec=codec, down_codec=down_codec, rounds=4, clients=6, fraction=0.5,
                keep_checkpoints=10)
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
    if parse_pipeline(codec).stateful:  # the memory was in the checkpoint and it mattered
        from safetensors.torch import load_file

        saved = load_file(str(copy / "checkpoints" / "round-000002.safetensors"))
        assert any(k.startswith("device::") for k in saved)
        fresh = [r["memory_fresh"] for r in records(copy)]
        assert fresh[0] == 3 and sum(fresh) == records(copy)[-1]["memory_clients"]
    if down_codec.startswith("delta"):  # steps went out, and the history was checkpointed
        assert sum(r["down_steps"] for r in records(copy)) > 0
        from safetensors.torch import load_file

        saved = load_file(str(copy / "checkpoints" / "round-000002.safetensors"))
        assert any(k.startswith("broadcast::step/") for k in saved)


@pytest.mark.slow
def test_a_stateful_codec_over_processes_and_http_equals_inprocess(tmp_path):
    over = dict(codec="delta+topk:0.1+int8+zstd", down_codec="delta+stc:0.1+zstd", rounds=4,
                clients=6, fraction=0.5, deterministic=True)
    base = run(tmp_path, "inprocess", **over)
    model = len(wire.encode_tensors(Experiment.build(small_config()).initial))
    for rec in base.state.records:  # the memory section (a model's size) is not link traffic
        assert rec["bytes_down"] < rec["clients_selected"] * (model + 2000)
    assert sum(r["down_steps"] for r in base.state.records) > 0
    for runtime, workers in (("processes", 2), ("http", 3)):
        other = run(tmp_path, runtime, runtime=runtime, workers=workers, **over)
        assert same(other.state.weights, base.state.weights), runtime
        for a, b in zip(other.state.records, base.state.records):
            assert (a["bytes_down"], a["bytes_up"]) == (b["bytes_down"], b["bytes_up"]), runtime
