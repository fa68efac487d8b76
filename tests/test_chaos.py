"""Chaos: a seeded random schedule of SIGKILLs of the server, its child processes and HTTP
clients during a deterministic run; the run is resumed or the client restarted after each, and
the finished run's final weights must equal an undisturbed run's bit for bit.

Over processes, a killed child fails its task; `min_clients` = all makes the round retry, and
only that client runs again (same task seed), so the aggregate is unchanged. Over HTTP, a
restarted client picks up its open task; a killed server resumes from its last checkpoint and
redoes the rounds after it. Bounded: at most `KILLS` kills, every wait has a limit, and every
process the test started (and every child it saw) is ended by pid.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.http_helpers import Procs, wait_for
from tests.test_http_run import free_port, rounds, run_with
from tinyfed.runtimes.http.auth import new_tokens, write_tokens

pytestmark = pytest.mark.slow

KILLS = 4
ROUNDS = 8
EXPERIMENT = dict(synthetic_size=3000, epochs=2, batch_size=10, rounds=ROUNDS, min_clients=4,
                  round_retries=6)


def flags() -> list[str]:
    return ["--dataset", "synthetic", "--set", "synthetic_size=3000", "--model", "mlp128",
            "--clients", "4", "--epochs", "2", "--batch-size", "10", "--lr", "0.1",
            "--seed", "3", "--rounds", str(ROUNDS), "--min-clients", "4", "--set",
            "round_retries=6", "--deterministic", "--plain"]


def children_of(pid: int) -> list[int]:
    """Pids whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def same_model(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def reference(tmp_path: Path) -> Path:
    run_with("inprocess", tmp_path / "ref", **EXPERIMENT)
    return tmp_path / "ref" / "model.safetensors"


def wait_rounds(out: Path, n: int, proc: subprocess.Popen, limit: float = 120) -> None:
    wait_for(lambda: len(rounds(out)) >= n or proc.poll() is not None, limit, f"{n} rounds")


def test_chaos_over_processes(tmp_path):
    rng = random.Random(20261203)
    out = tmp_path / "run"
    procs = Procs()
    seen_children: set[int] = set()
    schedule = []
    try:
        server = procs.start("run", *flags(), "--runtime", "processes", "--workers", "2",
                             "--out", str(out), log=tmp_path / "s0.log")
        for kill in range(KILLS):
            target = rng.randint(1, ROUNDS - 2)
            wait_rounds(out, target, server)
            time.sleep(rng.uniform(0.0, 0.4))
            if server.poll() is not None or len(rounds(out)) >= ROUNDS:
                break  # finished: a kill now would test nothing
            kids = children_of(server.pid)
            seen_children.update(kids)
            if rng.random() < 0.5 and kids:
                victim = rng.choice(kids)
                os.kill(victim, signal.SIGKILL)
                schedule.append(("child", len(rounds(out))))
            else:
                os.kill(server.pid, signal.SIGKILL)
                server.wait()
                schedule.append(("server", len(rounds(out))))
                server = procs.start("run", "--resume", str(out), "--plain",
                                     log=tmp_path / f"s{kill + 1}.log")
        wait_for(lambda: server.poll() is not None, 300, "the run to finish")
        assert server.returncode == 0, (tmp_path / "s0.log").read_text()[-2000:]
        print("chaos schedule (victim, rounds done):", schedule)
        assert schedule, "no kill happened: the run finished first"
        assert [r["round"] for r in rounds(out)] == list(range(1, ROUNDS + 1))
        assert same_model(out / "model.safetensors", reference(tmp_path)), schedule
    finally:
        procs.kill_all()
        for pid in seen_children:  # children of a killed server end by themselves; make sure
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_chaos_over_http(tmp_path):
    rng = random.Random(7)
    tokens = tmp_path / "tokens.txt"
    write_tokens(tokens, new_tokens(range(4)))
    out, port = tmp_path / "run", free_port()
    url = f"http://127.0.0.1:{port}"
    procs = Procs()
    serve = ["serve", *flags(), "--port", str(port), "--tokens", str(tokens), "--set",
             "round_timeout=120"]
    schedule = []

    def client(ids: str, n: int) -> subprocess.Popen:
        return procs.start("client", "--server", url, "--tokens", str(tokens), "--client-ids",
                           ids, "--backoff", "0.1", "--retries", "200", "--delay", "0.3",
                           log=tmp_path / f"c{ids}-{n}.log")

    try:
        server = procs.start(*serve, "--out", str(out), "--wait-clients", "4",
                             log=tmp_path / "s0.log")
        wait_for(lambda: "serving on" in (tmp_path / "s0.log").read_text(), what="the server")
        clients = {"0,1": client("0,1", 0), "2,3": client("2,3", 0)}
        for kill in range(KILLS):
            wait_rounds(out, rng.randint(1, ROUNDS - 2), server)
            time.sleep(rng.uniform(0.0, 0.4))
            if server.poll() is not None or len(rounds(out)) >= ROUNDS:
                break  # finished: a kill now would test nothing
            if rng.random() < 0.5:
                ids = rng.choice(sorted(clients))
                os.kill(clients[ids].pid, signal.SIGKILL)
                clients[ids].wait()
                clients[ids] = client(ids, kill + 1)
                schedule.append(("client " + ids, len(rounds(out))))
            else:
                os.kill(server.pid, signal.SIGKILL)
                server.wait()
                schedule.append(("server", len(rounds(out))))
                server = procs.start("serve", "--resume", str(out), "--port", str(port),
                                     "--tokens", str(tokens), "--plain",
                                     log=tmp_path / f"s{kill + 1}.log")
        wait_for(lambda: server.poll() is not None, 300, "the run to finish")
        assert server.returncode == 0
        print("chaos schedule (victim, rounds done):", schedule)
        assert schedule, "no kill happened: the run finished first"
        assert [r["round"] for r in rounds(out)] == list(range(1, ROUNDS + 1))
        assert same_model(out / "model.safetensors", reference(tmp_path)), schedule
        for c in clients.values():  # clients hear "run over" and leave by themselves
            wait_for(lambda c=c: c.poll() is not None, 60, "client exit")
    finally:
        procs.kill_all()

