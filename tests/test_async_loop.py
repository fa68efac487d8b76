"""The asynchronous loop over the in-process runtime: records, determinism, resume, failures."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import on_replies, small_config
from tinyfed import wire
from tinyfed.async_loop import AsyncServer
from tinyfed.experiment import Experiment
from tinyfed.metrics import EventBus
from tinyfed.protocol import ClientResult
from tinyfed.rundir import RunDir
from tinyfed.runner import execute
from tinyfed.runtimes.dispatch import as_runtime
from tinyfed.runtimes.inprocess import InProcessRuntime
from tinyfed.server import RoundFailed
from tinyfed.strategies import make_async_rule
from tinyfed.worker import configure_torch

# the fused trainer: the in-process runtime runs clients one by one (stacked, its queued clients
# would finish together), as these tests of arrival order need
ASYNC = dict(mode="async", clients=4, fraction=0.5, concurrency=3, trainer="fused")


def server_for(cfg, runtime=None) -> AsyncServer:
    configure_torch(cfg)
    exp = Experiment.build(cfg)
    runtime = as_runtime(runtime or InProcessRuntime(cfg), cfg.round_timeout)
    runtime.start(exp)
    return AsyncServer(exp, runtime, make_async_rule(cfg), EventBus())


def run_folder(tmp_path: Path, name: str, **over):
    cfg = small_config(out=str(tmp_path / name), **{**ASYNC, **over})
    run_dir = RunDir.create(cfg)
    return execute(run_dir.saved_config(), run_dir, live=False, stream=io.StringIO())


def file_records(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_async_run_end_to_end(tmp_path):
    res = run_folder(tmp_path, "r", rounds=4, async_rule="fedasync", staleness="polynomial:0.5")
    lines = (res.run_dir.path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    updates = [r for r in records if r["kind"] == "update"]
    rounds = [r for r in records if r["kind"] == "round"]
    assert [r["update"] for r in updates] == list(range(1, 9))  # rounds × C·K
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert [r["version"] for r in updates] == list(range(1, 9))  # every merge bumps it
    # M=3 busy: the first update is fresh, later ones started 2 merges ago
    assert [r["staleness"] for r in updates] == [0, 1, 2, 2, 2, 2, 2, 2]
    for r in updates:
        assert r["num_examples"] > 0 and r["bytes_down"] > 0 and r["bytes_up"] > 0
    assert updates[-1]["cum_bytes_down"] == sum(r["bytes_down"] for r in updates)
    assert rounds[-1]["cum_bytes_up"] == updates[-1]["cum_bytes_up"]
    assert all(r["clients_succeeded"] == 2 and r["clients_failed"] == 0 for r in rounds)
    assert rounds[-1]["test_accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert res.stop_reason == "all updates merged"


@pytest.mark.parametrize("rule", ["seed-merge", "fedbuff"])
def test_same_seed_same_weights(rule):
    cfg = small_config(rounds=2, async_rule=rule, **ASYNC)
    a, b = server_for(cfg), server_for(cfg)
    a.run(), b.run()
    assert same(a.state.weights, b.state.weights)
    assert not same(a.state.weights, a.exp.initial)


def test_fedbuff_versions_and_bounded_base_memory():
    cfg = small_config(rounds=3, async_rule="fedbuff", buffer_size=3, clients=4, fraction=0.5,
                       concurrency=4, mode="async")
    s = server_for(cfg)
    s.run()
    ups = [r for r in s.update_records]
    assert len(ups) == 6
    assert [r["version"] for r in ups] == [0, 0, 1, 1, 1, 2]  # a step every 3 updates
    assert s.version == 2
    assert s.peak_versions <= s.concurrency + 1
    assert set(s.versions) <= {s.version} | {f.task.version for f in s.inflight.values()}


def test_resume_from_a_mid_run_checkpoint_is_exact(tmp_path):
    # buffer of 3 against rounds of 2 updates: the round-2 checkpoint holds a half-full buffer
    # and three in-flight tasks started from older models
    over = dict(rounds=4, async_rule="fedbuff", buffer_size=3, keep_checkpoints=10)
    full = run_folder(tmp_path, "full", **over)
    copy = tmp_path / "copy"
    shutil.copytree(full.run_dir.path, copy)
    for n in (3, 4):
        (copy / "checkpoints" / f"round-00000{n}.safetensors").unlink()
    (copy / "model.safetensors").unlink()
    saved = json.loads(json.dumps(RunDir(copy).latest()[1]))
    assert saved["extra"]["async"]["updates"] == 4 and saved["strategy_state"]["count"] == 1
    assert len(saved["extra"]["async"]["inflight"]) == 2
    ckpt = load_file(str(copy / "checkpoints" / "round-000002.safetensors"))
    extra = [k.removeprefix("policy::") for k in ckpt if k.startswith("policy::")]
    assert {k.split(".")[0] for k in extra} == {"base", "rule"}  # an older base, the buffer
    resumed = execute(RunDir(copy).saved_config(), RunDir(copy), resuming=True, live=False,
                      stream=io.StringIO())
    assert same(resumed.state.weights, full.state.weights)
    kinds = [(r["kind"], r.get("update"), r["round"]) for r in file_records(copy)]
    assert kinds == [(r["kind"], r.get("update"), r["round"])
                     for r in file_records(full.run_dir.path)]
    assert [r["round"] for r in resumed.state.records] == [1, 2, 3, 4]


def tamper_first(runtime: InProcessRuntime, client_id_box: list) -> None:
    """Make the first task's update carry a NaN: the wire checks must reject it."""

    def edit(frame: bytes, reply: bytes) -> bytes:
        if client_id_box:
            return reply
        msg = wire.decode_frame(reply)
        client_id_box.append(msg.header["client_id"])
        bad = {k: torch.full_like(v, float("nan")) for k, v in msg.tensors.items()}
        return wire.encode_frame(msg.kind, msg.header, wire.encode_tensors(bad))

    on_replies(runtime.worker, edit)


def test_rejected_update_leaves_model_untouched():
    cfg = small_config(rounds=1, async_rule="seed-merge", **ASYNC)
    s = server_for(cfg)
    box: list = []
    tamper_first(s.runtime, box)
    before = {k: v.clone() for k, v in s.state.weights.items()}
    s.fill()
    [result] = s.next_result()
    assert not result.ok and "rejected update" in result.reason
    s.handle(result)
    assert same(s.state.weights, before) and s.version == 0 and s.updates == 0
    assert s.rule.a == 0  # the rejected count was never added
    assert s.window.failures[0]["client_id"] == box[0]
    s.run()  # the run goes on without it
    rnd = list(s.state.records)[0]
    assert rnd["clients_succeeded"] == 2 and rnd["clients_failed"] == 1


class FailingRuntime(InProcessRuntime):
    """Every task of the chosen clients comes back as a failure (a dead device)."""

    def __init__(self, cfg, dead):
        super().__init__(cfg)
        self.dead = dead

    def receive(self, timeout):
        got = super().receive(timeout)
        if got is not None and got.result.client_id in self.dead:
            r = got.result
            got.result = ClientResult(r.client_id, r.round, False, reason="device died",
                                      bytes_down=r.bytes_down, version=r.version)
        return got


def test_failures_are_counted_and_the_run_finishes():
    cfg = small_config(rounds=2, async_rule="fedasync", **ASYNC)
    s = server_for(cfg, FailingRuntime(cfg, dead={0}))
    s.run()
    rounds = list(s.state.records)
    assert [r["clients_succeeded"] for r in rounds] == [2, 2]
    assert sum(r["clients_failed"] for r in rounds) >= 1
    assert all(r["client_id"] != 0 for r in s.update_records)


def test_all_clients_failing_stops_with_a_clear_error():
    cfg = small_config(rounds=2, async_rule="fedasync", **ASYNC)
    s = server_for(cfg, FailingRuntime(cfg, dead={0, 1, 2, 3}))
    with pytest.raises(RoundFailed, match="in a row"):
        s.run()
    assert same(s.state.weights, s.exp.initial)


def test_deadline_passed_is_a_failure_not_a_hang():
    cfg = small_config(rounds=1, async_rule="fedasync", round_timeout=1e-9, round_retries=0,
                       **ASYNC)
    s = server_for(cfg)
    with pytest.raises(RoundFailed):
        s.run()
    assert "deadline" in s.window.failures[0]["reason"]


class ReadyRuntime(InProcessRuntime):
    """In-process, but says every queued task can be taken at once (as the HTTP runtime does
    for updates already admitted), so the loop takes them as one batch."""

    def ready(self) -> int:
        return len(self.queue)


def test_waiting_results_are_merged_in_turn_and_replaced_with_one_model(monkeypatch):
    import tinyfed.async_loop as loop

    encoded: list[int] = []
    real = loop.downlink
    monkeypatch.setattr(loop, "downlink",
                        lambda w, spec, seed: encoded.append(1) or real(w, spec, seed))
    cfg = small_config(rounds=3, async_rule="seed-merge", **ASYNC)  # 6 merges, M=3
    s = server_for(cfg, ReadyRuntime(cfg))
    s.run()
    ups = [r for r in s.update_records]
    assert [r["version"] for r in ups] == [1, 2, 3, 4, 5, 6]  # every result merged, in turn
    # two batches of M=3 results, each against the model its 3 tasks left with: v0, then v3
    assert [r["staleness"] for r in ups] == [0, 1, 2, 0, 1, 2]
    assert len({r["task"] for r in ups}) == 6
    assert len(encoded) == 2  # v0 and v3 (the run ends with the second batch): not one per merge
    assert s.peak_versions <= s.concurrency + 1
    # seed-merge is the running mean of what was merged: check the arithmetic on the result
    assert s.rule.a == sum(r["num_examples"] for r in ups)
