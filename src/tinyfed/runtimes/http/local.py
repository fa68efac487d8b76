"""`--runtime http` on one machine: the HTTP server in this process plus `workers` client
processes on loopback, each acting for several client ids with their own tokens.

Tokens are made in memory and handed to the children in a file only they and we can read,
removed at close; children are reaped by pid.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tinyfed.experiment import Experiment
from tinyfed.runtimes.http.auth import new_tokens, write_tokens
from tinyfed.runtimes.http.runtime import HttpOptions, HttpRuntime


def worker_ids(client_ids: list[int], workers: int) -> list[list[int]]:
    """Client ids dealt round-robin to `workers` processes (none left empty)."""
    workers = max(1, min(workers, len(client_ids)))
    return [client_ids[w::workers] for w in range(workers)]


class LocalHttpRuntime(HttpRuntime):
    def __init__(self, config, bus=None):
        tokens = new_tokens(range(config.clients))
        super().__init__(config, HttpOptions(tokens=tokens, announce=False), bus)
        self.procs: list[subprocess.Popen] = []
        self._tmp: str | None = None

    def start(self, experiment: Experiment) -> None:
        super().start(experiment)
        cfg = experiment.config
        workers = cfg.workers or min(cfg.clients, os.cpu_count() or 1)
        self._tmp = tempfile.mkdtemp(prefix="tinyfed-http-")
        tokens_file = Path(self._tmp) / "tokens.txt"
        write_tokens(tokens_file, self.options.tokens)
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[3])
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        for ids in worker_ids(experiment.client_ids, workers):
            cmd = [sys.executable, "-m", "tinyfed", "client", "--server", self.url,
                   "--tokens", str(tokens_file), "--client-ids", ",".join(map(str, ids)),
                   "--quiet"]
            if cfg.data_dir:
                cmd += ["--data-dir", cfg.data_dir]
            self.procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL))

    def close(self) -> None:
        try:
            super().close()
        finally:
            for proc in self.procs:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self.procs = []
            if self._tmp:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
