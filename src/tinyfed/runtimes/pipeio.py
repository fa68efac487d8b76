"""Whole frames over OS pipe descriptors: loop on partial reads and short writes, check sizes.

A pipe carries a byte stream, not messages, so a frame is read as its 24-byte prefix, then
exactly the length that prefix announces (checked against the size limit first, and read in
chunks as they arrive, so memory follows the bytes received, not the bytes promised). EOF and
EPIPE become `PipeClosed`, which carries how many bytes moved, so the caller can report traffic
and never mistakes half a frame for a message.
"""

from __future__ import annotations

import os

from tinyfed import wire

CHUNK = 1 << 20


class PipeClosed(ConnectionError):
    """The other end is gone: EOF on read or a broken pipe on write."""

    def __init__(self, message: str, done: int = 0):
        super().__init__(message)
        self.done = done  # bytes that did move before the pipe closed


def write_all(fd: int, data: bytes) -> int:
    """Write every byte (looping on short writes); return the count. EPIPE -> PipeClosed."""
    view = memoryview(data)
    sent = 0
    while sent < len(view):
        try:
            sent += os.write(fd, view[sent : sent + CHUNK])
        except (BrokenPipeError, ConnectionResetError):
            raise PipeClosed(f"broken pipe after writing {sent} of {len(view)} bytes",
                             sent) from None
    return sent


def read_exact(fd: int, size: int, already: int = 0, total: int | None = None) -> bytearray:
    """Read exactly `size` bytes (looping on partial reads). EOF -> PipeClosed.

    The buffer grows as bytes arrive, never to the announced size up front: a child that
    announces a frame at the limit and sends nothing costs nothing."""
    buf = bytearray()
    while len(buf) < size:
        chunk = os.read(fd, min(CHUNK, size - len(buf)))
        if not chunk:
            got = len(buf)
            of = f" of {total}" if total else ""
            where = "at a frame boundary" if already + got == 0 else (
                f"after {already + got}{of} bytes of a frame")
            raise PipeClosed(f"EOF {where}", already + got)
        buf += chunk
    return buf


def read_frame(fd: int, max_size: int = wire.DEFAULT_MAX_FRAME) -> bytes:
    """One whole frame. Raises PipeClosed (EOF) or WireError (bad prefix, over the limit)."""
    prefix = read_exact(fd, wire.PREFIX_SIZE)
    total = wire.frame_length(bytes(prefix), max_size)
    body = read_exact(fd, total - wire.PREFIX_SIZE, already=wire.PREFIX_SIZE, total=total)
    return bytes(prefix + body)
