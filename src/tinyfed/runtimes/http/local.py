"""`--runtime http` on one machine: the HTTP server in this process plus `workers` client
processes on loopback, each acting for several client ids with their own tokens.

Tokens are made in memory and handed to the children in a file only they and we can read,
removed at close; children are reaped by pid. One watcher thread per worker blocks in
`wait()` on its process: if it exits while the run is live and `respawn` is on, a fresh one is
started for the same ids (it registers itself and picks up any task still open for them); a
worker whose processes keep dying soon after start is given up with a one-line message.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tinyfed.experiment import Experiment
from tinyfed.runtimes.base import STARTUP_TIMEOUT
from tinyfed.runtimes.http.auth import new_tokens, write_tokens
from tinyfed.runtimes.http.runtime import HttpOptions, HttpRuntime
from tinyfed.runtimes.processes import describe_exit

QUICK_DEATH = 30.0  # seconds: a process dying sooner than this after its start looks like a loop
MAX_QUICK_DEATHS = 3  # such deaths in a row before a worker is given up
EXIT_GRACE = 5.0  # seconds a child gets to leave after the run ends before SIGKILL


def worker_ids(client_ids: list[int], workers: int) -> list[list[int]]:
    """Client ids dealt round-robin to `workers` processes (none left empty)."""
    workers = max(1, min(workers, len(client_ids)))
    return [client_ids[w::workers] for w in range(workers)]


@dataclass
class Worker:
    """One client process slot: the ids it serves and its current process."""

    num: int
    ids: list[int]
    proc: subprocess.Popen
    started: float
    quick_deaths: int = 0
    down: str = ""  # why this worker has no process any more (respawn off, crash loop)
    thread: threading.Thread | None = None


class LocalHttpRuntime(HttpRuntime):
    def __init__(self, config, bus=None):
        tokens = new_tokens(range(config.clients))
        super().__init__(config, HttpOptions(tokens=tokens, announce=False), bus)
        self.workers: list[Worker] = []
        self.spawned: list[subprocess.Popen] = []  # every process ever started, all reaped
        self.restarts = 0  # processes started to replace one that died mid-run
        self._lock = threading.Lock()
        self._closing = False
        self._tmp: str | None = None
        self._cmd: list[str] = []
        self._env: dict[str, str] = {}

    def start(self, experiment: Experiment) -> None:
        super().start(experiment)
        cfg = experiment.config
        workers = cfg.workers or min(cfg.clients, os.cpu_count() or 1)
        self._tmp = tempfile.mkdtemp(prefix="tinyfed-http-")
        tokens_file = Path(self._tmp) / "tokens.txt"
        write_tokens(tokens_file, self.options.tokens)
        self._env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[3])
        self._env["PYTHONPATH"] = src + os.pathsep + self._env.get("PYTHONPATH", "")
        self._cmd = [sys.executable, "-m", "tinyfed", "client", "--server", self.url,
                     "--tokens", str(tokens_file), "--quiet"]
        if cfg.data_dir:
            self._cmd += ["--data-dir", cfg.data_dir]
        with self._lock:
            for num, ids in enumerate(worker_ids(experiment.client_ids, workers)):
                self.workers.append(Worker(num, ids, self._spawn(ids), time.monotonic()))
        for w in self.workers:
            w.thread = threading.Thread(target=self._watch, args=(w,), daemon=True,
                                        name=f"tinyfed-http-worker-{w.num}")
            w.thread.start()
        self._await_clients()

    def _await_clients(self) -> None:
        """Hold round 1 until every live worker's ids have reached the server (as the process
        runtime waits for its children's HELLO), so start-up does not eat round 1's deadline.
        Bounded: after STARTUP_TIMEOUT the run goes on and late ids fail at their deadline."""
        end = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < end:
            with self._lock:
                want = {c for w in self.workers if not w.down for c in w.ids}
            if all(c in self.hub.registered for c in want):
                return
            time.sleep(0.05)

    def pids(self) -> list[int]:
        """Pids of the live client processes (for tests and diagnostics)."""
        with self._lock:
            return [w.proc.pid for w in self.workers if not w.down]

    def _spawn(self, ids: list[int]) -> subprocess.Popen:
        proc = subprocess.Popen([*self._cmd, "--client-ids", ",".join(map(str, ids))],
                                env=self._env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL)
        self.spawned.append(proc)
        return proc

    def _watch(self, w: Worker) -> None:
        """Wait for the worker's process; replace it if it died while the run is live."""
        while True:
            proc = w.proc
            code = proc.wait()  # reaps it
            with self._lock:
                if self._closing:
                    return
                what = (f"tinyfed: client process {w.num} (ids {','.join(map(str, w.ids))}, "
                        f"pid {proc.pid}) exited mid-run ({describe_exit(code)})")
                w.quick_deaths = (w.quick_deaths + 1
                                  if time.monotonic() - w.started < QUICK_DEATH else 1)
                if not self.config.respawn:
                    w.down = "respawn is off"
                elif w.quick_deaths > MAX_QUICK_DEATHS:
                    w.down = (f"giving up after {MAX_QUICK_DEATHS} restarts that each died "
                              f"within {QUICK_DEATH:g} s")
                else:
                    try:
                        w.proc, w.started = self._spawn(w.ids), time.monotonic()
                    except OSError as exc:
                        w.down = f"restart failed: {exc}"
                if w.down:
                    print(f"{what}; {w.down}, its clients fail at each deadline",
                          file=sys.stderr, flush=True)
                    return
                self.restarts += 1
                print(f"{what}; restarted as pid {w.proc.pid}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Stop respawning, end the run for clients (they exit on 410), reap every pid."""
        with self._lock:
            self._closing = True
        try:
            super().close()
        finally:
            end = time.monotonic() + EXIT_GRACE
            for proc in self.spawned:
                try:
                    proc.wait(timeout=max(0.0, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()  # SIGKILL by pid
                    proc.wait()
            for w in self.workers:
                if w.thread is not None:
                    w.thread.join(5)
            self.workers = []
            if self._tmp:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
