"""Update codecs between a client's weights and the wire: encode/decode pairs that compose.

A pipeline spec such as ``delta`` is recorded in the frame header, so the receiver decodes
without being told out of band. Decoding validates like any other input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tinyfed.errors import ConfigError, WireError

Tensors = dict[str, torch.Tensor]


@dataclass
class CodecContext:
    """What both ends share (the reference weights) and the sender's own memory (state)."""

    reference: Tensors
    state: dict[str, Any] = field(default_factory=dict)


class Codec(Protocol):
    spec: str

    def encode(self, tensors: Tensors, ctx: CodecContext) -> Tensors: ...

    def decode(self, tensors: Tensors, ctx: CodecContext) -> Tensors: ...


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


CODECS: dict[str, Any] = {"delta": lambda arg: Delta()}


class Pipeline:
    """Codecs applied left to right on encode and right to left on decode."""

    def __init__(self, codecs: list[Codec]):
        self.codecs = codecs

    @property
    def spec(self) -> str:
        return "+".join(c.spec for c in self.codecs)

    def encode(self, tensors: Tensors, reference: Tensors, state: dict | None = None) -> Tensors:
        ctx = CodecContext(reference, state if state is not None else {})
        for codec in self.codecs:
            tensors = codec.encode(tensors, ctx)
        return tensors

    def decode(self, tensors: Tensors, reference: Tensors) -> Tensors:
        ctx = CodecContext(reference)
        for codec in reversed(self.codecs):
            tensors = codec.decode(tensors, ctx)
        return tensors


def parse_pipeline(spec: str, error: type[Exception] = ConfigError) -> Pipeline:
    """'' is the identity; 'delta+…' composes. Unknown names raise `error` listing the allowed."""
    codecs = []
    for part in filter(None, (p.strip() for p in spec.split("+"))):
        name, _, arg = part.partition(":")
        make = CODECS.get(name)
        if make is None:
            raise error(f"unknown codec {name!r} in {spec!r}; allowed: {', '.join(sorted(CODECS))}")
        codecs.append(make(arg))
    return Pipeline(codecs)
