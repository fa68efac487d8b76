"""A client process of the process runtime: `python -m tinyfed.runtimes.child READ_FD WRITE_FD N`.

It holds only its own two pipe ends. It imports torch at once (the parent may start it before
loading the data, so both happen together); the first frame it reads is HELLO (the run's config
as JSON, and the parent's shared examples to map, or else it loads the data set itself), it
answers HELLO, then serves TASK frames (one at a time, or the N after a BATCH frame together:
stacked where that pays) until SHUTDOWN or EOF. A forked child (`forking.py`)
enters at `main` too. It never outlives its parent: EOF on its read pipe
ends it, and a watchdog thread ends it when the parent process exits (even mid-training).

Test hook (read only here, never set in normal use): ``TINYFED_TEST_CHILD_FAULT=MODE[:CLIENT
[:ROUND]]`` makes the child misbehave on the task of that client id (any if omitted) in that
round (any if omitted). MODE is ``garbage`` (reply with bytes that are not a frame),
``truncate`` (write half the reply frame, then exit), ``oversize`` (announce a frame over the
size limit) or ``hang`` (never reply). With ``TINYFED_TEST_CHILD_MARK=DIR`` the child writes
``DIR/fault-<pid>`` before misbehaving, so a test knows which real pid to kill and when.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import threading
from pathlib import Path

FAULT_ENV = "TINYFED_TEST_CHILD_FAULT"
MARK_ENV = "TINYFED_TEST_CHILD_MARK"


def watch_parent(ppid: int) -> None:
    """Exit as soon as the parent process is gone (reparenting changes our ppid)."""
    try:
        pidfd = os.pidfd_open(ppid)
    except (AttributeError, OSError):
        pidfd = None
    while os.getppid() == ppid:
        if pidfd is None:
            threading.Event().wait(0.5)
        elif select.select([pidfd], [], [], 5.0)[0]:  # readable once the parent has exited
            break
    os._exit(0)


def fault_for(frame: bytes) -> str | None:
    """The test hook's mode if it targets this task, else None."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    from tinyfed import wire

    mode, *target = spec.split(":")
    head_len = wire.PREFIX.unpack(frame[: wire.PREFIX_SIZE])[3]
    header = json.loads(frame[wire.PREFIX_SIZE : wire.PREFIX_SIZE + head_len])
    wanted = [header.get("client_id"), header.get("round")]
    if any(int(t) != w for t, w in zip(target, wanted)):
        return None
    mark = os.environ.get(MARK_ENV)
    if mark:
        Path(mark, f"fault-{os.getpid()}").write_text(f"{mode} {wanted}\n")
    return mode


def misbehave(mode: str, write_fd: int, reply) -> None:
    """Act out a test fault; `reply` computes the real answer when the mode needs it."""
    from tinyfed import wire
    from tinyfed.runtimes import pipeio

    if mode == "garbage":
        pipeio.write_all(write_fd, b"this is not a tinyfed frame....." * 4)
    elif mode == "oversize":
        pipeio.write_all(write_fd, wire.PREFIX.pack(wire.MAGIC, wire.VERSION,
                                                    int(wire.Kind.UPDATE), 2, 1 << 40, 0))
    elif mode == "truncate":
        frame = reply()
        pipeio.write_all(write_fd, frame[: len(frame) // 2])
        os._exit(3)
    elif mode == "hang":
        threading.Event().wait()
    else:
        raise SystemExit(f"{FAULT_ENV}: unknown mode {mode!r}")


def setup(header: dict):
    """Config, threads, data and the worker, from the HELLO header: the examples the parent
    shares when it does (mapped, not loaded), else the data set loaded from the config."""
    from tinyfed.config import build_config
    from tinyfed.data.shared import SharedExamples
    from tinyfed.worker import build_worker

    config, threads = build_config(header["config"]), int(header.get("threads", 1))
    if "examples" in header:
        return build_worker(config, threads, SharedExamples.from_header(header["examples"]))
    return build_worker(config, threads)


def serve(read_fd: int, write_fd: int, num: int) -> int:
    from tinyfed import wire
    from tinyfed.errors import WireError
    from tinyfed.runtimes import pipeio

    try:
        hello = wire.decode_frame(pipeio.read_frame(read_fd))
        if hello.kind != wire.Kind.HELLO:
            raise WireError(f"expected HELLO first, got {hello.kind.name}")
    except pipeio.PipeClosed:
        return 0
    try:
        worker = setup(hello.header)
    except Exception as exc:  # tell the parent why, then stop
        reason = f"child {num} could not start: {type(exc).__name__}: {exc}"
        pipeio.write_all(write_fd, wire.encode_frame(wire.Kind.FAILURE, {"reason": reason}))
        return 1
    pipeio.write_all(write_fd, wire.encode_frame(wire.Kind.HELLO,
                                                 {"child": num, "pid": os.getpid()}))
    limit = len(hello.header.get("clients", ())) or 1  # no batch holds more tasks than that
    while True:
        try:
            frame = pipeio.read_frame(read_fd, worker.max_frame)
            if frame[5] == wire.Kind.SHUTDOWN:
                return 0
            if frame[5] == wire.Kind.BATCH:
                serve_batch(read_fd, write_fd, worker, batch_size(frame, limit))
                continue
        except pipeio.PipeClosed:
            return 0
        except WireError as exc:  # the parent's own framing: tell it why, then stop
            reason = f"child {num}: {exc}"
            pipeio.write_all(write_fd, wire.encode_frame(wire.Kind.FAILURE, {"reason": reason}))
            return 1
        reply_to(frame, write_fd, worker)


def reply_to(frame: bytes, write_fd: int, worker) -> None:
    """One task's reply written (or the test hook's misbehaviour acted out in its place)."""
    from tinyfed.runtimes import pipeio

    mode = fault_for(frame)
    if mode:
        misbehave(mode, write_fd, lambda: worker.handle(frame))
    else:
        pipeio.write_all(write_fd, worker.handle(frame))


def batch_size(frame: bytes, limit: int) -> int:
    """The task count a BATCH frame announces, checked: 1 to `limit` (the clients served)."""
    from tinyfed import wire
    from tinyfed.errors import WireError

    count = wire.decode_frame(frame).header.get("tasks")
    if type(count) is not int or not 1 <= count <= limit:
        raise WireError(f"a BATCH frame announces {count!r} tasks; allowed: 1 to {limit}")
    return count


def serve_batch(read_fd: int, write_fd: int, worker, count: int) -> None:
    """Read `count` task frames, train them together (`ClientWorker.handle_many` stacks those
    that can be), write their replies in order, then a BATCH frame with how they trained. Under
    the test hook the tasks run one by one, each reply written before the next task starts, so
    a fault acts on its own task exactly as outside a batch."""
    from tinyfed.runtimes import pipeio
    from tinyfed.runtimes.base import batch_frame

    frames = [pipeio.read_frame(read_fd, worker.max_frame) for _ in range(count)]
    before = dict(worker.tally)
    if os.environ.get(FAULT_ENV):
        for frame in frames:
            reply_to(frame, write_fd, worker)
    else:
        pipeio.write_all(write_fd, b"".join(worker.handle_many(frames)))
    pipeio.write_all(write_fd, batch_frame(before, worker.tally))


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m tinyfed.runtimes.child READ_FD WRITE_FD CHILD_NUM", file=sys.stderr)
        return 2
    read_fd, write_fd, num = (int(a) for a in argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    for fd in (read_fd, write_fd):
        os.set_inheritable(fd, False)
    threading.Thread(target=watch_parent, args=(os.getppid(),), daemon=True).start()
    from tinyfed.memtune import keep_freed_memory
    from tinyfed.runtimes import pipeio

    keep_freed_memory()
    import tinyfed.worker  # noqa: F401  warm: torch imported while the parent loads the data

    try:
        return serve(read_fd, write_fd, num)
    except pipeio.PipeClosed:  # the parent went away while we wrote: nothing left to do
        return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown (torch's takes ~1 s); nothing else to flush
