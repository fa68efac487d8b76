"""The batch's shared weights read once (`wire.PayloadMemo`): a worker handed several task
frames with the same payload computes its checksum and checks its decoded values once, yet
every frame's checksum is still verified, a corrupted frame is still refused, bad weights
fail every task that carries them, and the answers equal handling each frame alone."""

from __future__ import annotations

import torch

from tests.conftest import same_tensors, small_config
from tests.test_vectorized import worker_and_frames
from tinyfed import protocol, wire
from tinyfed.client import TrainSettings, task_seed
from tinyfed.experiment import Experiment
from tinyfed.protocol import ClientTask, task_frame
from tinyfed.wire import Kind


def frames_for(payload: bytes, clients=range(4), down_codec: str = "") -> list[bytes]:
    settings = TrainSettings(epochs=1, batch_size=10, lr=0.1)
    return [task_frame(ClientTask(cid, 1, task_seed(3, 1, cid), settings, "",
                                  down_codec=down_codec), payload) for cid in clients]


def count_checks(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = wire.validate_tensors

    def counting(tensors, spec, what="update", max_abs=float("inf")):
        seen.append(what)
        return real(tensors, spec, what, max_abs)

    monkeypatch.setattr(protocol.wire, "validate_tensors", counting)
    return seen


def test_a_repeated_payload_is_recognised_and_every_checksum_still_checked():
    payload = wire.encode_tensors({"w": torch.arange(6.0)})
    a = wire.encode_frame(Kind.TASK, {"client_id": 1}, payload)
    b = wire.encode_frame(Kind.TASK, {"client_id": 2}, payload)
    memo = wire.PayloadMemo()
    first, second = wire.decode_frame(a, memo=memo), wire.decode_frame(b, memo=memo)
    assert (first.repeat, second.repeat) == (False, True)
    assert second.header == {"client_id": 2} and torch.equal(second.tensors["w"], torch.arange(6.0))
    assert second.tensors["w"].data_ptr() != first.tensors["w"].data_ptr()  # nothing shared
    for at in (len(b) - 3, 30):  # the payload's bytes, then the header's: caught either way
        bad = bytearray(b)
        bad[at] ^= 0x01
        try:
            wire.decode_frame(bytes(bad), memo=memo)
        except wire.WireError as exc:
            assert "checksum mismatch" in str(exc)
        else:
            raise AssertionError(f"a corrupted byte at {at} passed")


def test_a_batch_checks_its_shared_weights_once_and_answers_as_alone(monkeypatch):
    worker, _ = worker_and_frames("fused")
    alone, _ = worker_and_frames("fused")
    initial = Experiment.build(small_config()).initial
    one = frames_for(wire.encode_tensors(initial))
    other = frames_for(wire.encode_tensors({k: v + 0.01 for k, v in initial.items()}), [3])
    batch = [one[0], one[1], other[0], one[2], one[3]]  # the memo keeps the last payload
    checks = count_checks(monkeypatch)
    replies = worker.handle_many(batch)
    assert checks.count("global model") == 3  # one (twice: once), other, one again (twice)
    for reply, frame in zip(replies, batch):
        got, want = wire.decode_frame(reply), wire.decode_frame(alone.handle(frame))
        assert got.kind == want.kind == Kind.UPDATE
        assert same_tensors(got.tensors, want.tensors)
        assert got.size == want.size


def test_bad_weights_fail_every_task_that_carries_them(monkeypatch):
    worker, _ = worker_and_frames("fused")
    poisoned = {k: v.clone() for k, v in Experiment.build(small_config()).initial.items()}
    next(iter(poisoned.values())).view(-1)[0] = float("nan")
    checks = count_checks(monkeypatch)
    replies = worker.handle_many(frames_for(wire.encode_tensors(poisoned)))
    assert len(checks) == 4  # a failed check is never remembered as passed
    for reply in replies:
        msg = wire.decode_frame(reply)
        assert msg.kind == Kind.FAILURE and "global model" in msg.header["reason"]


def test_the_check_is_remembered_per_down_codec(monkeypatch):
    worker, _ = worker_and_frames("fused")
    initial = Experiment.build(small_config()).initial
    half = {k: v.half() for k, v in initial.items()}
    payload = wire.encode_tensors(half)
    batch = [*frames_for(payload, [0, 1], "fp16"), *frames_for(payload, [2]),
             *frames_for(payload, [3], "fp16")]
    checks = count_checks(monkeypatch)
    replies = [wire.decode_frame(r) for r in worker.handle_many(batch)]
    # the same bytes read without fp16 are half-precision where floats belong: checked, refused
    assert [r.kind for r in replies] == [Kind.UPDATE, Kind.UPDATE, Kind.FAILURE, Kind.UPDATE]
    assert "float16" in replies[2].header["reason"]
    assert len(checks) == 2  # fp16 once, identity once
