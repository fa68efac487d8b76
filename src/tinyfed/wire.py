"""The one wire format: a checked frame around a JSON header and a safetensors payload.

Every runtime moves these bytes, so traffic is measured the same way everywhere. Nothing in a
frame is trusted until `decode_frame` and `validate_tensors` say so; pickle is never used.

Frame layout (little-endian)::

    magic  b"TFED"   4 B
    version u8       1 B
    kind    u8       1 B
    reserved         2 B
    header_len u32   4 B   JSON header, UTF-8
    payload_len u64  8 B   safetensors bytes (may be 0)
    crc32  u32       4 B   of payload then header (a shared payload's CRC is reused)
    header, payload
"""

from __future__ import annotations

import enum
import json
import math
import re
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tinyfed.errors import WireError

try:  # zlib-ng computes the same CRC-32 with carry-less multiplies: four times zlib's speed
    from zlib_ng.zlib_ng import crc32
except ImportError:  # a platform without its wheel: the standard library's, same values
    from zlib import crc32

MAGIC = b"TFED"
VERSION = 1
PREFIX = struct.Struct("<4sBBxxIQI")
PREFIX_SIZE = PREFIX.size  # 24 bytes
MAX_HEADER = 1 << 20
DEFAULT_MAX_FRAME = 256 << 20
DEFAULT_MAX_ABS = 1e6  # largest |weight| an update may carry (config `max_weight`)

Tensors = dict[str, torch.Tensor]


class Kind(enum.IntEnum):
    """What a frame carries."""

    TASK = 1  # server -> client: global weights + the round's settings
    UPDATE = 2  # client -> server: trained weights (or encoded delta) + count + metrics
    FAILURE = 3  # client -> server: the task failed, with a reason
    SHUTDOWN = 4  # server -> client: exit cleanly
    MODEL = 5  # a global model on its own (HTTP GET /v1/model)
    HELLO = 6  # process runtime: parent -> child config JSON; child -> parent "ready"
    BATCH = 7  # process runtime: parent -> child "the next N task frames train together";
    # child -> parent, after their N replies: how many of them trained stacked and alone


@dataclass
class Message:
    kind: Kind
    header: dict[str, Any]
    tensors: Tensors = field(default_factory=dict)
    size: int = 0  # bytes of the whole frame as received
    memory: Tensors = field(default_factory=dict)  # the simulated device's memory section
    memory_bytes: int = 0  # its size: part of `size`, not of the radio traffic
    repeat: bool = False  # its payload's bytes equal the previous frame's (a PayloadMemo's)

    @property
    def radio_bytes(self) -> int:
        """What a real link would carry: the frame without the device-memory section."""
        return self.size - self.memory_bytes


MEMORY_FIELD = "memory_bytes"  # header field: the payload's last N bytes are device memory


def join_memory(payload: bytes, memory: Tensors) -> tuple[bytes, int]:
    """A payload followed by a device-memory section (its own safetensors blob), and the
    section's size for the header's `memory_bytes`. A simulated device keeps its memory (error
    feedback residuals) between tasks; workers that serve many clients get it with each task
    and hand it back, so the link's byte count leaves it out."""
    if not memory:
        return payload, 0
    section = encode_tensors(memory)
    return payload + section, len(section)


def encode_tensors(tensors: Tensors) -> bytes:
    """Serialize named tensors as safetensors (contiguous CPU copies, names sorted).

    The first time a set of names, dtypes and shapes is seen, safetensors writes the bytes and
    `Layout` remembers its header and where each tensor's data went; later payloads of the same
    set (every round's and every async merge's model) are the remembered header with the new
    data copied in, byte for byte what safetensors writes, at a fifth of its cost."""
    if not tensors:
        return b""
    key = tuple((k, v.dtype, tuple(v.shape)) for k, v in sorted(tensors.items()))
    layout = _LAYOUTS.get(key)
    if layout is not None:
        return layout.fill(tensors)
    payload = st_save({k: v.detach().cpu().contiguous() for k, v in sorted(tensors.items())})
    layout = Layout.of(payload) if sys.byteorder == "little" else None  # else safetensors swaps
    if layout is not None:
        if len(_LAYOUTS) >= MAX_LAYOUTS:
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
    return payload


@dataclass(frozen=True)
class Layout:
    """A safetensors header and the order in which the tensors' bytes follow it, back to back."""

    header: bytes
    order: tuple[str, ...]

    @classmethod
    def of(cls, payload: bytes) -> Layout | None:
        """The layout of `payload`, or None if its data is not one dense run after the header."""
        (head_len,) = struct.unpack("<Q", payload[:8])
        meta = json.loads(payload[8 : 8 + head_len])
        spans = sorted((v["data_offsets"], k) for k, v in meta.items() if k != "__metadata__")
        end = 0
        for (lo, hi), _ in spans:
            if lo != end:
                return None
            end = hi
        if 8 + head_len + end != len(payload):
            return None
        return cls(bytes(payload[: 8 + head_len]), tuple(k for _, k in spans))

    def fill(self, tensors: Tensors) -> bytes:
        """The header and each tensor's raw bytes in order, joined in one copy."""
        return b"".join([self.header, *(raw_bytes(tensors[k]) for k in self.order)])


def raw_bytes(tensor: torch.Tensor) -> Any:
    """A buffer over a tensor's bytes in memory order, without a copy when it is already a
    contiguous CPU tensor (few torch calls: each one lets other threads take the GIL)."""
    if tensor.requires_grad or tensor.device.type != "cpu" or not tensor.is_contiguous():
        tensor = tensor.detach().cpu().contiguous()
    try:
        return tensor.numpy()
    except TypeError:  # a dtype numpy lacks (bfloat16): its bytes as uint8
        return tensor.reshape(-1).view(torch.uint8).numpy()


MAX_LAYOUTS = 16  # distinct tensor sets remembered (a run uses one or two: model, codec output)
_LAYOUTS: dict[tuple, Layout] = {}


def payload_crc(payload: bytes | memoryview) -> int:
    """The CRC-32 a frame's checksum starts from; computed once for a payload many frames share."""
    return crc32(payload)


class CrcMemo:
    """The CRC of the last payload framed: a round sends one payload to many clients, so it is
    checksummed once, not once per client (the payload object's identity is the key)."""

    def __init__(self) -> None:
        self._payload: bytes | None = None
        self._crc = 0

    def __call__(self, payload: bytes) -> int:
        if payload is not self._payload:
            self._payload, self._crc = payload, payload_crc(payload)
        return self._crc


def encode_head(kind: Kind, header: dict[str, Any], payload: bytes,
                crc: int | None = None) -> bytes:
    """Prefix and JSON header of a frame whose payload follows as is (no copy of the payload).

    `crc` is `payload_crc(payload)` when the caller already has it."""
    head = json.dumps(header, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    if len(head) > MAX_HEADER:
        raise WireError(f"frame header is {len(head)} bytes; at most {MAX_HEADER} allowed")
    crc = crc32(head, payload_crc(payload) if crc is None else crc)
    return PREFIX.pack(MAGIC, VERSION, int(kind), len(head), len(payload), crc) + head


def encode_frame(kind: Kind, header: dict[str, Any], payload: bytes = b"",
                 crc: int | None = None) -> bytes:
    """Build one frame; `payload` is already-encoded safetensors so a round encodes it once."""
    return encode_head(kind, header, payload, crc) + payload


def frame_length(prefix: bytes, max_size: int = DEFAULT_MAX_FRAME) -> int:
    """Total frame size announced by a 24-byte prefix; lets stream readers read exactly that."""
    if len(prefix) != PREFIX_SIZE:
        raise WireError(f"frame prefix is {len(prefix)} bytes; {PREFIX_SIZE} required")
    magic, version, kind, head_len, payload_len, _ = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise WireError(f"not a tinyfed frame (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise WireError(f"frame version {version} not supported (this build speaks {VERSION})")
    if kind not in Kind._value2member_map_:
        raise WireError(f"unknown frame kind {kind}; allowed {[int(k) for k in Kind]}")
    if head_len > MAX_HEADER:
        raise WireError(f"frame header of {head_len} bytes exceeds {MAX_HEADER}")
    total = PREFIX_SIZE + head_len + payload_len
    if total > max_size:
        raise WireError(f"frame of {total} bytes exceeds the limit of {max_size} bytes")
    return total


MAX_DEPTH = 8  # nesting a header may have (task settings and metrics need 3)
MAX_DIGITS = 40  # digits an integer in a header may have (ids, seeds and counts need 20)


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise WireError(f"frame header has an integer of {len(text)} digits; at most "
                        f"{MAX_DIGITS} allowed")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise WireError(f"frame header has a number out of range ({text[:20]}…)")
    return value


def _no_constant(name: str) -> Any:
    raise WireError(f"frame header has {name}; only finite numbers are allowed")


def _depth_ok(text: str) -> bool:
    """True when brackets nest at most MAX_DEPTH deep (a bound checked before json recurses;
    brackets inside strings only make it stricter, never looser)."""
    depth = 0
    for ch in re.finditer(r"[\[\]{}]", text):
        depth += 1 if ch.group() in "[{" else -1
        if depth > MAX_DEPTH:
            return False
    return True


def decode_header(head: bytes) -> dict[str, Any]:
    """A frame's JSON header as a dict, or WireError: bounded in size, nesting and digits, with
    no NaN, Infinity or overflowing number (what `json.loads` alone lets through or dies on)."""
    if len(head) > MAX_HEADER:
        raise WireError(f"frame header of {len(head)} bytes exceeds {MAX_HEADER}")
    try:
        text = head.decode()
    except UnicodeDecodeError as exc:
        raise WireError(f"frame header is not UTF-8: {exc}") from None
    if not _depth_ok(text):
        raise WireError(f"frame header nests deeper than {MAX_DEPTH} levels")
    try:
        header = json.loads(text, parse_int=_bounded_int, parse_float=_finite_float,
                            parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise WireError(f"frame header is not valid JSON: {exc}") from None
    except (ValueError, RecursionError, OverflowError) as exc:
        raise WireError(f"frame header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("frame header must be a JSON object")
    return header


@dataclass
class PayloadMemo:
    """The last payload `decode_frame` read and its CRC. The task frames of one batch carry the
    same global weights (800 kB for the 2NN): with a memo their checksum is computed once, and
    `checked` lets the reader check the decoded weights once (what it verified on this blob)."""

    blob: bytes = b""
    crc: int = 0
    checked: set[str] = field(default_factory=set)

    def crc_of(self, payload: bytes) -> tuple[int, bool]:
        """(CRC-32 of `payload`, whether it equals the last one: one memcmp, not a CRC)."""
        if payload and payload == self.blob:
            return self.crc, True
        self.blob, self.crc, self.checked = payload, crc32(payload), set()
        return self.crc, False


def frame_at(data: bytes, offset: int, max_size: int = DEFAULT_MAX_FRAME) -> bytes:
    """The whole frame that starts at `offset` of frames written back to back (a batch's
    replies). Raises WireError when its prefix is bad or the data ends before the frame does."""
    total = frame_length(bytes(data[offset:offset + PREFIX_SIZE]), max_size)
    if offset + total > len(data):
        raise WireError(f"truncated frame: {len(data) - offset} bytes of {total} announced")
    return bytes(data[offset:offset + total])


def decode_frame(data: bytes, max_size: int = DEFAULT_MAX_FRAME,
                 memo: PayloadMemo | None = None) -> Message:
    """Parse and check a whole frame: size, magic, version, kind, checksum, header, payload.
    Every frame's checksum is checked; `memo` only saves recomputing a repeated payload's."""
    if len(data) < PREFIX_SIZE:
        raise WireError(f"truncated frame: {len(data)} bytes, prefix needs {PREFIX_SIZE}")
    total = frame_length(bytes(data[:PREFIX_SIZE]), max_size)
    if len(data) != total:
        raise WireError(f"frame length mismatch: announced {total} bytes, got {len(data)}")
    _, _, kind, head_len, _, crc = PREFIX.unpack(data[:PREFIX_SIZE])
    head = bytes(data[PREFIX_SIZE : PREFIX_SIZE + head_len])
    payload = bytes(data[PREFIX_SIZE + head_len :])
    payload_crc, repeat = memo.crc_of(payload) if memo is not None else (crc32(payload), False)
    if crc32(head, payload_crc) != crc:
        raise WireError("frame checksum mismatch: the message was corrupted in transit")
    header = decode_header(head)
    cut = header.get(MEMORY_FIELD, 0)
    if not isinstance(cut, int) or isinstance(cut, bool) or not 0 <= cut <= len(payload):
        raise WireError(f"header field {MEMORY_FIELD!r} = {str(cut)[:20]}; an integer in "
                        f"[0, {len(payload)}] (the payload's size) required")
    split = len(payload) - cut
    tensors, memory = _safetensors(payload[:split], "payload"), _safetensors(
        payload[split:], "device-memory section")
    return Message(Kind(kind), header, tensors, total, memory, cut, repeat)


def _safetensors(blob: bytes, what: str) -> Tensors:
    if not blob:
        return {}
    try:
        return st_load(blob)
    except Exception as exc:  # safetensors raises its own error types
        raise WireError(f"frame {what} is not valid safetensors: {exc}") from None


def decode_tensors(payload: bytes) -> Tensors:
    """A safetensors payload's tensors (one this process encoded: no checks beyond the format)."""
    return st_load(payload) if payload else {}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


def spec_of(tensors: Tensors) -> dict[str, TensorSpec]:
    """The names, shapes and dtypes an update must match."""
    return {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in tensors.items()}


def all_finite(tensor: torch.Tensor, max_abs: float = math.inf) -> bool:
    """True when no value is NaN or ±Inf (or beyond ±max_abs). One min/max pass (NaN propagates
    through it) costs a twentieth of `isfinite().all()`, which builds a boolean copy; this runs
    on every update."""
    if tensor.numel() == 0:
        return True
    lo, hi = torch.aminmax(tensor)
    lo, hi = float(lo), float(hi)
    return math.isfinite(lo) and math.isfinite(hi) and -max_abs <= lo and hi <= max_abs


def validate_tensors(tensors: Tensors, spec: dict[str, TensorSpec], what: str = "update",
                     max_abs: float = math.inf) -> None:
    """Reject unknown or missing names, wrong shapes or dtypes, non-finite values and values
    beyond ±max_abs (finite but huge weights make the next evaluation's loss NaN)."""
    unknown = sorted(set(tensors) - set(spec))
    if unknown:
        raise WireError(f"{what} has unknown tensors {unknown[:5]}; expected {sorted(spec)[:5]}…")
    missing = sorted(set(spec) - set(tensors))
    if missing:
        raise WireError(f"{what} is missing tensors {missing[:5]}")
    for name, want in spec.items():
        got = tensors[name]
        if tuple(got.shape) != want.shape:
            raise WireError(
                f"{what} tensor {name!r} has shape {tuple(got.shape)}; expected {want.shape}"
            )
        if got.dtype != want.dtype:
            raise WireError(f"{what} tensor {name!r} has dtype {got.dtype}; expected {want.dtype}")
        if got.is_floating_point() and not all_finite(got, max_abs):
            bound = "" if math.isinf(max_abs) else f" or beyond ±{max_abs:g}"
            raise WireError(f"{what} tensor {name!r} has non-finite values (NaN or Inf){bound}")


def header_int(header: dict[str, Any], key: str, lo: int, hi: int) -> int:
    """Read an integer header field and check its range (JSON gives any type)."""
    value = header.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise WireError(f"header field {key!r} = {value!r}; an integer in [{lo}, {hi}] required")
    return value
