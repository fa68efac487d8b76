"""Unsigned B-bit integers packed back to back into bytes (B = 1…8), most significant bit first.

Eight values of B bits make exactly B bytes: each group of eight is gathered into one 64-bit
integer by shifts and its low B bytes are kept, big-endian, so every width takes the same few
vectorized numpy steps. Written here because neither torch nor safetensors has sub-byte
integer types.
"""

from __future__ import annotations

import numpy as np
import torch

from tinyfed.errors import WireError

_SHIFTS = {bits: (bits * np.arange(7, -1, -1)).astype(np.uint64) for bits in range(1, 9)}


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """`values` (integers in [0, 2**bits)) as a uint8 tensor of ceil(n·bits/8) bytes."""
    u = values.to(torch.uint8).numpy().reshape(-1)
    if bits == 8:
        return torch.from_numpy(u.copy())
    groups = np.zeros((-(-u.size // 8), 8), dtype=np.uint8)
    groups.reshape(-1)[: u.size] = u
    word = np.zeros(groups.shape[0], dtype=np.uint64)
    for j, shift in enumerate(_SHIFTS[bits]):
        word |= groups[:, j].astype(np.uint64) << shift
    raw = word.astype(">u8").view(np.uint8).reshape(-1, 8)[:, 8 - bits:]
    return torch.from_numpy(raw.reshape(-1)[: packed_size(u.size, bits)].copy())


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The `count` B-bit values in `packed`, as int64; WireError when the sizes disagree."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise WireError("packed bits must be a 1-D uint8 tensor")
    if packed.numel() != packed_size(count, bits):
        raise WireError(f"{packed.numel()} packed bytes for {count} values of {bits} bits; "
                        f"expected {packed_size(count, bits)}")
    raw = packed.numpy()
    if bits == 8:
        return torch.from_numpy(raw.astype(np.int64))
    rows = -(-count // 8)
    wide = np.zeros((rows, 8), dtype=np.uint8)
    flat = np.zeros(rows * bits, dtype=np.uint8)
    flat[: raw.size] = raw
    wide[:, 8 - bits:] = flat.reshape(rows, bits)
    word = wide.view(">u8").reshape(rows, 1).astype(np.uint64)
    values = np.empty((rows, 8), dtype=np.int64)
    mask = np.uint64((1 << bits) - 1)
    for j, shift in enumerate(_SHIFTS[bits]):
        values[:, j] = (word[:, 0] >> shift) & mask
    return torch.from_numpy(values.reshape(-1)[:count])
