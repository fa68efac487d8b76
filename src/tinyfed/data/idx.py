"""IDX files (MNIST, Fashion-MNIST): read them, gzip or not, and check every header field.

A truncated download or a wrong file in the right place must be a clear error naming the file,
never a reshape error or silently wrong images.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from tinyfed.errors import DataError

_UBYTE = 0x08  # the only element type MNIST-style sets use


def read_bytes(path: Path) -> bytes:
    """The file's content, decompressed if it is gzip (detected by magic, not by name)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        inflater = zlib.decompressobj(wbits=31)  # gzip wrapper: zlib checks CRC and length
        out = inflater.decompress(raw)
        if not inflater.eof:
            raise EOFError("the compressed stream ends early")
        if inflater.unused_data:  # several gzip members: rare, let gzip walk them
            out = gzip.decompress(raw)
        return out
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is a corrupt or truncated gzip file ({e}); "
                        "delete it and fetch it again") from e


def parse_idx(raw: bytes, source: Path | str, ndim: int) -> np.ndarray:
    """Decode an unsigned-byte IDX payload with `ndim` dimensions into a read-only array."""
    if len(raw) < 4:
        raise DataError(f"{source} is not an IDX file: only {len(raw)} bytes")
    zero, dtype, dims = raw[:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype != _UBYTE or dims != ndim:
        raise DataError(
            f"{source} has IDX magic {raw[:4].hex()}, expected 0000080{ndim} "
            f"(unsigned bytes, {ndim} dimensions); is it the right file?"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{source} is truncated inside its IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(f"{source} is {what}: {len(raw)} bytes, header {shape} needs {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def check_pair(images: np.ndarray, labels: np.ndarray, image_file: Path, label_file: Path,
               num_classes: int = 10) -> None:
    """Images are N×28×28 and labels are N class ids below num_classes."""
    if images.shape[1:] != (28, 28):
        raise DataError(f"{image_file} holds {images.shape[1]}×{images.shape[2]} images, "
                        "expected 28×28")
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{label_file} has {labels.shape[0]} labels but {image_file} has "
                        f"{images.shape[0]} images; the files do not belong together")
    if labels.size and int(labels.max()) >= num_classes:
        raise DataError(f"{label_file} has label {int(labels.max())}, "
                        f"expected 0..{num_classes - 1}")
