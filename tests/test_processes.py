"""The process runtime with real child processes, real pipes and real SIGKILLs.

Faults are injected through the child's test hook (TINYFED_TEST_CHILD_FAULT, read only in
runtimes/child.py); kills are real signals to the real child pids.
"""

from __future__ import annotations

import ctypes
import glob
import io
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests.conftest import needs_fmnist, small_config
from tinyfed.runner import execute, open_run
from tinyfed.runtimes.processes import ProcessRuntime
from tinyfed.server import RoundFailed


def children_of(pid: int) -> set[int]:
    out: set[int] = set()
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            out.update(int(x) for x in Path(path).read_text().split())
        except OSError:
            pass
    return out


@pytest.fixture(autouse=True)
def no_leftover_processes():
    before = children_of(os.getpid())
    yield
    left = children_of(os.getpid()) - before
    for pid in left:  # clean up first, then fail
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    assert not left, f"processes left behind: {sorted(left)}"


def run(tmp_path: Path, name: str, runtime_obj=None, **over):
    cfg = small_config(out=str(tmp_path / name), **over)
    run_dir, cfg = open_run(cfg, None, {})
    return execute(cfg, run_dir, live=False, stream=io.StringIO(), runtime=runtime_obj)


def records(result) -> list[dict]:
    return [r for r in result.state.records if r["kind"] == "round"]


def assert_same_weights(a, b) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_bytes(ra, rb, clients_per_round: int) -> None:
    assert [r["bytes_down"] for r in ra] == [r["bytes_down"] for r in rb]
    assert [r["bytes_up"] for r in ra] == [r["bytes_up"] for r in rb]


def test_deterministic_run_is_bit_identical_to_inprocess(tmp_path):
    base = run(tmp_path, "inproc", deterministic=True, rounds=2)
    proc = run(tmp_path, "procs", deterministic=True, rounds=2, runtime="processes", workers=2)
    assert_same_weights(base.state.weights, proc.state.weights)
    assert_same_bytes(records(base), records(proc), 4)
    assert all(r["clients_succeeded"] == 4 for r in records(proc))


@pytest.mark.parametrize("codec", ["delta", "delta+topk:0.1"])
def test_more_clients_than_workers(tmp_path, codec):
    # any child serves any client, also with error feedback (its memory rides with the task)
    over = dict(deterministic=True, clients=5, rounds=2, codec=codec)
    base = run(tmp_path, "inproc", **over)
    proc = run(tmp_path, "procs", runtime="processes", workers=2, **over)
    assert_same_weights(base.state.weights, proc.state.weights)
    assert all(r["clients_succeeded"] == 5 for r in records(proc))


@needs_fmnist
def test_deterministic_fmnist_is_bit_identical_to_inprocess(tmp_path):
    over = dict(dataset="fmnist", model="mlp", clients=4, partition="ranges", range_size=500,
                batch_size=10, epochs=1, rounds=2, deterministic=True)
    base = run(tmp_path, "inproc", **over)
    proc = run(tmp_path, "procs", runtime="processes", workers=2, **over)
    assert_same_weights(base.state.weights, proc.state.weights)
    assert_same_bytes(records(base), records(proc), 4)


def fault_env(monkeypatch, tmp_path: Path, spec: str) -> Path:
    mark = tmp_path / "marks"
    mark.mkdir()
    monkeypatch.setenv("TINYFED_TEST_CHILD_FAULT", spec)
    monkeypatch.setenv("TINYFED_TEST_CHILD_MARK", str(mark))
    return mark


def run_and_kill(tmp_path: Path, mark: Path, **over):
    """Run in a thread; SIGKILL the child as soon as it reports it is inside the task."""
    out: dict = {}

    def target():
        try:
            out["result"] = run(tmp_path, "procs", **over)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            out["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    killed = None
    while thread.is_alive() and killed is None:
        files = list(mark.glob("fault-*"))
        if files:
            killed = int(files[0].name.removeprefix("fault-"))
            os.kill(killed, signal.SIGKILL)
        else:
            time.sleep(0.05)
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["result"], killed


@pytest.mark.parametrize("respawn", [True, False], ids=["respawn", "no-respawn"])
def test_child_sigkilled_mid_round(tmp_path, monkeypatch, respawn):
    # client 3 is the last task of its child's batch (clients 1 and 3: equal shards are dealt
    # alternately), so when the child is killed it is the only task unanswered: it fails
    mark = fault_env(monkeypatch, tmp_path, "hang:3:1")
    result, killed = run_and_kill(tmp_path, mark, runtime="processes", workers=2, rounds=2,
                                  respawn=respawn, codec="delta")
    assert killed is not None
    r1, r2 = records(result)
    first = r1["failures"][0]
    assert first["client_id"] == 3
    assert f"pid {killed}" in first["reason"] and "killed by SIGKILL" in first["reason"]
    assert "EOF" in first["reason"]
    # only the killed task fails; the other clients are served (by the surviving child alone
    # when respawn is off), in round 1 and in round 2
    assert r1["clients_succeeded"] == 3 and len(r1["failures"]) == 1
    assert r1["num_examples"] == 3 * 150  # 600 synthetic examples / 4 clients
    assert r2["clients_succeeded"] == 4 and r2["failures"] == []
    assert not Path(f"/proc/{killed}").exists()  # reaped, not a zombie
    assert all(torch.isfinite(v).all() for v in result.state.weights.values())


@pytest.mark.parametrize("mode,why", [
    ("garbage", "malformed frame: not a tinyfed frame"),
    ("truncate", "died: EOF after"),
    ("oversize", "malformed frame: frame of"),
])
def test_bad_reply_fails_the_task_only(tmp_path, monkeypatch, mode, why):
    fault_env(monkeypatch, tmp_path, f"{mode}:2:1")
    result = run(tmp_path, "procs", runtime="processes", workers=2, rounds=2)
    r1, r2 = records(result)
    assert r1["clients_succeeded"] == 3 and r1["num_examples"] == 3 * 150
    assert [f["client_id"] for f in r1["failures"]] == [2]
    assert why in r1["failures"][0]["reason"]
    assert r2["clients_succeeded"] == 4


@pytest.mark.parametrize("trainer,failed", [("fused", [0]), ("vectorized", [0, 2])])
def test_hang_past_the_deadline(tmp_path, monkeypatch, trainer, failed):
    """One task at a time, only the hung task fails; stacking, its batch shares the deadline
    (clients 0 and 2 went to one child together: equal shards are dealt alternately), and the
    other child's batch is served. The
    batch's other task is not sent again to a second child (the deadline would kill that one
    too): the round's bytes are its four task frames, no second child is replaced."""
    fault_env(monkeypatch, tmp_path, "hang:0:1")
    rt = ProcessRuntime(small_config(runtime="processes", workers=2, trainer=trainer))
    result = run(tmp_path, "procs", runtime="processes", workers=2, rounds=2, round_timeout=4.0,
                 trainer=trainer, runtime_obj=rt)
    r1, r2 = records(result)
    assert [f["client_id"] for f in r1["failures"]] == failed
    assert all(f["reason"] == "deadline: no result within round_timeout=4 s (child killed)"
               for f in r1["failures"])
    assert r1["clients_succeeded"] == 4 - len(failed)
    assert r2["clients_succeeded"] == 4
    assert abs(r1["bytes_down"] - r2["bytes_down"]) < 16  # frames differ by a digit or two
    # two children, and at most one in place of the killed one (the run may end before its
    # listener has started the replacement: the other child serves round 2 alone)
    assert len(rt.spawned) <= 3


def test_round_below_min_clients_is_retried_then_stops(tmp_path, monkeypatch):
    mark = fault_env(monkeypatch, tmp_path, "garbage:1:1")
    with pytest.raises(RoundFailed, match="3 of 4 clients succeeded.*after 2 attempts"):
        run(tmp_path, "procs", runtime="processes", workers=2, min_clients=4, round_retries=1)
    assert len(list(mark.glob("fault-*"))) == 2  # the retry was sent again


def test_stacked_children_match_one_by_one_and_say_so(tmp_path):
    """Not deterministic, each child trains its batch stacked (the 2NN-like mlp128 at B=20 on
    one thread): the same updates as one client after another, to float tolerance, the same
    bytes on the wire, and the report counts what the children stacked."""
    alone = run(tmp_path, "alone", rounds=3, trainer="fused")
    procs = run(tmp_path, "procs", rounds=3, runtime="processes", workers=2)
    assert procs.trainer.stacks and procs.trainer.name == "vectorized"
    assert procs.trainer.reason.endswith("; 12 of 12 tasks stacked"), procs.trainer.reason
    assert_same_bytes(records(alone), records(procs), 4)
    for k, v in alone.state.weights.items():
        torch.testing.assert_close(procs.state.weights[k], v, rtol=1e-4, atol=1e-5)
    assert [r["num_examples"] for r in records(procs)] == [600, 600, 600]


def test_async_children_stack_what_is_submitted_together(tmp_path):
    """Async: the first four tasks go out together (two per child, stacked); each refill after
    a merge is one task, trained alone. Every merge lands and the report counts both."""
    res = run(tmp_path, "async", runtime="processes", workers=2, mode="async", concurrency=4,
              rounds=3)
    assert res.state.round == 3
    assert sum(r["clients_succeeded"] for r in records(res)) == 12
    assert not [f for r in records(res) for f in r["failures"]]
    reason = res.trainer.reason
    assert "4 of " in reason and "tasks stacked, the others alone" in reason, reason


@pytest.mark.parametrize("once", [True, False], ids=["once", "every-time"])
def test_child_lost_mid_batch_resends_its_tasks_one_by_one(tmp_path, monkeypatch, once):
    """Clients 0 and 2 go to one child as a batch (equal shards are dealt alternately); it dies
    (exit 3) on client 0's task before answering either. Both are sent again, one by one: a
    death that does not recur costs nothing; one that does costs client 0 alone. The lost
    task frames still count in the round's bytes: two more than a clean round, either way."""
    from tinyfed.faults import FAULT_ENV, ONCE_ENV

    clean = records(run(tmp_path, "clean", rounds=2))
    monkeypatch.setenv(FAULT_ENV, "exit:0:1")
    if once:
        monkeypatch.setenv(ONCE_ENV, str(tmp_path))
    r1, r2 = records(run(tmp_path, "procs", runtime="processes", workers=2, rounds=2))
    one_task = clean[0]["bytes_down"] / 4  # four task frames that differ by a digit or two
    if once:
        assert r1["failures"] == [] and r1["clients_succeeded"] == 4
        assert r1["bytes_up"] == clean[0]["bytes_up"]
        assert abs(r1["bytes_down"] - clean[0]["bytes_down"] - 2 * one_task) < 16
    else:
        assert [f["client_id"] for f in r1["failures"]] == [0]
        assert "died: EOF at a frame boundary (exit code 3)" in r1["failures"][0]["reason"]
        assert r1["clients_succeeded"] == 3 and r1["num_examples"] == 3 * 150
        assert abs(r1["bytes_up"] - clean[0]["bytes_up"] * 3 / 4) < 16  # three replies
        assert abs(r1["bytes_down"] - clean[0]["bytes_down"] - 2 * one_task) < 16
    assert r2["failures"] == [] and r2["bytes_down"] == clean[1]["bytes_down"]


@pytest.mark.parametrize("count", [0, 5, "2", -1])
def test_a_bad_batch_frame_stops_the_child_with_a_reason(count):
    """A BATCH frame must announce 1 to K tasks (K = the clients the child serves): else the
    child answers FAILURE naming the count and what is allowed, and exits 1."""
    from tinyfed import wire
    from tinyfed.runtimes import pipeio
    from tinyfed.runtimes.processes import ProcessRuntime, handshake, launch

    runtime = ProcessRuntime(small_config())
    child = launch(0)
    try:
        handshake(child, runtime._hello_for(0))
        pipeio.write_all(child.to_child, wire.encode_frame(wire.Kind.BATCH, {"tasks": count}))
        reply = wire.decode_frame(pipeio.read_frame(child.from_child))
        assert reply.kind == wire.Kind.FAILURE
        assert reply.header["reason"] == (f"child 0: a BATCH frame announces {count!r} tasks; "
                                          "allowed: 1 to 4")
        assert child.proc.wait(timeout=30) == 1
    finally:
        child.reap()


@contextmanager
def subreaper():
    """Orphans of our subprocesses come to us, so we can see how (and whether) they exit."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    try:
        yield
    finally:
        libc.prctl(36, 0, 0, 0, 0)


def start_cli_run(tmp_path: Path, cli_env) -> tuple[subprocess.Popen, set[int]]:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinyfed", "run", "--plain", "--runtime", "processes",
         "--workers", "2", "--dataset", "synthetic", "--model", "mlp128", "--clients", "4",
         "--rounds", "100000", "--eval-every", "1000", "--checkpoint-every", "1000",
         "--out", str(out)],
        env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    kids: set[int] = set()
    while proc.poll() is None:  # wait until both children serve rounds
        kids = children_of(proc.pid)
        if len(kids) == 2 and metrics.is_file() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read().decode()
    return proc, kids


def wait_exit(pid: int, limit: float = 30.0) -> int | None:
    """Exit code of our (adopted) child, or None if it still runs after `limit` seconds."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def test_parent_sigkilled_children_exit_by_themselves(tmp_path, cli_env):
    with subreaper():
        proc, kids = start_cli_run(tmp_path, cli_env)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        codes = {pid: wait_exit(pid) for pid in kids}
    assert codes == {pid: 0 for pid in kids}  # each noticed on its own and exited cleanly


def test_ctrl_c_reaps_every_child(tmp_path, cli_env):
    with subreaper():
        proc, kids = start_cli_run(tmp_path, cli_env)
        os.kill(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(timeout=60)  # a swallowed Ctrl-C once left a run going for ever
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("the run did not stop within 60 s of Ctrl-C") from None
        assert code == 130
        err = proc.stderr.read().decode()
        proc.stderr.close()
        adopted = children_of(os.getpid()) & kids  # orphans would have come to us
        for pid in adopted:
            wait_exit(pid)
    assert not adopted, "children outlived the parent after Ctrl-C"
    assert "interrupted" in err and "Traceback" not in err
    assert not any(Path(f"/proc/{pid}").exists() for pid in kids)


def pipes_of(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        if int(fd.name) < 3:  # stdin, stdout, stderr: the parent's own, shared on purpose
            continue
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("pipe:"):
            out.add(link)
    return out


def test_cli_children_are_forks_that_keep_only_their_own_pipes(tmp_path, cli_env):
    """`tinyfed run` forks its children before loading the data (no second torch import);
    each closes what it inherited, so a child sees EOF when the parent goes, not when the
    other child does. They still map the parent's one copy of the examples."""
    proc, kids = start_cli_run(tmp_path, cli_env)
    try:
        parent_cmd = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        pipes = {}
        for pid in kids:
            assert Path(f"/proc/{pid}/cmdline").read_bytes() == parent_cmd  # a fork, no exec
            assert "memfd:tinyfed-examples" in Path(f"/proc/{pid}/maps").read_text()
            pipes[pid] = pipes_of(pid)
            assert len(pipes[pid]) == 2, pipes[pid]  # its task pipe and its update pipe
        a, b = pipes.values()
        assert not a & b
        assert proc.poll() is None
    finally:
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        proc.stderr.close()


def test_forked_children_are_bit_identical_to_inprocess(tmp_path, cli_env):
    from safetensors.torch import load_file

    weights = {}
    for runtime in ("inprocess", "processes"):
        out = tmp_path / runtime
        subprocess.run(
            [sys.executable, "-m", "tinyfed", "run", "--plain", "--runtime", runtime,
             "--workers", "2", "--deterministic", "--dataset", "synthetic", "--model", "mlp128",
             "--clients", "4", "--rounds", "2", "--out", str(out)],
            env=cli_env, check=True, capture_output=True, timeout=300)
        weights[runtime] = load_file(out / "model.safetensors")
    assert weights["inprocess"].keys() == weights["processes"].keys()
    assert all(torch.equal(weights["inprocess"][k], weights["processes"][k])
               for k in weights["inprocess"])
