"""`--runtime http` with a client process SIGKILLed by pid mid-run: with `respawn` a fresh
process takes over its ids and the run is unchanged; without, its ids fail at every deadline."""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from tests.conftest import small_config
from tinyfed.runner import execute, open_run
from tinyfed.runtimes.http.local import LocalHttpRuntime


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def run_killing_worker0(out, **over):
    """A 2-round HTTP run over 2 worker processes; worker 0's process is SIGKILLed as soon as
    round 1's record is published (the server is then between rounds 1 and 2)."""
    cfg = small_config(out=str(out), runtime="http", workers=2, rounds=2, deterministic=True,
                       **over)
    run_dir, cfg = open_run(cfg, None, {})
    runtime = LocalHttpRuntime(cfg)
    killed: list[int] = []

    def kill_after_round_1(record):
        if record.get("kind", "round") == "round" and record["round"] == 1:
            pid = runtime.workers[0].proc.pid
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    try:
        result = execute(cfg, run_dir, live=False, stream=io.StringIO(),
                         subscribers=[kill_after_round_1], runtime=runtime)
    finally:  # only if close() itself failed: never leave a child behind
        for proc in runtime.spawned:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return result, runtime, killed


def assert_all_reaped(runtime: LocalHttpRuntime) -> None:
    assert runtime.spawned
    for proc in runtime.spawned:
        assert proc.returncode is not None  # waited for by us: no zombie, no survivor
        assert not alive(proc.pid)


def test_killed_client_process_is_respawned_and_the_run_is_unchanged(tmp_path):
    result, runtime, killed = run_killing_worker0(tmp_path / "http", round_timeout=60)
    recs = [r for r in result.state.records if r.get("kind", "round") == "round"]
    assert [r["round"] for r in recs] == [1, 2]
    assert result.state.round == 2
    # the fresh process picked up its ids' open task in round 2: nobody failed
    assert [r["clients_succeeded"] for r in recs] == [4, 4]
    assert all(r["clients_failed"] == 0 for r in recs)
    assert runtime.restarts == 1
    assert len(runtime.spawned) == 3  # 2 workers + 1 replacement
    assert runtime.spawned[0].pid == killed[0]
    assert runtime.spawned[0].returncode == -signal.SIGKILL
    assert all(p.returncode == 0 for p in runtime.spawned[1:])  # left when told the run ended
    assert_all_reaped(runtime)
    # training is a pure function of (weights, shard, seed): the respawned process computes
    # the very same updates, so the model is bit-identical to an in-process run
    ref_cfg = small_config(out=str(tmp_path / "ref"), runtime="inprocess", rounds=2,
                           deterministic=True)
    ref_dir, ref_cfg = open_run(ref_cfg, None, {})
    execute(ref_cfg, ref_dir, live=False, stream=io.StringIO())
    got = load_file(str(result.run_dir.model))
    want = load_file(str(ref_dir.model))
    assert got.keys() == want.keys()
    assert all((got[k] == want[k]).all() for k in want)


def test_with_respawn_off_the_dead_ids_fail_at_each_deadline(tmp_path, capfd):
    result, runtime, killed = run_killing_worker0(
        tmp_path / "http", round_timeout=3, respawn=False, min_clients=2)
    recs = [r for r in result.state.records if r.get("kind", "round") == "round"]
    assert [r["round"] for r in recs] == [1, 2]
    dead = {0, 2}  # worker 0's ids (dealt round-robin)
    assert [r["clients_succeeded"] for r in recs] == [4, 2]
    for r in recs[1:]:
        assert {f["client_id"] for f in r["failures"]} == dead
        assert r["clients_failed"] == 2
        assert all("deadline" in f["reason"] for f in r["failures"])
    assert runtime.restarts == 0
    assert len(runtime.spawned) == 2
    assert runtime.spawned[0].returncode == -signal.SIGKILL
    assert runtime.pids() == []  # workers cleared at close
    assert_all_reaped(runtime)
    err = capfd.readouterr().err
    assert f"pid {killed[0]}) exited mid-run (killed by SIGKILL); respawn is off" in err



def test_a_crash_loop_gives_up_after_a_bounded_number_of_restarts(capfd):
    """A client process that dies at once every time: restarted MAX_QUICK_DEATHS times, then
    the worker is given up with one line on stderr; every process started is reaped."""
    from tinyfed.runtimes.http import local

    runtime = LocalHttpRuntime(small_config())
    runtime._cmd = [sys.executable, "-c", "raise SystemExit(3)"]  # then --client-ids 1,3
    runtime._env = dict(os.environ)
    worker = local.Worker(0, [1, 3], runtime._spawn([1, 3]), time.monotonic())
    runtime.workers.append(worker)
    try:
        runtime._watch(worker)  # returns once the worker is given up
    finally:
        for proc in runtime.spawned:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert runtime.restarts == local.MAX_QUICK_DEATHS
    assert len(runtime.spawned) == local.MAX_QUICK_DEATHS + 1
    assert all(p.returncode == 3 for p in runtime.spawned)
    assert worker.down.startswith("giving up after 3 restarts")
    assert runtime.pids() == []
    err = capfd.readouterr().err.splitlines()
    assert sum("restarted as pid" in line for line in err) == local.MAX_QUICK_DEATHS
    assert err[-1].endswith("(exit code 3); giving up after 3 restarts that each died within "
                            "30 s, its clients fail at each deadline")
