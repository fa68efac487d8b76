"""The same failure semantics in every runtime, synchronous and asynchronous: a client that
sends a bad frame, answers after its deadline, or whose process dies fails alone; the others'
updates are merged and the run finishes. Faults come from the client-side test hook
(`tinyfed.faults`), which every runtime's `ClientWorker` runs, so one module covers in-process,
processes (pipes), HTTP and Ray (skipped only where Ray is not installed).
"""

from __future__ import annotations

import importlib.util
import io

import pytest

from tests.conftest import small_config
from tinyfed.faults import FAULT_ENV, ONCE_ENV
from tinyfed.rundir import RunDir
from tinyfed.runner import execute

pytestmark = pytest.mark.slow

RUNTIMES = ["inprocess", "processes", "http",
            pytest.param("ray", marks=pytest.mark.skipif(
                importlib.util.find_spec("ray") is None, reason="Ray is not installed"))]
MODES = ["sync", "async"]
BAD = 3  # the misbehaving client: last in selection order, so in-process no task waits on it


def run(tmp_path, runtime: str, mode: str, **over):
    # over HTTP a process is a device: one id each, so a crash takes down one client only
    # in-process, processes and Ray with the fused trainer: clients one by one per worker
    # (stacked, a batch shares a deadline, and a worker lost mid-batch resends it:
    # test_processes.py, test_ray_runtime.py)
    extra = {"workers": {"processes": 2, "http": 4, "ray": 2}[runtime]} \
        if runtime != "inprocess" else {}
    if runtime in ("inprocess", "processes", "ray"):
        extra["trainer"] = "fused"
    cfg = small_config(out=str(tmp_path / f"{runtime}-{mode}"), runtime=runtime, mode=mode,
                       clients=4, concurrency=4 if mode == "async" else None, **extra, **over)
    run_dir = RunDir.create(cfg)
    return execute(run_dir.saved_config(), run_dir, live=False, stream=io.StringIO())


def failures(res) -> list[dict]:
    return [f for r in res.state.records for f in r["failures"]]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_bad_frame_fails_alone(tmp_path, monkeypatch, runtime, mode):
    monkeypatch.setenv(FAULT_ENV, f"garbage:{BAD}")
    # async: enough merges that the bad client's first task surely answers within the run,
    # even when one worker starts late and the other serves the first merges alone
    rounds = 2 if mode == "sync" else 4
    res = run(tmp_path, runtime, mode, rounds=rounds)
    fails = failures(res)
    assert fails and all(f["client_id"] == BAD for f in fails)
    assert all("not a tinyfed frame" in f["reason"] for f in fails)
    assert res.state.round == rounds
    merged = sum(r["clients_succeeded"] for r in res.state.records)
    assert merged == (3 * rounds if mode == "sync" else 4 * rounds)  # sync: 3 good clients


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_result_after_its_deadline_fails_alone_and_is_dropped(tmp_path, monkeypatch, runtime):
    """Client 3 answers round 2 two seconds after its deadline: that task alone fails (killed,
    abandoned or dropped as late, as the runtime can), the round goes on with the others, and
    round 3 is served in full (a killed worker is replaced within the deadline)."""
    monkeypatch.setenv(FAULT_ENV, f"sleep=8:{BAD}:2")
    res = run(tmp_path, runtime, "sync", rounds=3, round_timeout=6.0)
    assert [(r["round"], [f["client_id"] for f in r["failures"]]) for r in res.state.records] \
        == [(1, []), (2, [BAD]), (3, [])]
    reason = res.state.records[1]["failures"][0]["reason"]
    assert "deadline" in reason or "late" in reason
    assert [r["clients_succeeded"] for r in res.state.records] == [4, 3, 4]


@pytest.mark.parametrize("runtime", [r for r in RUNTIMES if r != "inprocess"])
def test_a_slow_task_never_holds_the_async_merges(tmp_path, monkeypatch, runtime):
    """Async: client 3's first task sleeps far past its deadline; the others' updates keep
    being merged, and the slow task, if its deadline came during the run, fails alone."""
    monkeypatch.setenv(FAULT_ENV, f"sleep=30:{BAD}")
    monkeypatch.setenv(ONCE_ENV, str(tmp_path))
    res = run(tmp_path, runtime, "async", rounds=3, round_timeout=3.0)
    assert res.state.round == 3
    fails = failures(res)
    assert all(f["client_id"] == BAD and ("deadline" in f["reason"] or "late" in f["reason"])
               for f in fails)
    assert sum(r["clients_succeeded"] for r in res.state.records) == 3 * 4


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("runtime", [r for r in RUNTIMES if r != "inprocess"])
def test_a_client_process_that_dies_fails_alone_and_the_next_task_is_served(
        tmp_path, monkeypatch, runtime, mode):
    monkeypatch.setenv(FAULT_ENV, f"exit:{BAD}")
    monkeypatch.setenv(ONCE_ENV, str(tmp_path))
    res = run(tmp_path, runtime, mode, rounds=3, round_timeout=20.0)
    assert res.state.round == 3
    assert all(f["client_id"] == BAD for f in failures(res))
    # over HTTP the restarted client may still answer the open task; in async mode the others'
    # merges may end the run before the death is noticed
    if runtime != "http" and mode == "sync":
        assert len(failures(res)) == 1
    assert len(failures(res)) <= 1
    if mode == "sync":  # the client is served again after its process died
        assert res.state.records[-1]["clients_failed"] == 0
    else:  # the merges went on to the end; where the death lands depends on the clock
        assert sum(r["clients_succeeded"] for r in res.state.records) == 3 * 4
