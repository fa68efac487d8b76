"""Whole frames over real OS pipes: partial reads, short writes, EOF, EPIPE, size limit."""

from __future__ import annotations

import fcntl
import os
import threading

import pytest
import torch

from tinyfed import wire
from tinyfed.errors import WireError
from tinyfed.runtimes import pipeio


@pytest.fixture
def pipe():
    r, w = os.pipe()
    fds = {"r": r, "w": w}
    yield fds
    for fd in fds.values():
        if fd != -1:
            os.close(fd)


def close(fds, end):
    os.close(fds[end])
    fds[end] = -1


def big_frame() -> bytes:
    tensors = {"w": torch.arange(300_000, dtype=torch.float32)}  # 1.2 MB of payload
    return wire.encode_frame(wire.Kind.UPDATE, {"client_id": 1}, wire.encode_tensors(tensors))


def test_frame_larger_than_the_pipe_buffer_arrives_whole(pipe):
    fcntl.fcntl(pipe["w"], fcntl.F_SETPIPE_SZ, 4096)  # every write and read is partial
    frame = big_frame()
    assert len(frame) > 100 * fcntl.fcntl(pipe["w"], fcntl.F_GETPIPE_SZ)
    sent = []
    writer = threading.Thread(target=lambda: sent.append(pipeio.write_all(pipe["w"], frame)))
    writer.start()
    got = pipeio.read_frame(pipe["r"])
    writer.join()
    assert sent == [len(frame)]
    assert got == frame
    assert torch.equal(wire.decode_frame(got).tensors["w"], torch.arange(300_000.0))


def test_two_frames_back_to_back_are_split_exactly(pipe):
    a = wire.encode_frame(wire.Kind.TASK, {"n": 1}, b"")
    b = wire.encode_frame(wire.Kind.SHUTDOWN, {}, b"")
    pipeio.write_all(pipe["w"], a + b)
    assert pipeio.read_frame(pipe["r"]) == a
    assert pipeio.read_frame(pipe["r"]) == b


def test_eof_mid_frame_reports_bytes_and_never_returns_half(pipe):
    frame = wire.encode_frame(wire.Kind.UPDATE, {"x": 1}, b"\0" * 1000)
    pipeio.write_all(pipe["w"], frame[:500])
    close(pipe, "w")
    with pytest.raises(pipeio.PipeClosed, match=f"after 500 of {len(frame)} bytes") as err:
        pipeio.read_frame(pipe["r"])
    assert err.value.done == 500


def test_eof_at_a_frame_boundary(pipe):
    close(pipe, "w")
    with pytest.raises(pipeio.PipeClosed, match="at a frame boundary") as err:
        pipeio.read_frame(pipe["r"])
    assert err.value.done == 0


def test_broken_pipe_is_an_error_not_a_signal(pipe):
    close(pipe, "r")
    with pytest.raises(pipeio.PipeClosed, match="broken pipe after writing 0"):
        pipeio.write_all(pipe["w"], b"x" * 10)


def test_oversized_prefix_is_rejected_before_reading_the_body(pipe):
    prefix = wire.PREFIX.pack(wire.MAGIC, wire.VERSION, int(wire.Kind.UPDATE), 2, 1 << 40, 0)
    pipeio.write_all(pipe["w"], prefix)  # no body follows: a read of it would block forever
    with pytest.raises(WireError, match="exceeds the limit"):
        pipeio.read_frame(pipe["r"], max_size=1 << 20)


def test_garbage_prefix_is_rejected(pipe):
    pipeio.write_all(pipe["w"], b"G" * 24)
    with pytest.raises(WireError, match="not a tinyfed frame"):
        pipeio.read_frame(pipe["r"])
