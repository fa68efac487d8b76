"""Property-based fuzzing of every decoder a client's bytes reach (hypothesis).

Frames, headers, codec payloads and pipe framing: whatever the bytes, the result is a valid
object or the project's own `WireError` / `PipeClosed`, never another exception, never a hang.
Runs are bounded (a fixed number of examples, a deadline per example, a derandomized seed), so
the suite stays repeatable.
"""

from __future__ import annotations

import json
import os
import threading

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyfed import wire
from tinyfed.client import TrainSettings
from tinyfed.compress import parse_pipeline
from tinyfed.errors import WireError
from tinyfed.protocol import ClientResult, ClientTask, Expectation, check_update
from tinyfed.runtimes import pipeio
from tinyfed.wire import Kind

FUZZ = settings(max_examples=300, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

REF = {"fc.weight": torch.linspace(-1, 1, 12).reshape(4, 3), "fc.bias": torch.zeros(4)}
SPEC = wire.spec_of(REF)
CODECS = ["", "delta", "fp16", "int8", "delta+topk:0.5", "delta+topk:0.25+int8",
          "delta+int8:channel"]


def expectation(codec: str) -> Expectation:
    task = ClientTask(1, 1, 0, TrainSettings(), codec)
    return Expectation(task, REF, SPEC, 100, max_frame=1 << 20)


def honest_frame(codec: str, scale: float = 0.1) -> bytes:
    local = {k: v + scale for k, v in REF.items()}
    tensors = parse_pipeline(codec).encode(local, REF, {})
    header = {"client_id": 1, "round": 1, "version": 0, "num_examples": 10, "codec": codec,
              "metrics": {"train_loss": 0.5, "steps": 3}}
    return wire.encode_frame(Kind.UPDATE, header, wire.encode_tensors(tensors))


def judged(frame: bytes, codec: str) -> ClientResult | None:
    """check_update's verdict: a result whose tensors are admissible, or None (WireError)."""
    try:
        result = check_update(frame, expectation(codec))
    except WireError:
        return None
    if result.ok:
        wire.validate_tensors(result.weights, SPEC, max_abs=1e6)  # what was admitted is valid
    return result


@FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_never_escape_as_another_error(data):
    try:
        wire.decode_frame(data, 1 << 20)
    except WireError:
        pass
    assert judged(data, "") is None or data.startswith(wire.MAGIC)


@FUZZ
@given(codec=st.sampled_from(CODECS), data=st.data())
def test_mutated_honest_frames_end_valid_or_refused(codec, data):
    frame = bytearray(honest_frame(codec))
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(frame) - 1))
        frame[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):  # re-seal the checksum so the mutation reaches the parsers
        _, _, kind, head_len, payload_len, _ = wire.PREFIX.unpack(bytes(frame[:24]))
        head = bytes(frame[24:24 + head_len])
        payload = bytes(frame[24 + head_len:])
        frame[:24] = wire.PREFIX.pack(wire.MAGIC, wire.VERSION, kind % 7 or 2, head_len,
                                      payload_len, wire.crc32(head, wire.crc32(payload)))
    judged(bytes(frame), codec)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=30)


@FUZZ
@given(header=st.dictionaries(st.sampled_from(
    ["client_id", "round", "version", "num_examples", "codec", "metrics", "x"]), JSON),
    codec=st.sampled_from(CODECS))
def test_any_header_on_an_honest_payload(header, codec):
    msg = wire.decode_frame(honest_frame(codec))
    try:
        frame = wire.encode_frame(Kind.UPDATE, header, wire.encode_tensors(msg.tensors))
    except (ValueError, WireError):  # NaN/Inf floats cannot even be encoded by an honest peer
        return
    result = judged(frame, codec)
    if result is not None and result.ok:
        assert header["client_id"] == 1 and header["round"] == 1 and header["codec"] == codec


@FUZZ
@given(st.text(max_size=300))
def test_header_text_parses_to_a_dict_or_wire_error(text):
    try:
        header = wire.decode_header(text.encode("utf-8", "surrogatepass"))
    except WireError:
        return
    assert isinstance(header, dict)
    json.dumps(header, allow_nan=False)  # whatever passed is finite, serialisable JSON


@FUZZ
@given(depth=st.integers(1, 5000), digits=st.integers(1, 6000))
def test_deep_and_long_numbers_are_bounded(depth, digits):
    for text in ("[" * depth + "]" * depth, '{"a":' + "7" * digits + "}"):
        try:
            wire.decode_header(text.encode())
        except WireError:
            pass


def tensor_dicts():
    shapes = st.lists(st.integers(0, 5), max_size=3).map(tuple)
    dtypes = st.sampled_from([torch.float32, torch.float16, torch.int8, torch.int32,
                              torch.int64, torch.uint8, torch.bool])
    names = st.sampled_from(["fc.weight", "fc.bias", "fc.weight::idx", "fc.weight::val",
                             "fc.weight::q", "fc.weight::scale", "fc.weight::zero",
                             "fc.bias::q", "fc.bias::scale", "other"])

    @st.composite
    def one(draw):
        shape, dtype = draw(shapes), draw(dtypes)
        n = 1
        for d in shape:
            n *= d
        values = draw(st.lists(st.integers(-300, 300), min_size=n, max_size=n))
        return torch.tensor(values, dtype=torch.int64).reshape(shape).to(dtype)

    return st.dictionaries(names, one(), max_size=6)


@FUZZ
@given(tensors=tensor_dicts(), codec=st.sampled_from(CODECS))
def test_codec_decoders_on_hostile_tensors(tensors, codec):
    try:
        out = parse_pipeline(codec, WireError).decode(tensors, REF)
    except WireError:
        return
    try:  # what a decoder lets through still meets the model's spec, or is refused there
        wire.validate_tensors(out, SPEC)
    except WireError:
        pass


@settings(max_examples=100, deadline=5000, derandomize=True)
@given(st.binary(max_size=2048), st.integers(1, 64))
def test_pipe_framing_ends_in_a_frame_or_its_own_error(data, chunk):
    r, w = os.pipe()

    def send():
        try:
            for i in range(0, len(data), chunk):
                pipeio.write_all(w, data[i:i + chunk])
        finally:
            os.close(w)

    t = threading.Thread(target=send)
    t.start()
    try:
        while True:
            frame = pipeio.read_frame(r, 1 << 16)
            assert wire.frame_length(frame[:24], 1 << 16) == len(frame)
    except (pipeio.PipeClosed, WireError):
        pass
    finally:
        t.join(10)
        os.close(r)
