import struct
import zlib

import pytest
import torch

from tinyfed import wire
from tinyfed.errors import WireError
from tinyfed.wire import Kind


def tensors():
    return {"a.weight": torch.randn(3, 4), "a.bias": torch.arange(3, dtype=torch.float32)}


def test_round_trip_is_exact():
    t = tensors()
    frame = wire.encode_frame(Kind.UPDATE, {"client_id": 1, "x": [1, 2]}, wire.encode_tensors(t))
    msg = wire.decode_frame(frame)
    assert msg.kind == Kind.UPDATE and msg.header == {"client_id": 1, "x": [1, 2]}
    assert msg.size == len(frame)
    for k, v in t.items():
        assert torch.equal(msg.tensors[k], v)


def test_frame_size_is_prefix_header_payload():
    payload = wire.encode_tensors(tensors())
    frame = wire.encode_frame(Kind.TASK, {}, payload)
    assert len(frame) == wire.PREFIX_SIZE + len(b"{}") + len(payload)
    assert wire.frame_length(frame[: wire.PREFIX_SIZE]) == len(frame)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: b"XXXX" + f[4:], "magic"),
        (lambda f: f[:4] + bytes([9]) + f[5:], "version"),
        (lambda f: f[:5] + bytes([77]) + f[6:], "kind"),
        (lambda f: f[:-1], "length"),
        (lambda f: f[:-1] + bytes([f[-1] ^ 0xFF]), "checksum"),
        (lambda f: f[:10], "truncated"),
    ],
)
def test_corrupt_frames_are_rejected(mutate, message):
    frame = wire.encode_frame(Kind.UPDATE, {"a": 1}, wire.encode_tensors(tensors()))
    with pytest.raises(WireError, match=message):
        wire.decode_frame(mutate(frame))


def test_frames_back_to_back_are_read_one_at_a_time():
    """A batch's replies come as one buffer: each frame is cut out whole by its own prefix; a
    buffer that ends inside a frame, or a bad prefix, is refused, naming what is wrong."""
    a = wire.encode_frame(Kind.UPDATE, {"client_id": 0}, wire.encode_tensors(tensors()))
    b = wire.encode_frame(Kind.FAILURE, {"reason": "x"})
    data = a + b
    assert wire.frame_at(data, 0) == a and wire.frame_at(data, len(a)) == b
    with pytest.raises(WireError, match=f"truncated frame: {len(b) - 1} bytes of {len(b)}"):
        wire.frame_at(data[:-1], len(a))
    with pytest.raises(WireError, match="prefix is 0 bytes"):
        wire.frame_at(data, len(data))
    with pytest.raises(WireError, match="magic"):
        wire.frame_at(data, 1)
    with pytest.raises(WireError, match="exceeds the limit"):
        wire.frame_at(data, 0, max_size=len(a) - 1)


def test_oversized_frame_rejected_from_prefix_alone():
    frame = wire.encode_frame(Kind.UPDATE, {}, wire.encode_tensors(tensors()))
    with pytest.raises(WireError, match="exceeds the limit"):
        wire.frame_length(frame[: wire.PREFIX_SIZE], max_size=100)


def test_garbage_payload_with_valid_crc_is_rejected():
    head, payload = b"{}", b"not safetensors at all"
    crc = zlib.crc32(head, zlib.crc32(payload))
    frame = wire.PREFIX.pack(wire.MAGIC, 1, int(Kind.UPDATE), 2, len(payload), crc) + head + payload
    with pytest.raises(WireError, match="safetensors"):
        wire.decode_frame(frame)


def test_header_must_be_object():
    head, payload = b"[1]", b""
    crc = zlib.crc32(head, zlib.crc32(payload))
    frame = struct.pack("<4sBBxxIQI", wire.MAGIC, 1, 2, 3, 0, crc) + head
    with pytest.raises(WireError, match="JSON object"):
        wire.decode_frame(frame)


def test_validate_tensors_catches_every_mismatch():
    spec = wire.spec_of(tensors())
    good = tensors()
    wire.validate_tensors(good, spec)
    with pytest.raises(WireError, match="unknown"):
        wire.validate_tensors({**good, "evil": torch.zeros(1)}, spec)
    with pytest.raises(WireError, match="missing"):
        wire.validate_tensors({"a.weight": good["a.weight"]}, spec)
    with pytest.raises(WireError, match="shape"):
        wire.validate_tensors({**good, "a.bias": torch.zeros(4)}, spec)
    with pytest.raises(WireError, match="dtype"):
        wire.validate_tensors({**good, "a.bias": torch.zeros(3, dtype=torch.float64)}, spec)
    bad = good["a.weight"].clone()
    bad[1, 1] = float("nan")
    with pytest.raises(WireError, match="non-finite"):
        wire.validate_tensors({**good, "a.weight": bad}, spec)
    bad[1, 1] = float("inf")
    with pytest.raises(WireError, match="non-finite"):
        wire.validate_tensors({**good, "a.weight": bad}, spec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_finds_one_bad_value_anywhere(dtype):
    good = torch.linspace(-3, 3, 4099).to(dtype)
    assert wire.all_finite(good) and wire.all_finite(torch.empty(0, dtype=dtype))
    for where in (0, 2048, 4098):
        for value in (float("nan"), float("inf"), float("-inf")):
            bad = good.clone()
            bad[where] = value
            assert not wire.all_finite(bad), (where, value)
    big = torch.full((8,), torch.finfo(dtype).max, dtype=dtype)
    assert wire.all_finite(big)  # finite values whose sum would overflow are still finite


def test_header_int_range():
    assert wire.header_int({"n": 5}, "n", 1, 10) == 5
    for bad in (0, 11, "5", 5.0, True, None):
        with pytest.raises(WireError, match="'n'"):
            wire.header_int({"n": bad}, "n", 1, 10)


def test_remembered_layout_writes_what_safetensors_writes():
    """Payloads after the first of a tensor set come from a remembered header: they must stay
    byte-identical to safetensors' own output, for every dtype and shape, as values change."""
    from safetensors.torch import save

    def mixed(offset: float) -> dict[str, torch.Tensor]:
        return {
            "w": torch.randn(5, 7) + offset, "scalar": torch.tensor(3.5 + offset),
            "empty": torch.zeros(0, 4), "steps": torch.arange(7) + int(offset),
            "mask": torch.tensor([True, False, offset > 0]),
            "bf16": (torch.randn(5) + offset).to(torch.bfloat16),
            "half": (torch.randn(2, 3) + offset).to(torch.float16),
            "transposed": (torch.randn(4, 3) + offset).t(),  # not contiguous
            "grad": torch.randn(2, requires_grad=True),
        }

    for offset in (0.0, 1.0, -2.0):
        t = mixed(offset)
        want = save({k: v.detach().contiguous() for k, v in sorted(t.items())})
        assert wire.encode_tensors(t) == want
    first = wire.encode_tensors({"x": torch.ones(3)})
    assert wire.encode_tensors({"x": torch.full((3,), 2.0)}) != first  # new values, new bytes
    assert wire.decode_frame(wire.encode_frame(Kind.MODEL, {}, wire.encode_tensors(
        {"x": torch.full((3,), 2.0)}))).tensors["x"].tolist() == [2.0, 2.0, 2.0]
