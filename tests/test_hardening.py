"""One client's bad input never stops the run, and nothing finished is lost.

Metrics and weights that would poison the model, its records or its checkpoint are refused at
the boundary; hostile headers end in the project's error; the norm guard is checked against
hand computation; a record or checkpoint that cannot be written stops the run resumably.
"""

from __future__ import annotations

import io
import json
import os
import threading
import tracemalloc
from pathlib import Path

import pytest
import torch

from tests.conftest import on_replies, small_config
from tinyfed import wire
from tinyfed.core import RunStopped
from tinyfed.errors import TinyfedError, WireError
from tinyfed.guard import NormGuard, distance
from tinyfed.metrics import records_at
from tinyfed.protocol import ClientTask, Expectation, check_metrics, read_update
from tinyfed.rundir import RunDir
from tinyfed.runner import execute
from tinyfed.runtimes import pipeio
from tinyfed.wire import Kind

REF = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}


def update(tensors=None, **header):
    h = {"client_id": 1, "round": 1, "version": 0, "num_examples": 10, "codec": "",
         "metrics": {"train_loss": 0.5, "steps": 1}, **header}
    return wire.encode_frame(Kind.UPDATE, h, wire.encode_tensors(tensors or REF))


def expectation(max_abs=1e6):
    from tinyfed.client import TrainSettings

    task = ClientTask(1, 1, 0, TrainSettings())
    return Expectation(task, REF, wire.spec_of(REF), 100, max_abs=max_abs)


# -- metrics and weights ---------------------------------------------------------------------

@pytest.mark.parametrize("metrics,field", [
    ({"train_loss": float("nan")}, "train_loss"),
    ({"train_loss": float("inf")}, "train_loss"),
    ({"train_loss": 1e308}, "train_loss"),
    ({"train_loss": -1.0}, "train_loss"),
    ({"train_loss": 10**400}, "train_loss"),  # float() of it would raise OverflowError
    ({"train_loss": "0.1"}, "train_loss"),
    ({"train_loss": True}, "train_loss"),
    ({"steps": 1e15}, "steps"),
    ({"accuracy": 0.5}, "accuracy"),
])
def test_metric_out_of_range_is_refused_naming_it(metrics, field):
    with pytest.raises(WireError, match=field):
        check_metrics(metrics)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e300
           for v in metrics.values()):  # what JSON can carry: the whole frame is refused
        res = read_update(update(metrics=metrics), expectation())
        assert not res.ok and field in res.reason


def test_metrics_within_range_pass_as_floats():
    assert check_metrics({"train_loss": 2, "steps": 30}) == {"train_loss": 2.0, "steps": 30.0}


def test_huge_finite_weights_are_refused():
    res = read_update(update({"w": torch.full((3, 2), 1e38), "b": torch.zeros(2)}),
                      expectation())
    assert not res.ok and "'w'" in res.reason and "beyond ±1e+06" in res.reason
    ok = read_update(update({"w": torch.full((3, 2), 9e5), "b": torch.zeros(2)}), expectation())
    assert ok.ok


@pytest.mark.parametrize("header,what", [
    ('{"a":' * 20 + "1" + "}" * 20, "nests deeper"),
    ('{"round": ' + "9" * 5000 + "}", "digits"),
    ('{"x": NaN}', "NaN"),
    ('{"x": -Infinity}', "Infinity"),
    ('{"x": 1e999}', "out of range"),
    ('[1, 2]', "JSON object"),
    ('{"x": "\udcff"}', "UTF-8"),
])
def test_hostile_headers_end_in_wire_error(header, what):
    head = header.encode("utf-8", "surrogateescape")
    with pytest.raises(WireError, match=what):
        wire.decode_header(head)
    frame = wire.PREFIX.pack(wire.MAGIC, wire.VERSION, int(Kind.UPDATE), len(head), 0,
                             wire.crc32(head, wire.crc32(b""))) + head
    with pytest.raises(WireError):
        wire.decode_frame(frame)


def test_update_for_another_version_is_refused():
    res = read_update(update(version=3), expectation())
    assert not res.ok and "model version 3" in res.reason


# -- the norm guard ----------------------------------------------------------------------------

def test_norm_guard_by_hand():
    assert distance({"w": torch.tensor([3.0, 4.0])}, {"w": torch.zeros(2)}) == 5.0
    guard = NormGuard(ratio=10)
    ref = {"w": torch.zeros(1)}
    for n in (1.0, 2.0, 3.0, 4.0):  # round 1: no history yet, everything finite passes
        assert guard.check({"w": torch.tensor([n])}, ref) == ""
    guard.end_round()
    assert guard.check({"w": torch.tensor([1000.0])}, ref) == ""  # 4 norms < MIN_HISTORY (5)
    guard.end_round()
    # history 1, 2, 3, 4, 1000: median 3, bound 30
    assert guard.check({"w": torch.tensor([29.0])}, ref) == ""
    reason = guard.check({"w": torch.tensor([-31.0])}, ref)
    assert "31" in reason and "norm_ratio=10" in reason and "median 3" in reason
    saved = json.loads(json.dumps(guard.state_dict()))  # what a checkpoint carries
    again = NormGuard(ratio=10)
    again.load_state_dict(saved)
    assert again.check({"w": torch.tensor([31.0])}, ref) == reason
    assert again.check({"w": torch.tensor([30.0])}, ref) == ""
    off = NormGuard(ratio=0)
    off.history.extend([1.0] * 10)
    assert off.check({"w": torch.tensor([1e5])}, ref) == ""


def tamper(runtime, client_id: int, edit):
    """From the in-process runtime's worker, let `edit(header, tensors)` rewrite one client's
    update frames (as a malicious but authenticated client would)."""

    def rewrite(frame: bytes, reply: bytes) -> bytes:
        msg = wire.decode_frame(reply)
        if msg.header.get("client_id") != client_id or msg.kind != Kind.UPDATE:
            return reply
        header, tensors = edit(dict(msg.header), dict(msg.tensors))
        return wire.encode_frame(Kind.UPDATE, header, wire.encode_tensors(tensors))

    on_replies(runtime.worker, rewrite)


class Hooked:
    """An in-process runtime whose worker is tampered with once it has started."""

    def __init__(self, cfg, client_id, edit):
        from tinyfed.runtimes.dispatch import Dispatcher
        from tinyfed.runtimes.inprocess import InProcessRuntime

        self.rt = Dispatcher(InProcessRuntime(cfg), cfg.round_timeout)
        self.client_id, self.edit = client_id, edit
        self.submits: list[tuple[int, int]] = []

    def start(self, exp):
        self.rt.start(exp)
        tamper(self.rt, self.client_id, self.edit)

    def submit(self, task, payload, expect):
        self.submits.append((task.round, task.client_id))
        self.rt.submit(task, payload, expect)

    def results(self, timeout):
        return self.rt.results(timeout)

    def pending(self):
        return self.rt.pending()

    def close(self):
        self.rt.close()


def run(tmp_path: Path, name: str, runtime=None, **over):
    cfg = small_config(out=str(tmp_path / name), **over)
    run_dir = RunDir.create(cfg)
    return execute(run_dir.saved_config(), run_dir, live=False, stream=io.StringIO(),
                   runtime=runtime)


@pytest.mark.parametrize("edit,why", [
    (lambda h, t: ({**h, "metrics": {"train_loss": 1e300}}, t), "train_loss"),
    (lambda h, t: (h, {k: torch.full_like(v, 1e38) for k, v in t.items()}), "beyond"),
    (lambda h, t: ({**h, "codec": "delta"}, t), "codec"),
])
def test_a_poisoned_update_is_refused_and_the_run_completes(tmp_path, edit, why):
    cfg = small_config(rounds=3)
    res = run(tmp_path, "r", runtime=Hooked(cfg, 2, edit), rounds=3)
    recs = res.state.records
    assert [r["clients_failed"] for r in recs] == [1, 1, 1]
    assert all(why in r["failures"][0]["reason"] and r["failures"][0]["client_id"] == 2
               for r in recs)
    assert all(r["test_loss"] is not None and r["test_accuracy"] > 0.2 for r in recs)
    lines = (res.run_dir.path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    for line in lines:  # strict JSON: a NaN or Infinity constant would raise here
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
    assert len(list((res.run_dir.path / "checkpoints").glob("round-*"))) == 3


def test_scaled_update_is_refused_by_the_norm_guard(tmp_path):
    """A client that scales its change 1000× is refused once the guard has a history."""
    cfg = small_config(rounds=4)

    def scale(h, t):
        return h, {k: v * 1000 for k, v in t.items()}

    res = run(tmp_path, "r", runtime=Hooked(cfg, 1, scale), rounds=4, norm_ratio=20)
    recs = res.state.records
    # 1000× the weights are within max_weight; from round 1 (no history yet) the bound is the
    # global model's own norm
    assert all(r["clients_failed"] == 1 and "norm_ratio=20" in r["failures"][0]["reason"]
               for r in recs)
    assert "global model's norm" in recs[0]["failures"][0]["reason"]
    assert recs[-1]["test_accuracy"] > 0.3


def test_norm_guard_bounds_by_the_model_norm_before_any_history():
    guard = NormGuard(ratio=10)
    ref = {"w": torch.tensor([3.0, 4.0])}  # ‖ref‖ = 5: an update may move it by at most 50
    assert guard.check({"w": torch.tensor([3.0, 53.9])}, ref) == ""
    reason = guard.check({"w": torch.tensor([3.0, 54.1])}, ref)
    assert "50.1" in reason and "global model's norm 5" in reason


def test_retry_reruns_only_the_failed_clients(tmp_path):
    """min_clients = all: client 2's rejected update makes the round retry, and only client 2
    is asked again (the others' updates are kept, not thrown away)."""
    # the fused trainer: clients one by one, so the retried client alone trains bit for bit as
    # it would have among the others (stacked, it would match to float tolerance only)
    one = dict(rounds=1, min_clients=4, round_retries=2, trainer="fused")
    cfg = small_config(**one)
    seen = []

    def once(h, t):
        seen.append(h["round"])
        if len(seen) == 1:
            return {**h, "metrics": {"train_loss": -1}}, t
        return h, t

    hooked = Hooked(cfg, 2, once)
    res = run(tmp_path, "r", runtime=hooked, **one)
    assert hooked.submits == [(1, 0), (1, 1), (1, 2), (1, 3), (1, 2)]
    rec = res.state.records[0]
    assert rec["clients_succeeded"] == 4 and rec["clients_failed"] == 1
    assert rec["failures"][0]["attempt"] == 1 and rec["failures"][0]["client_id"] == 2
    # the same round with no fault gives the same model: the retried client trains the same task
    clean = run(tmp_path, "clean", **one)
    assert all(torch.equal(clean.state.weights[k], res.state.weights[k])
               for k in clean.state.weights)


# -- durability --------------------------------------------------------------------------------

def test_a_metrics_file_that_cannot_be_written_stops_the_run_resumably(tmp_path):
    full = run(tmp_path, "full", rounds=4, deterministic=True)
    cfg = small_config(out=str(tmp_path / "broken"), rounds=4, deterministic=True)
    run_dir = RunDir.create(cfg)
    metrics = run_dir.metrics

    def break_disk(record):  # after round 2 is written: the file is gone, a folder in its place
        if record["round"] == 2:
            metrics.rename(metrics.with_suffix(".saved"))
            metrics.mkdir()

    with pytest.raises(RunStopped) as err:
        execute(run_dir.saved_config(), run_dir, live=False, stream=io.StringIO(),
                subscribers=[break_disk])
    msg = str(err.value)
    assert "round 3" in msg and "round-000002.safetensors" in msg and "\n" not in msg
    metrics.rmdir()
    metrics.with_suffix(".saved").rename(metrics)
    res = execute(run_dir.saved_config(), RunDir(run_dir.path), resuming=True, live=False,
                  stream=io.StringIO())
    assert all(torch.equal(full.state.weights[k], res.state.weights[k])
               for k in full.state.weights)
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 3, 4]


def test_checkpoints_do_not_grow_with_the_run(tmp_path):
    from tinyfed.checkpoint import load_checkpoint

    res = run(tmp_path, "r", rounds=12, keep_checkpoints=20)
    folder = res.run_dir.path / "checkpoints"
    sizes = {n: (folder / f"round-{n:06d}.safetensors").stat().st_size for n in (2, 12)}
    _, state = load_checkpoint(folder / "round-000012.safetensors")
    assert "records" not in state
    # 10 more rounds of records would add ~6 kB; the guard's window of norms is bounded
    assert sizes[12] - sizes[2] < 1500


def test_records_are_rebuilt_from_the_metrics_file_and_checked(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [{"kind": "round", "round": r, "test_accuracy": 0.1 * r} for r in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert records_at(path, {"round": 2}) == recs[:2]
    path.write_text("".join(json.dumps(r) + "\n" for r in (recs[0], recs[2])))
    with pytest.raises(TinyfedError, match="not 1..2"):
        records_at(path, {"round": 2})
    path.write_text(json.dumps(recs[0]) + "\n{not json\n")
    with pytest.raises(TinyfedError, match="metrics.jsonl:2"):
        records_at(path, {"round": 1})
    assert records_at(tmp_path / "none.jsonl", {"round": 0}) == []


# -- pipes ---------------------------------------------------------------------------------------

def test_pipe_reader_allocates_what_arrives_not_what_is_announced():
    r, w = os.pipe()
    try:
        prefix = wire.PREFIX.pack(wire.MAGIC, wire.VERSION, int(Kind.UPDATE), 2, 200 << 20, 0)

        def send():
            pipeio.write_all(w, prefix + b"{}" + b"x" * 1000)
            os.close(w)

        t = threading.Thread(target=send)
        tracemalloc.start()
        t.start()
        with pytest.raises(pipeio.PipeClosed, match="EOF after 1026 of"):
            pipeio.read_frame(r, 256 << 20)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        t.join()
        assert peak < 4 << 20  # a 200 MB announcement cost a few kB, not 200 MB
    finally:
        os.close(r)


# -- progress inside a round --------------------------------------------------------------------

def test_progress_line_by_hand():
    from tinyfed.progress import status

    event = {"round": 3, "done": 4, "planned": 10, "failed": 1, "bytes": 2_500_000,
             "seconds": 20.0, "rounds": 5}
    # 20 s for 4 of 10 clients: 30 s left in this round; 2 more rounds at the 50 s mean
    assert status(event, [40.0, 60.0]) == ("round 3: 4/10 clients (1 failed) · 2.50 MB so far"
                                           " · round ETA 30 s · run ETA 2 min 10 s")
    assert status({**event, "done": 0, "failed": 0}, []) == "round 3: 0/10 clients · 2.50 MB so far"


def test_progress_events_follow_every_client_of_a_round(tmp_path):
    from tinyfed.metrics import EventBus

    bus = EventBus()
    events = []
    bus.watch(events.append)
    cfg = small_config(out=str(tmp_path / "r"), rounds=2, clients=4)
    run_dir = RunDir.create(cfg)
    execute(run_dir.saved_config(), run_dir, live=False, stream=io.StringIO(), bus=bus)
    assert [(e["round"], e["done"]) for e in events] == [(r, d) for r in (1, 2)
                                                        for d in range(5)]
    assert all(e["planned"] == 4 for e in events)
    assert events[4]["bytes"] > events[1]["bytes"] > 0
    assert all(r.get("kind") != "progress" for r in bus.history)  # never kept, never written
