"""A test hook for the client side, read only here and never set in normal use: it makes
`ClientWorker` misbehave on chosen tasks, in whatever runtime runs it, so one test module can
check that every runtime fails a misbehaving client alone.

``TINYFED_TEST_FAULT=MODE[:CLIENT[:ROUND]]`` targets the tasks of that client id (any if
omitted) in that round (any if omitted; in async mode a task's round is its dispatch number).
MODE is ``garbage`` (answer bytes that are not a frame), ``exit`` (end the process at once, as
a crash would), or ``sleep=S`` (answer only after S seconds: past a deadline, a late result).
With ``TINYFED_TEST_FAULT_ONCE=DIR`` a fault fires once per (mode, client) (a marker file in
DIR records it), so the client's next tasks are served normally.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

FAULT_ENV = "TINYFED_TEST_FAULT"
ONCE_ENV = "TINYFED_TEST_FAULT_ONCE"
GARBAGE = b"this is not a tinyfed frame, it is what a broken client sends" * 2


def injected(client_id: int, round_num: int) -> bytes | None:
    """Act out the fault aimed at this client's task: bytes to answer instead, or None to
    answer normally (after a `sleep`, or when no fault is aimed here)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    mode, *target = spec.split(":")
    if any(int(t) != got for t, got in zip(target, (client_id, round_num))):
        return None
    once = os.environ.get(ONCE_ENV)
    if once:
        marker = Path(once) / f"{mode.replace('=', '-')}-{client_id}"
        try:
            marker.touch(exist_ok=False)
        except FileExistsError:
            return None
    if mode == "garbage":
        return GARBAGE
    if mode == "exit":
        os._exit(3)
    if mode.startswith("sleep="):
        time.sleep(float(mode.partition("=")[2]))
        return None
    raise SystemExit(f"{FAULT_ENV}: unknown mode {mode!r}")
