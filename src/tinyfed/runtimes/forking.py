"""Start a child process as a fork of this one, when that is safe: it then has torch and
tinyfed imported already, where a fresh interpreter takes ~1.5 s of CPU to import them (on two
cores, two children importing beside a parent loading its data made up most of a run's
start-up). Safe means this process runs no other Python thread (a fork copies only the calling
thread, and any lock another thread held stays held in the child) and the child will run
torch on one thread (its intra-op pool is not fork-safe); else the caller spawns a fresh
interpreter as before. The child closes every inherited descriptor but its own two pipe ends
and never returns into the parent's code: it runs `child.main` and `os._exit`s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time


def can_fork(child_threads: int) -> bool:
    return hasattr(os, "fork") and child_threads == 1 and threading.active_count() == 1


class Forked:
    """The parent's handle on a forked child: the part of `subprocess.Popen` the process
    transport uses (pid, poll, wait, returncode)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def _reap(self, flags: int) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, flags)
            except ChildProcessError:  # reaped elsewhere: nothing more to learn
                self.returncode = -1
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        return self._reap(os.WNOHANG)

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            return self._reap(0)
        end = time.monotonic() + timeout
        delay = 0.001
        while self.poll() is None:
            if time.monotonic() >= end:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return self.returncode


def fork_child(task_r: int, up_w: int, num: int) -> Forked:
    """Fork; in the child, keep only the two pipe ends and serve tasks until told to stop."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return Forked(pid)
    code = 1
    try:
        keep = {0, 1, 2, task_r, up_w}
        for name in os.listdir("/proc/self/fd"):
            if int(name) not in keep:
                try:
                    os.close(int(name))
                except OSError:
                    pass
        from tinyfed.runtimes import child

        code = child.main([str(task_r), str(up_w), str(num)])
    finally:
        os._exit(code)
