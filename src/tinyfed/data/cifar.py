"""CIFAR-10 "python version": pickled batches, read from the tarball or its extracted folder.

The batches are pickles, and unpickling runs whatever callables a file names. A restricted
unpickler allows only the numpy and builtin names real batches use, so a tampered file is
refused instead of executed.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from tinyfed.errors import DataError

TARBALL = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"


def _allowed() -> dict[tuple[str, str], Any]:
    """(module, name) -> object, for every global a CIFAR batch may reference."""
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    import _codecs

    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,  # bytes pickled by Python 3 at protocol < 3
    }
    for mod in ("numpy.core", "numpy._core"):  # the name depends on the numpy that wrote it
        table[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        table[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    for mod in ("builtins", "__builtin__"):
        for t in (list, dict, tuple, bytes, bytearray, str, int, float, bool, set, frozenset):
            table[(mod, t.__name__)] = t
    return table


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in `_allowed()`; anything else is a DataError."""

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source
        self._table = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._table[(module, name)]
        except KeyError:
            raise DataError(f"refusing to unpickle {module}.{name} from {self._source}: "
                            "a CIFAR-10 batch holds only arrays and lists") from None


def load_batch(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (uint8 N×3×32×32 images, int64 labels), checked."""
    try:
        batch = RestrictedUnpickler(io.BytesIO(raw), source).load()
    except DataError:
        raise
    except Exception as e:  # a corrupt pickle raises many types
        raise DataError(f"{source} is not a readable CIFAR-10 batch ({type(e).__name__}: {e})"
                        ) from e
    if not isinstance(batch, dict):
        raise DataError(f"{source} holds a {type(batch).__name__}, expected a dict batch")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{source}: 'data' must be a uint8 array of N×3072 pixels")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{source}: 'labels' must be a list of integers") from e
    if y.shape != (data.shape[0],):
        raise DataError(f"{source} has {y.size} labels for {data.shape[0]} images")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{source} has labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), y


def _read_members(path: Path) -> dict[str, bytes]:
    """Batch name -> pickled bytes, from a tarball or a folder of batch files."""
    names = (*TRAIN_BATCHES, TEST_BATCH)
    if path.is_dir():
        out = {}
        for n in names:
            try:
                out[n] = (path / n).read_bytes()
            except OSError as e:
                raise DataError(f"cannot read {path / n}: {e.strerror or e}") from e
        return out
    try:
        with tarfile.open(path, "r:gz") as tar:
            out = {}
            for n in names:
                member = tar.extractfile(f"{FOLDER}/{n}")
                if member is None:
                    raise KeyError(n)
                out[n] = member.read()
            return out
    except KeyError as e:
        raise DataError(f"{path} lacks {FOLDER}/{e.args[0]}; is it cifar-10-python.tar.gz?"
                        ) from None
    except (OSError, EOFError, tarfile.TarError, zlib.error) as e:
        raise DataError(f"{path} is a corrupt or truncated tarball ({e}); "
                        "delete it and fetch it again") from e


def read_cifar10(path: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train images, labels), (test images, labels)) from a tarball or batch folder."""
    raw = _read_members(path)
    train = [load_batch(raw[n], f"{path}/{n}") for n in TRAIN_BATCHES]
    test = load_batch(raw[TEST_BATCH], f"{path}/{TEST_BATCH}")
    return (np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])), test
