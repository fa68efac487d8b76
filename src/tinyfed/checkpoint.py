"""Checkpoints: weights as safetensors, run state as JSON in its metadata, written atomically.

One file per checkpoint (temp file, fsync, rename, fsync the folder), so a kill at any moment
leaves either the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save

from tinyfed.errors import TinyfedError
from tinyfed.wire import Tensors

STATE_KEY = "tinyfed_state"
NAME = re.compile(r"^round-(\d{6})\.safetensors$")


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_weights(path: Path, weights: Tensors, metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    atomic_write(path, save(tensors, metadata=metadata))


def save_checkpoint(folder: Path, round_num: int, weights: Tensors, state: dict[str, Any],
                    keep: int = 3) -> Path:
    path = folder / f"round-{round_num:06d}.safetensors"
    save_weights(path, weights, {STATE_KEY: json.dumps(state, allow_nan=False)})
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if NAME.match(p.name))


def load_checkpoint(path: Path) -> tuple[Tensors, dict[str, Any]]:
    """Weights and state of one checkpoint file; a corrupt file is a clear error."""
    try:
        weights = load_file(str(path))
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # safetensors' own error type differs across versions
        raise TinyfedError(f"checkpoint {str(path)!r} cannot be read: {exc}") from None
    raw = meta.get(STATE_KEY)
    try:
        state = json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        raise TinyfedError(f"checkpoint {str(path)!r} has corrupt state: {exc}") from None
    return weights, state


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None
