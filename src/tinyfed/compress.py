"""Update codecs between a client's weights and the wire: encode/decode pairs that compose.

A pipeline spec such as ``delta+topk:0.01+int8+zstd`` is recorded in the frame header, so the
receiver decodes without being told out of band. Each codec turns named tensors into named
tensors (``name::idx``/``name::val`` for top-k, ``name::q``/``name::scale``/``name::zero`` for
int8, ``name::bits``/``name::norm``/``name::shape`` for QSGD, ``::zstd`` for the entropy stage),
so everything still travels as safetensors. Decoding validates like any other input: a part
missing, of the wrong dtype or length, an index out of range, repeated or unsorted, a
non-finite scale, a bit width outside 1-8, a compressed block that would expand past the
frame limit raise `WireError` and the update is rejected.

Order is fixed: ``[delta] [topk:F] [fp16 | int8[:channel] | qsgd:B | ternary] [zstd]``, each at
most once; ``stc:F`` is ``topk:F+ternary`` (Sattler et al. 2019). top-k needs delta before it
(sparsifying weights would zero most of the model). The stateless downlink (a whole model to a
client that holds none) allows the value quantizers and zstd; `tinyfed.broadcast` sends deltas
to clients that hold an earlier model.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from safetensors.torch import load as st_load

from tinyfed import bitpack
from tinyfed.errors import ConfigError, WireError
from tinyfed.wire import DEFAULT_MAX_FRAME, TensorSpec, encode_tensors

Tensors = dict[str, torch.Tensor]
SEP = "::"


@dataclass
class CodecContext:
    """What both ends share (the reference weights), the sender's own memory (state), the seed
    of stochastic rounding (the task's, so a task encodes the same way every time it runs) and
    the most bytes a decoder may produce (the frame limit)."""

    reference: Tensors
    state: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    limit: int = DEFAULT_MAX_FRAME


class Codec(Protocol):
    spec: str

    def encode(self, tensors: Tensors, ctx: CodecContext) -> Tensors: ...

    def decode(self, tensors: Tensors, ctx: CodecContext) -> Tensors: ...


def _parts(tensors: Tensors, codec: str, suffixes: tuple[str, ...]) -> tuple[dict, Tensors]:
    """Group this codec's `base::part` tensors by base; the rest pass through (an earlier
    codec's parts, integer buffers; a name nothing claims fails the final name check)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    plain: Tensors = {}
    for key, value in tensors.items():
        base, sep, suffix = key.rpartition(SEP)
        if not sep or suffix not in suffixes:
            plain[key] = value
            continue
        groups.setdefault(base, {})[suffix] = value
    for base, got in groups.items():
        missing = [s for s in suffixes if s not in got]
        if missing:
            raise WireError(f"{codec} codec: tensor {base!r} is missing part(s) {missing}")
        if base in plain:
            raise WireError(f"{codec} codec: tensor {base!r} is sent both encoded and plain")
    return groups, plain


def _reject_plain_floats(plain: Tensors, codec: str) -> None:
    for key, value in plain.items():
        if value.is_floating_point() and value.numel():
            raise WireError(f"{codec} codec: float tensor {key!r} was not encoded")


class Delta:
    """Send local − reference; float tensors only, integer buffers pass through."""

    spec = "delta"

    def encode(self, tensors: Tensors, ctx: CodecContext) -> Tensors:
        return {
            k: v - ctx.reference[k] if v.is_floating_point() else v for k, v in tensors.items()
        }

    def decode(self, tensors: Tensors, ctx: CodecContext) -> Tensors:
        out = {}
        for k, v in tensors.items():
            ref = ctx.reference.get(k)
            if ref is None:
                raise WireError(f"delta codec: unknown tensor {k!r}")
            if v.is_floating_point() and v.shape == ref.shape:
                out[k] = (ref + v.to(ref.dtype)) if ref.is_floating_point() else v
            else:
                out[k] = v
        return out


class Fp16:
    """Every float tensor as IEEE half: 2 bytes an element, relative error ≤ 2⁻¹¹."""

    spec = "fp16"
    LIMIT = 65504.0

    def encode(self, tensors: Tensors, ctx: CodecContext) -> Tensors:
        out = {}
        for k, v in tensors.items():
            if v.is_floating_point():
                if v.numel() and float(v.abs().max()) > self.LIMIT:
                    raise WireError(f"fp16 codec: tensor {k!r} has values beyond ±65504")
                v = v.to(torch.float16)
            out[k] = v
        return out

    def decode(self, tensors: Tensors, ctx: CodecContext) -> Tensors:
        out = {}
        for k, v in tensors.items():
            if v.is_floating_point():
                if v.dtype != torch.float16:
                    raise WireError(f"fp16 codec: tensor {k!r} is {v.dtype}; expected float16")
                v = v.to(torch.float32)
                if not bool(torch.isfinite(v).all()):
                    raise WireError(f"fp16 codec: tensor {k!r} has non-finite values")
            out[k] = v
        return out


class Int8:
    """Affine 8-bit quantization: x ≈ (q + 128)·scale + zero, per tensor or per output channel.

    With ``int8:channel`` tensors of two or more dimensions get one (scale, zero) per row of
    dim 0; 1-D tensors stay per tensor (a scale per element would cost more than it saves).
    The error per element is at most scale/2.
    """

    PARTS = ("q", "scale", "zero")

    def __init__(self, per_channel: bool):
        self.per_channel = per_channel
        self.spec = "int8:channel" if per_channel else "int8"

    def encode(self, tensors: Tensors, ctx: CodecContext) -> Tensors:
        out = {}
        for k, v in tensors.items():
            if not v.is_floating_point():
                out[k] = v
                continue
            x = v.detach().to(torch.float32)
            channels = self.per_channel and x.dim() >= 2
            rows = x.reshape(x.shape[0], -1) if channels else x.reshape(1, -1)
            if rows.shape[1] == 0:
                lo = hi = torch.zeros(rows.shape[0])
            else:
                lo, hi = rows.min(dim=1).values, rows.max(dim=1).values
            scale = (hi - lo) / 255.0
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            q = torch.round((rows - lo[:, None]) / safe[:, None]).clamp_(0, 255) - 128
            out[f"{k}{SEP}q"] = q.to(torch.int8).reshape(x.shape)
            out[f"{k}{SEP}scale"] = scale.to(torch.float32)
            out[f"{k}{SEP}zero"] = lo.to(torch.float32)
        return out

    def decode(self, tensors: Tensors, ctx: CodecContext) -> Tensors:
        groups, plain = _parts(tensors, "int8", self.PARTS)
        _reject_plain_floats(plain, "int8")
        out = dict(plain)
        for base, p in groups.items():
            q, scale, zero = p["q"], p["scale"], p["zero"]
            if q.dtype != torch.int8:
                raise WireError(f"int8 codec: {base}::q is {q.dtype}; expected int8")
            for name, t in (("scale", scale), ("zero", zero)):
                if t.dtype != torch.float32 or t.dim() != 1:
                    raise WireError(f"int8 codec: {base}::{name} must be a 1-D float32 tensor")
                if not bool(torch.isfinite(t).all()):
                    raise WireError(f"int8 codec: {base}::{name} has non-finite values")
            if bool((scale < 0).any()):
                raise WireError(f"int8 codec: {base}::scale is negative")
            n = scale.numel()
            if zero.numel() != n:
                raise WireError(f"int8 codec: {base}: {n} scales but {zero.numel()} zero points")
            channels = q.shape[0] if q.dim() >= 1 else 1
            if n != 1 and not (q.dim() >= 2 and n == channels):
                raise WireError(f"int8 codec: {base}: {n} scales for a tensor of shape "
                                f"{tuple(q.shape)}; expected 1 or one per output channel")
            rows = q.reshape(n, -1).to(torch.float32) + 128.0
            x = rows * scale[:, None] + zero[:, None]
            if not bool(torch.isfinite(x).all()):
                raise WireError(f"int8 codec: {base} decodes to non-finite values")
            out[base] = x.reshape(q.shape)
        return out


class TopK:
    """Keep the largest fraction F of each tensor's entries by magnitude, as (index, value).

    Error feedback: what is not sent is kept in the sender's state and added to the next
    round's update, so every coordinate is sent eventually. Indices are int32 (int64 for
    tensors of 2³¹ entries or more), flat in row-major order.
    """

    PARTS = ("idx", "val")
    STATE = "topk_residual"

    def __init__(self, fraction: float):
        self.fraction = fraction
        self.spec = f"topk:{fraction:g}"

    def k_of(self, numel: int) -> int:
        return min(numel, max(1, math.ceil(self.fraction * numel)))

    def encode(self, tensors: Tensors, ctx: CodecContext) -> Tensors:
        """Sets the residual to what top-k left out; `Pipeline.encode` then corrects it to
        what the whole pipeline failed to send (the later stages' rounding included)."""
        residual: Tensors = ctx.state.setdefault(self.STATE, {})
        out = {}
        for name, v in tensors.items():
            if not v.is_floating_point() or v.numel() == 0:
                out[name] = v
                continue
            acc = v.detach().to(torch.float32).flatten()
            if name in residual and residual[name].shape == acc.shape:
                acc = acc + residual[name]
            k = self.k_of(acc.numel())
            idx = torch.topk(acc.abs(), k, sorted=False).indices.sort().values
            val = acc[idx]
            rest = acc.clone()
            rest[idx] = 0.0
            residual[name] = rest
            itype = torch.int32 if acc.numel() < 2**31 else torch.int64
            out[f"{name}{SEP}idx"] = idx.to(itype)
            out[f"{name}{SEP}val"] = val
        return out

    def feed_back_rounding(self, sent: Tensors, decoded: Tensors, state: dict) -> None:
        """Exact error feedback (Stich et al. 2018, Alg. 1; Karimireddy et al. 2019): the
        residual becomes everything the pipeline failed to deliver, acc − decode(encode(acc)),
        so the later stages' rounding of the sent values is fed back too. `sent` holds the
        values top-k kept, `decoded` what the receiver will decode for them."""
        residual: Tensors = state.get(self.STATE, {})
        for name, rest in residual.items():
            val, got = sent.get(f"{name}{SEP}val"), decoded.get(f"{name}{SEP}val")
            idx = sent.get(f"{name}{SEP}idx")
            if val is None or got is None or idx is None:
                continue
            rest[idx.to(torch.int64)] = val - got.to(torch.float32)

    def decode(self, tensors: Tensors, ctx: CodecContext) -> Tensors:
        groups, plain = _parts(tensors, "topk", self.PARTS)
        _reject_plain_floats(plain, "topk")
        out = dict(plain)
        for base, p in groups.items():
            ref = ctx.reference.get(base)
            if ref is None:
                raise WireError(f"topk codec: unknown tensor {base!r}")
            idx, val = p["idx"], p["val"]
            if idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 1:
                raise WireError(f"topk codec: {base}::idx must be a 1-D int32/int64 tensor")
            if not val.is_floating_point() or val.dim() != 1:
                raise WireError(f"topk codec: {base}::val must be a 1-D float tensor")
            n = ref.numel()
            k = self.k_of(n)
            if idx.numel() != k or val.numel() != k:
                raise WireError(f"topk codec: {base} has {idx.numel()} indices and "
                                f"{val.numel()} values; expected {k} each")
            idx = idx.to(torch.int64)
            if k and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise WireError(f"topk codec: {base}::idx out of range [0, {n})")
            if k > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise WireError(f"topk codec: {base}::idx has repeated or unsorted indices "
                                f"(strictly ascending required)")
            dense = torch.zeros(n, dtype=torch.float32)
            dense[idx] = val.to(torch.float32)
            out[base] = dense.reshape(ref.shape)
        return out


def _shape(part: torch.Tensor, codec: str, base: str, ctx: CodecContext) -> tuple[int, ...]:
    """A `name::shape` part: a 1-D int64 tensor of at most 8 non-negative dims, for a tensor
    of the reference's (``name``, or a part of it such as top-k's ``name::val``) with no more
    elements than that reference tensor, so a decoder never allocates more than the model."""
    if part.dtype != torch.int64 or part.dim() != 1 or part.numel() > 8:
        raise WireError(f"{codec} codec: {base}::shape must be a 1-D int64 tensor of ≤ 8 dims")
    dims = tuple(int(d) for d in part.tolist())
    ref = ctx.reference.get(base.split(SEP)[0])
    if ref is None:
        raise WireError(f"{codec} codec: unknown tensor {base!r}")
    if any(d < 0 for d in dims) or math.prod(dims) > ref.numel():
        raise WireError(f"{codec} codec: {base}::shape {dims} is negative or has more elements "
                        f"than the model's {base.split(SEP)[0]!r} ({ref.numel()})")
    return dims


def _seed_of(seed: int, name: str) -> int:
    """A stochastic-rounding seed per (task, tensor): the same task encodes the same way."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


class Qsgd:
    """QSGD (Alistarh et al. 2017): each bucket of 512 values becomes its L2 norm and, per
    value, a sign and a level l/s with s = 2^(B-1) - 1, rounded up or down at random so that
    the decoded value is unbiased. B bits a value, packed; the seed is the task's."""

    PARTS = ("bits", "norm", "shape")
    BUCKET = 512

    def __init__(self, bits: int):
        self.bits = bits
        self.levels = 2 ** (bits - 1) - 1
        self.spec = f"qsgd:{bits}"

    def encode(self, tensors: Tensors, ctx: CodecContext) -> Tensors:
        out = {}
        s = self.levels
        for name, v in tensors.items():
            if not v.is_floating_point():
                out[name] = v
                continue
            x = v.detach().to(torch.float32).reshape(-1)
            n = x.numel()
            rows = torch.zeros(-(-n // self.BUCKET) * self.BUCKET)
            rows[:n] = x
            rows = rows.view(-1, self.BUCKET)
            norm = rows.norm(dim=1)
            # in place where it can be: this runs on every update (≥ 200 MB/s on the 2NN)
            scaled = rows.abs().mul_((s / torch.where(norm > 0, norm, 1.0))[:, None])
            level = scaled.floor()
            gen = torch.Generator().manual_seed(_seed_of(ctx.seed, name))
            up = torch.rand(rows.shape, generator=gen) < scaled.sub_(level)
            level.add_(up).clamp_(max=s)
            q = level.copysign_(rows).reshape(-1)[:n].add_(s)
            out[f"{name}{SEP}bits"] = bitpack.pack(q, self.bits)
            out[f"{name}{SEP}norm"] = norm
            out[f"{name}{SEP}shape"] = torch.tensor(list(v.shape), dtype=torch.int64)
        return out

    def decode(self, tensors: Tensors, ctx: CodecContext) -> Tensors:
        groups, plain = _parts(tensors, "qsgd", self.PARTS)
        _reject_plain_floats(plain, "qsgd")
        out = dict(plain)
        s = self.levels
        for base, p in groups.items():
            dims = _shape(p["shape"], "qsgd", base, ctx)
            n = math.prod(dims)
            norm = p["norm"]
            buckets = -(-n // self.BUCKET)
            if norm.dtype != torch.float32 or norm.dim() != 1 or norm.numel() != buckets:
                raise WireError(f"qsgd codec: {base}::norm must be {buckets} float32 values")
            if not bool(torch.isfinite(norm).all()) or bool((norm < 0).any()):
                raise WireError(f"qsgd codec: {base}::norm has negative or non-finite values")
            q = bitpack.unpack(p["bits"], self.bits, n)
            if n and int(q.max()) > 2 * s:
                raise WireError(f"qsgd codec: {base} has a level beyond ±{s}")
            rows = torch.zeros(buckets * self.BUCKET)
            rows[:n] = (q - s).to(torch.float32) / s
            out[base] = (rows.view(buckets, -1) * norm[:, None]).reshape(-1)[:n].reshape(dims)
        return out


class Ternary:
    """Values as ±μ, μ the mean magnitude, one sign bit each: after top-k this is the sparse
    ternary compression (STC) of Sattler et al. 2019, whose error the top-k residual keeps."""

    PARTS = ("sign", "mu", "shape")
    spec = "ternary"

    def encode(self, tensors: Tensors, ctx: CodecContext) -> Tensors:
        out = {}
        for name, v in tensors.items():
            if not v.is_floating_point():
                out[name] = v
                continue
            x = v.detach().to(torch.float32).reshape(-1)
            mu = x.abs().mean() if x.numel() else torch.tensor(0.0)
            out[f"{name}{SEP}sign"] = bitpack.pack(x >= 0, 1)
            out[f"{name}{SEP}mu"] = mu.reshape(1).to(torch.float32)
            out[f"{name}{SEP}shape"] = torch.tensor(list(v.shape), dtype=torch.int64)
        return out

    def decode(self, tensors: Tensors, ctx: CodecContext) -> Tensors:
        groups, plain = _parts(tensors, "ternary", self.PARTS)
        _reject_plain_floats(plain, "ternary")
        out = dict(plain)
        for base, p in groups.items():
            dims = _shape(p["shape"], "ternary", base, ctx)
            mu = p["mu"]
            if mu.dtype != torch.float32 or mu.shape != (1,) or not math.isfinite(float(mu)) \
                    or float(mu) < 0:
                raise WireError(f"ternary codec: {base}::mu must be one finite float32 ≥ 0")
            bits = bitpack.unpack(p["sign"], 1, math.prod(dims)).to(torch.float32)
            out[base] = ((2.0 * bits - 1.0) * mu).reshape(dims)
        return out


class Zstd:
    """Lossless entropy coding of everything before it (indices, low-bit values, scales) with
    Zstandard: the whole encoded set as one compressed safetensors block, ``::zstd``. The
    block must declare its size, which may not pass the frame limit. Top-k's ascending indices
    go in as gaps (a delta filter, as xz has): small numbers that compress to about a byte
    each, where absolute positions take three; decoding sums them back (top-k then checks
    range and order as ever)."""

    KEY = f"{SEP}zstd"
    LEVEL = 3
    spec = "zstd"
    lossless = True

    def encode(self, tensors: Tensors, ctx: CodecContext) -> Tensors:
        import zstandard

        filtered = {k: _gaps(v) if k.endswith(f"{SEP}idx") else v for k, v in tensors.items()}
        blob = zstandard.ZstdCompressor(level=self.LEVEL, write_content_size=True).compress(
            encode_tensors(filtered))
        return {self.KEY: torch.frombuffer(bytearray(blob), dtype=torch.uint8)}

    def decode(self, tensors: Tensors, ctx: CodecContext) -> Tensors:
        import zstandard

        block = tensors.get(self.KEY)
        if set(tensors) != {self.KEY} or block.dtype != torch.uint8 or block.dim() != 1:
            raise WireError(f"zstd codec: expected one 1-D uint8 tensor {self.KEY!r}, got "
                            f"{sorted(tensors)[:5]}")
        data = block.numpy().tobytes()
        try:
            size = zstandard.frame_content_size(data)
        except zstandard.ZstdError as exc:
            raise WireError(f"zstd codec: not a zstd frame ({exc})") from None
        if size < 0 or size > ctx.limit:
            raise WireError(f"zstd codec: the block declares {size} bytes; a declared size of "
                            f"at most the frame limit ({ctx.limit}) is required")
        try:
            raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=ctx.limit)
            inner = st_load(raw) if raw else {}
        except Exception as exc:  # zstandard's and safetensors' own error types
            raise WireError(f"zstd codec: the block does not decode: {exc}") from None
        for key, value in inner.items():
            if key.endswith(f"{SEP}idx") and value.dtype in (torch.int32, torch.int64):
                inner[key] = value.to(torch.int64).cumsum(0)  # int64: no overflow from gaps
        return inner


def _gaps(idx: torch.Tensor) -> torch.Tensor:
    out = idx.clone()
    out[1:] = idx[1:] - idx[:-1]
    return out


def _topk(arg: str) -> TopK:
    try:
        fraction = float(arg)
    except ValueError:
        fraction = float("nan")
    if not 0 < fraction <= 1:
        raise ValueError(f"topk:F needs a fraction F in (0, 1], got {arg!r}")
    return TopK(fraction)


def _qsgd(arg: str) -> Qsgd:
    if not (arg.isdigit() and 2 <= int(arg) <= 8):
        raise ValueError(f"qsgd:B needs a bit width B in 2-8, got {arg!r}")
    return Qsgd(int(arg))


def _int8(arg: str) -> Int8:
    if arg not in ("", "tensor", "channel"):
        raise ValueError(f"int8 takes ':tensor' or ':channel', got {arg!r}")
    return Int8(arg == "channel")


def _no_arg(cls):
    def make(arg: str):
        if arg:
            raise ValueError(f"{cls.spec} takes no argument, got {arg!r}")
        return cls()
    return make


CODECS: dict[str, Any] = {"delta": _no_arg(Delta), "fp16": _no_arg(Fp16), "int8": _int8,
                          "topk": _topk, "qsgd": _qsgd, "ternary": _no_arg(Ternary),
                          "zstd": _no_arg(Zstd)}
ALIASES = {"stc": "topk:{}+ternary"}  # Sattler et al. 2019: top-k, then ±μ
ORDER = {"delta": 0, "topk": 1, "fp16": 2, "int8": 2, "qsgd": 2, "ternary": 2, "zstd": 3}
GRAMMAR = "[delta] [topk:F | stc:F] [fp16 | int8[:channel] | qsgd:B | ternary] [zstd], each once"
DOWNLINK = ("fp16", "int8", "qsgd", "zstd")  # for a whole model, to a client that holds none


def memory_tensors(state: dict[str, Any]) -> Tensors:
    """A sender's codec memory (e.g. ``{"topk_residual": {name: tensor}}``) as flat named
    tensors, ``topk_residual/name``, the form it travels and rests in."""
    return {f"{key}/{name}": t for key, group in state.items() for name, t in group.items()}


def memory_state(tensors: Tensors) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for key, value in tensors.items():
        group, _, name = key.partition("/")
        state.setdefault(group, {})[name] = value
    return state


class Pipeline:
    """Codecs applied left to right on encode and right to left on decode."""

    def __init__(self, codecs: list[Codec]):
        self.codecs = codecs

    @property
    def spec(self) -> str:
        return "+".join(c.spec for c in self.codecs)

    @property
    def stateful(self) -> bool:
        """True when the sender keeps per-client memory (top-k's residual)."""
        return any(hasattr(c, "STATE") for c in self.codecs)

    def memory_spec(self, model: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
        """The memory a sender keeps for a model of this spec: one flat float32 residual per
        float tensor for top-k, nothing otherwise."""
        if not self.stateful:
            return {}
        return {f"{TopK.STATE}/{k}": TensorSpec((math.prod(v.shape),), torch.float32)
                for k, v in model.items() if v.dtype.is_floating_point and math.prod(v.shape)}

    def encode(self, tensors: Tensors, reference: Tensors, state: dict | None = None,
               seed: int = 0) -> Tensors:
        ctx = CodecContext(reference, state if state is not None else {}, seed)
        for i, codec in enumerate(self.codecs):
            tensors = codec.encode(tensors, ctx)
            if isinstance(codec, TopK) and i + 1 < len(self.codecs):
                rest = self.codecs[i + 1:]
                lossy = Pipeline([c for c in rest if not getattr(c, "lossless", False)])
                kept = tensors
                tensors = lossy.encode(kept, reference, seed=seed)
                codec.feed_back_rounding(kept, lossy.decode_parts(tensors, reference), ctx.state)
                for tail in rest[len(lossy.codecs):]:
                    tensors = tail.encode(tensors, ctx)
                return tensors
        return tensors

    def _decode(self, tensors: Tensors, reference: Tensors, limit: int) -> Tensors:
        ctx = CodecContext(reference, limit=limit)
        for codec in reversed(self.codecs):
            tensors = codec.decode(tensors, ctx)
        return tensors

    def decode_parts(self, tensors: Tensors, reference: Tensors,
                     limit: int = DEFAULT_MAX_FRAME) -> Tensors:
        """Decode without the final cast to the reference's dtypes (parts such as top-k's
        values have no reference tensor of their own)."""
        return self._decode(tensors, reference, limit)

    def decode(self, tensors: Tensors, reference: Tensors,
               limit: int = DEFAULT_MAX_FRAME) -> Tensors:
        """Decode, then give each float tensor its reference's dtype (codecs decode to fp32)."""
        if not self.codecs:
            return tensors
        out = {}
        for k, v in self._decode(tensors, reference, limit).items():
            ref = reference.get(k)
            if ref is not None and ref.is_floating_point() and v.is_floating_point():
                v = v.to(ref.dtype)
            out[k] = v
        return out


def parse_pipeline(spec: str, error: type[Exception] = ConfigError,
                   downlink: bool = False) -> Pipeline:
    """'' is the identity; 'delta+…' composes. Anything not allowed raises `error`."""
    codecs, names = [], []
    where = "down_codec" if downlink else "codec"
    stateless = downlink and not spec.strip().startswith("delta")  # else steps (broadcast)
    parts = []
    for part in filter(None, (p.strip() for p in spec.split("+"))):
        name, _, arg = part.partition(":")
        alias = ALIASES.get(name.strip())
        parts.extend(alias.format(arg.strip()).split("+") if alias else [part])
    for part in parts:
        name, _, arg = part.partition(":")
        name = name.strip()
        make = CODECS.get(name)
        if make is None:
            raise error(f"unknown codec {name!r} in {spec!r}; allowed: "
                        f"{', '.join(sorted([*CODECS, *ALIASES]))}")
        if stateless and name not in DOWNLINK:
            raise error(f"{where} {spec!r}: {name} needs a previous model both ends share; a "
                        f"whole-model downlink allows {', '.join(DOWNLINK)}, or start with "
                        f"delta to send steps from the model a client holds")
        if names and ORDER[name] <= ORDER[names[-1]]:
            raise error(f"{where} {spec!r}: {name} cannot follow {names[-1]}; order is {GRAMMAR}")
        try:
            codecs.append(make(arg.strip()))
        except ValueError as exc:
            raise error(f"{where} {spec!r}: {exc}") from None
        names.append(name)
    feedback = "topk" in names or (downlink and not stateless)
    for codec in codecs:
        if feedback and isinstance(codec, Qsgd) and codec.bits < MIN_FEEDBACK_BITS:
            raise error(f"{where} {spec!r}: {codec.spec} under error feedback (after topk, or in "
                        f"downlink steps) would grow the error it feeds back: its variance is "
                        f"{QSGD_VARIANCE[codec.bits]:g}× the signal's (bucket 512); use "
                        f"qsgd:{MIN_FEEDBACK_BITS} or more there, or qsgd alone on the uplink")
    if "topk" in names and "delta" not in names:
        raise error(f"{where} {spec!r}: topk needs delta before it (sparsifying the weights "
                    f"themselves would zero most of the model); use delta+{spec}")
    return Pipeline(codecs)


# QSGD's error variance relative to the signal (‖x − Q(x)‖² / ‖x‖², bucket 512, measured on
# Gaussian values); error feedback is stable only for a contraction, variance < 1
QSGD_VARIANCE = {2: 17.2, 3: 5.04, 4: 1.59, 5: 0.38, 6: 0.089, 7: 0.021, 8: 0.0053}
MIN_FEEDBACK_BITS = 5

HELD, HELD_VERSION = "held", "held_version"  # device-memory groups: the model a client holds
MAX_STEPS = 100_000  # downlink steps one task may carry (the server keeps far fewer)


def apply_steps(tensors: Tensors, held: Tensors, base: int, version: int, spec: str,
                limit: int = DEFAULT_MAX_FRAME) -> Tensors:
    """A client's model at `version`: the one it holds (at `base`) and the encoded steps
    base+1 … version (tensors named '<v>/<name>'), decoded in order exactly as the server did,
    so both hold the same model bit for bit."""
    if not 0 <= version - base <= MAX_STEPS:
        raise WireError(f"downlink steps from version {base} to {version}: at most {MAX_STEPS} "
                        f"forward steps allowed")
    groups: dict[int, Tensors] = {}
    for key, t in tensors.items():
        v, sep, name = key.partition("/")
        if not (sep and v.isdigit() and len(v) <= 18):
            raise WireError(f"downlink tensor {key[:60]!r} is not named '<version>/<name>'")
        groups.setdefault(int(v), {})[name] = t
    want = list(range(base + 1, version + 1))
    if sorted(groups) != want:
        raise WireError(f"downlink steps {sorted(groups)[:6]} do not lead from version {base} "
                        f"to {version}")
    pipeline = parse_pipeline(spec, WireError)
    model = held
    for v in want:
        model = pipeline.decode(groups[v], model, limit)
    return model


def downlink(weights: Tensors, spec: str, seed: int = 0) -> tuple[bytes, Tensors]:
    """The global model's payload for a round and exactly what a client decodes from it.

    The server decodes its own payload so that the reference it decodes uplink deltas against
    is bit-identical to the weights the clients started from. `seed` drives stochastic
    rounding (the round's, so every client of a round gets the same model)."""
    pipeline = parse_pipeline(spec, ConfigError, downlink=True)
    if not pipeline.codecs:
        return encode_tensors(weights), weights
    payload = encode_tensors(pipeline.encode(weights, weights, seed=seed))
    return payload, pipeline.decode(st_load(payload), weights)


def rebase(weights: Tensors, seen: Tensors, exact: Tensors) -> Tensors:
    """Move a client's weights from the (lossy) model it was sent onto the server's exact one:
    exact + (weights − seen), so downlink rounding never accumulates in the global model."""
    return {k: exact[k] + (v - seen[k]) if v.is_floating_point() else v
            for k, v in weights.items()}
