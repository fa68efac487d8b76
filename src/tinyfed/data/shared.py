"""One copy of the clients' training examples, mapped by every process that trains.

The parent lays the examples out client after client (the layout `Experiment.shard` uses) in
an anonymous memory file (`memfd_create`): it has no name on disk, so a killed run leaks
nothing, and each child opens it through the parent's /proc/PID/fd entry. A child maps it
read-only (copy-on-write, so nothing a child does reaches the others) instead of decoding and
normalizing the whole data set itself; every client's shard is a view into the map. Only raw
float32 and int64 values cross, sized by the parent's description, which the child checks
against the file before mapping.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from tinyfed.errors import DataError


@dataclass(frozen=True)
class SharedExamples:
    """What a child needs to map the examples: the fd, shapes and each client's range."""

    fd: int
    pid: int  # the process whose fd it is: a child opens /proc/PID/fd/FD, so it can be
    # started (and warm) before the file exists, and need not inherit it
    count: int  # examples laid out (the clients' shards back to back)
    shape: tuple[int, int, int]  # one image
    starts: tuple[int, ...]  # client i's examples are [starts[i], starts[i+1])
    num_classes: int

    def header(self) -> dict:
        return {"fd": self.fd, "pid": self.pid, "count": self.count, "shape": list(self.shape),
                "starts": list(self.starts), "num_classes": self.num_classes}

    @classmethod
    def from_header(cls, h: dict) -> SharedExamples:
        return cls(int(h["fd"]), int(h["pid"]), int(h["count"]), tuple(int(s) for s in h["shape"]),
                   tuple(int(s) for s in h["starts"]), int(h["num_classes"]))

    @property
    def path(self) -> str:
        return f"/proc/{self.pid}/fd/{self.fd}"

    @property
    def x_bytes(self) -> int:
        return self.count * int(np.prod(self.shape)) * 4

    @property
    def size(self) -> int:
        return self.x_bytes + self.count * 8


def client_order(parts: list[np.ndarray]) -> tuple[torch.Tensor, list[int]]:
    """The training set's rows client after client, and where each client's rows begin (the
    one layout of in-process shards and of the shared file)."""
    order = torch.as_tensor(np.concatenate(parts) if parts else np.zeros(0, np.int64),
                            dtype=torch.int64)
    starts = [int(s) for s in np.concatenate([[0], np.cumsum([len(p) for p in parts])])]
    return order, starts


def client_rows(starts: list[int] | tuple[int, ...], client_id: int) -> slice:
    """The rows of a client-ordered layout that are one client's shard."""
    return slice(starts[client_id], starts[client_id + 1])


def publish(train_x: torch.Tensor, train_y: torch.Tensor, parts: list[np.ndarray],
            num_classes: int) -> SharedExamples:
    """Write the clients' examples into a new anonymous memory file; the caller closes its fd
    when no process will map it again."""
    order, starts = client_order(parts)
    shape = tuple(int(s) for s in train_x.shape[1:])
    fd = os.memfd_create("tinyfed-examples", 0)
    desc = SharedExamples(fd, os.getpid(), len(order), shape, tuple(starts), num_classes)
    os.ftruncate(fd, desc.size)
    x, y = _map(desc, writable=True)
    torch.index_select(train_x, 0, order, out=x)
    torch.index_select(train_y, 0, order, out=y)
    return desc


def _map(desc: SharedExamples, writable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    path = desc.path
    whole = torch.from_file(path, shared=writable, size=desc.size, dtype=torch.uint8)
    x = whole[: desc.x_bytes].view(torch.float32).view(desc.count, *desc.shape)
    y = whole[desc.x_bytes:].view(torch.int64)
    return x, y


def attach(desc: SharedExamples) -> tuple[torch.Tensor, torch.Tensor]:
    """Map the examples a parent published (checked against the file's real size)."""
    try:
        size = os.stat(desc.path).st_size
    except OSError as exc:
        raise DataError(f"shared examples: {desc.path} cannot be read ({exc})") from None
    if size != desc.size or desc.starts[-1] != desc.count:
        raise DataError(f"shared examples: file holds {size} bytes; the description says "
                        f"{desc.size}")
    return _map(desc)
