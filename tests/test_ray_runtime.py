"""The Ray runtime on real Ray: local instance, a two-node cluster on loopback, killed actors,
the round deadline, and bit-identical results against the in-process runtime."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.conftest import small_config
from tinyfed.cli import main
from tinyfed.experiment import Experiment
from tinyfed.protocol import ClientTask, Expectation
from tinyfed.rundir import RunDir
from tinyfed.runner import execute
from tinyfed.wire import encode_tensors

ray = pytest.importorskip("ray", reason='Ray is not installed: pip install "tinyfed[ray]"')

from tinyfed.runtimes.dispatch import Dispatcher  # noqa: E402
from tinyfed.runtimes.ray_runtime import RayRuntime, RayUnavailable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GATE_ENV = "TINYFED_TEST_RAY_GATE"
RAY_BIN = str(Path(sys.executable).with_name("ray"))


class GatedLinear(nn.Module):
    """A linear model whose forward pass waits at a gate (a folder) until the test opens it.

    Each process that reaches the closed gate writes `busy-<pid>` there first, so the test
    knows exactly which actor process is mid-task before it kills it.
    """

    def __init__(self, input_shape, num_classes):
        super().__init__()
        size = 1
        for d in input_shape:
            size *= d
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(size, num_classes))

    def forward(self, x):
        gate = os.environ.get(GATE_ENV)
        if gate and not Path(gate, "open").exists():
            Path(gate, f"busy-{os.getpid()}").touch()
            for _ in range(6000):  # at most 300 s, so a broken test cannot hang an actor forever
                if Path(gate, "open").exists():
                    break
                time.sleep(0.05)
        return self.net(x)


def gated_linear(input_shape, num_classes):
    return GatedLinear(input_shape, num_classes)


GATED = "tests.test_ray_runtime:gated_linear"
SYNTH = ["--dataset", "synthetic", "--set", "synthetic_size=600", "--model", "mlp128",
         "--clients", "4", "--batch-size", "20", "--lr", "0.1", "--seed", "3"]


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment Ray's worker processes inherit: tinyfed and this test module importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT),
                                         env.get("PYTHONPATH", "")])
    env.update(extra or {})
    return env


def pids_with(text: str) -> set[int]:
    """Live processes whose command line mentions `text` (a temp dir only our Ray uses)."""
    found = set()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            found.add(int(p.name))
    return found


def alive(pid: int) -> bool:
    """Running (not a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(cond, limit: float = 60.0) -> bool:
    """Poll for a condition (bounded, so nothing hangs); the caller asserts the outcome."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp_path: Path, name: str, runtime_obj=None, subscribers=(), **over):
    cfg = small_config(out=str(tmp_path / name), **over)
    run_dir = RunDir.create(cfg)
    with open(os.devnull, "w") as quiet:
        return execute(run_dir.saved_config(), run_dir, live=False, stream=quiet,
                       runtime=runtime_obj, subscribers=subscribers)


def records(result) -> list[dict]:
    return [json.loads(x) for x in result.run_dir.metrics.read_text().splitlines()]


def test_local_ray_capped_at_two_cpus_matches_inprocess_bit_for_bit(tmp_path, monkeypatch):
    assert not ray.is_initialized(), "another test left a Ray session open"
    monkeypatch.setenv("PYTHONPATH", worker_env()["PYTHONPATH"])
    common = dict(rounds=3, clients=6, fraction=0.5, deterministic=True, seed=11)
    ref = run(tmp_path, "inprocess", **common)

    cfg = small_config(runtime="ray", workers=2, **common)
    rt = RayRuntime(cfg)
    seen: dict = {}

    def observe(record):  # runs mid-run, while Ray is up
        seen.setdefault("cpus", ray.cluster_resources().get("CPU"))
        seen.setdefault("pids", pids_with(rt.temp_dir))

    res = run(tmp_path, "ray", runtime_obj=rt, subscribers=[observe], runtime="ray", workers=2,
              **common)

    a, b = load_file(ref.run_dir.model), load_file(res.run_dir.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = records(ref), records(res)
    for x, y in zip(ra, rb, strict=True):
        assert x["bytes_down"] == y["bytes_down"]
        assert x["bytes_up"] == y["bytes_up"]
        assert y["clients_succeeded"] == 3 and y["clients_failed"] == 0
    assert seen["cpus"] == 2.0
    assert rt.object_store_puts == 3  # once per round, not once per client (3 clients a round)
    # tinyfed started this Ray, so it stopped it: session closed, processes gone, temp dir gone
    assert not ray.is_initialized()
    assert seen["pids"], "found no Ray processes under the runtime's temp dir mid-run"
    assert wait_until(lambda: not any(alive(p) for p in seen["pids"]))
    assert rt.temp_dir is None


@pytest.fixture
def two_node_cluster(monkeypatch):
    """A head and a second node started with `ray start` on this machine, each with its own
    temp dir and process group; stopped by killing exactly those groups (never `ray stop`).
    Loopback only, so token authentication is off (head, node and the driver alike)."""
    assert not ray.is_initialized(), "another test left a Ray session open"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    port = free_port()
    dirs = [tempfile.mkdtemp(prefix="tfrh-"), tempfile.mkdtemp(prefix="tfrw-")]
    env = worker_env({"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"})
    common = ["--num-cpus=1", "--disable-usage-stats"]
    cmds = [
        [RAY_BIN, "start", "--head", f"--port={port}", "--include-dashboard=false",
         f"--temp-dir={dirs[0]}", "--node-ip-address=127.0.0.1", *common],
        [RAY_BIN, "start", f"--address=127.0.0.1:{port}", f"--temp-dir={dirs[1]}",
         "--node-ip-address=127.0.0.1", *common],
    ]
    groups = []
    try:
        for cmd in cmds:
            proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            groups.append(proc.pid)  # daemons it leaves behind keep this process group
            out, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
        yield f"127.0.0.1:{port}", groups
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pgid in reversed(groups):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    pass
            if wait_until(lambda: not any(group_alive(g) for g in groups), 5):
                break
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # zombies still count for killpg; a group of zombies only waits for init to reap it
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def test_run_attached_to_two_node_cluster_leaves_it_running(tmp_path, two_node_cluster):
    """A CLI run in its own process (Ray keeps per-process auth state, so a driver that already
    ran a local Ray in this test process is not a clean one)."""
    address, groups = two_node_cluster
    env = worker_env({"RAY_AUTH_MODE": "disabled"})
    base = [sys.executable, "-m", "tinyfed", "run", *SYNTH, "--rounds", "2", "--runtime", "ray",
            "--ray-address", address]
    done = subprocess.run([*base, "--workers", "2", "--out", str(tmp_path / "ok")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    recs = [json.loads(x) for x in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_succeeded"] for r in recs] == [4, 4]
    # each node offers 1 CPU and each actor takes 1: two actors means one on each node,
    # and a third does not fit
    over = subprocess.run([*base, "--workers", "3", "--out", str(tmp_path / "over")], env=env,
                          capture_output=True, text=True, timeout=300)
    last = over.stderr.strip().splitlines()[-1]
    assert over.returncode == 2 and "needs 3 CPUs; the Ray cluster has 2" in last, over.stderr
    assert all(group_alive(g) for g in groups)  # the runs only disconnected
    host, port = address.rsplit(":", 1)
    socket.create_connection((host, int(port)), timeout=5).close()


def test_address_that_does_not_answer_is_a_one_line_error(tmp_path, capsys):
    assert not ray.is_initialized(), "an open Ray session would be used instead"
    port = free_port()  # nothing listens there
    cfg = small_config(runtime="ray", ray_address=f"127.0.0.1:{port}")
    with pytest.raises(RayUnavailable, match=r"does not answer"):
        RayRuntime(cfg).connect()
    code = main(["run", "--dataset", "synthetic", "--set", "synthetic_size=600", "--clients",
                 "2", "--rounds", "1", "--runtime", "ray", "--ray-address",
                 f"127.0.0.1:{port}", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "does not answer" in err[0], err


def test_bad_address_and_missing_ray_are_clear_errors(monkeypatch):
    from tinyfed.errors import ConfigError

    with pytest.raises(ConfigError, match="ray_address"):
        small_config(ray_address="localhost")
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does when not installed
    with pytest.raises(RayUnavailable, match=r'pip install "tinyfed\[ray\]"'):
        RayRuntime(small_config(runtime="ray"))


def test_stacked_actors_match_one_by_one_and_say_so(tmp_path, monkeypatch):
    """Not deterministic, each actor trains the clients dealt to it as one stacked computation
    (mlp128 at B=20 on one thread): the same updates as one client after another, to float
    tolerance, the same bytes on the wire, and the report counts what the actors stacked."""
    assert not ray.is_initialized(), "another test left a Ray session open"
    monkeypatch.setenv("PYTHONPATH", worker_env()["PYTHONPATH"])
    alone = run(tmp_path, "alone", rounds=3, trainer="fused")
    res = run(tmp_path, "ray", rounds=3, runtime="ray", workers=2)
    assert res.trainer.stacks and res.trainer.name == "vectorized"
    assert res.trainer.reason.endswith("; 12 of 12 tasks stacked"), res.trainer.reason
    ra, rb = records(alone), records(res)
    assert [r["bytes_down"] for r in ra] == [r["bytes_down"] for r in rb]
    assert [r["bytes_up"] for r in ra] == [r["bytes_up"] for r in rb]
    for k, v in alone.state.weights.items():
        torch.testing.assert_close(res.state.weights[k], v, rtol=1e-4, atol=1e-5)
    assert not ray.is_initialized()


def test_async_actors_stack_what_is_submitted_together(tmp_path, monkeypatch):
    """Async: the first four tasks go out together (two per actor, stacked); each refill after
    a merge is one task, trained alone. Every merge lands and the report counts both."""
    assert not ray.is_initialized(), "another test left a Ray session open"
    monkeypatch.setenv("PYTHONPATH", worker_env()["PYTHONPATH"])
    res = run(tmp_path, "async", runtime="ray", workers=2, mode="async", concurrency=4,
              rounds=3)
    rounds = [r for r in records(res) if r["kind"] == "round"]
    assert res.state.round == 3
    assert sum(r["clients_succeeded"] for r in rounds) == 12
    assert not [f for r in rounds for f in r["failures"]]
    assert "4 of 12 tasks stacked, the others alone" in res.trainer.reason, res.trainer.reason


@pytest.mark.parametrize("once", [True, False], ids=["once", "every-time"])
def test_actor_lost_mid_batch_sends_its_tasks_again_one_by_one(tmp_path, monkeypatch, once):
    """Clients 0 and 2 go to one actor in one call (equal shards are dealt alternately); it dies
    (exit 3) on client 0's task before answering either. Both are sent again, each alone: a
    death that does not recur costs nothing; one that does costs client 0 alone, with the
    actor's death as its reason. The lost task frames still count in the round's bytes: two
    more than a clean round, either way."""
    from tinyfed.faults import FAULT_ENV, ONCE_ENV

    assert not ray.is_initialized(), "another test left a Ray session open"
    monkeypatch.setenv("PYTHONPATH", worker_env()["PYTHONPATH"])
    clean = records(run(tmp_path, "clean"))  # in-process: the same bytes as Ray (tested above)
    monkeypatch.setenv(FAULT_ENV, "exit:0:1")  # Ray's workers inherit the driver's environment
    if once:
        monkeypatch.setenv(ONCE_ENV, str(tmp_path))
    res = run(tmp_path, "ray", runtime="ray", workers=2)
    r1, r2 = records(res)
    one_task = clean[0]["bytes_down"] / 4  # four task frames that differ by a digit or two
    assert abs(r1["bytes_down"] - clean[0]["bytes_down"] - 2 * one_task) < 16
    if once:
        assert r1["failures"] == [] and r1["clients_succeeded"] == 4
        assert r1["bytes_up"] == clean[0]["bytes_up"]
    else:
        assert [f["client_id"] for f in r1["failures"]] == [0]
        assert "ray actor died" in r1["failures"][0]["reason"]
        assert r1["clients_succeeded"] == 3 and r1["num_examples"] == 3 * 150
    assert r2["failures"] == [] and r2["bytes_down"] == clean[1]["bytes_down"]
    assert "tasks stacked" in res.trainer.reason  # the resent tasks trained alone


def test_a_batch_past_its_deadline_fails_together(tmp_path, monkeypatch):
    """Clients 0 and 2 go to one actor in one call (equal shards are dealt alternately), which
    hangs on client 0: both fail at the deadline (a call shares one, as a process batch does),
    that actor alone is killed and replaced (client 2 is not sent again, to be killed with
    another actor), the other actor's call is merged, and the next round is whole."""
    from tinyfed.faults import FAULT_ENV

    assert not ray.is_initialized(), "another test left a Ray session open"
    monkeypatch.setenv("PYTHONPATH", worker_env()["PYTHONPATH"])
    clean = records(run(tmp_path, "clean"))
    monkeypatch.setenv(FAULT_ENV, "sleep=120:0:1")
    over = dict(runtime="ray", workers=2, round_timeout=4.0)
    rt = RayRuntime(small_config(**over))
    r1, r2 = records(run(tmp_path, "ray", runtime_obj=rt, **over))
    assert sorted(f["client_id"] for f in r1["failures"]) == [0, 2]
    assert all(f["reason"] == "deadline: no result within round_timeout=4 s (ray actor killed "
               "and replaced)" for f in r1["failures"]), r1["failures"]
    assert r1["clients_succeeded"] == 2 and r2["clients_succeeded"] == 4
    assert rt.replaced == 1 and r1["bytes_down"] == clean[0]["bytes_down"]  # nothing sent twice


@pytest.fixture(scope="module")
def shared_ray():
    """One local Ray session (2 CPUs) for the tests below; runtimes reuse it and leave it up.
    Its workers see the gate folder through the environment they inherit."""
    gate = Path(tempfile.mkdtemp(prefix="tfgate-"))
    tmp = tempfile.mkdtemp(prefix="tfrs-")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", worker_env()["PYTHONPATH"])
        mp.setenv(GATE_ENV, str(gate))
        ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=tmp,
                 log_to_driver=False)
        try:
            yield gate
        finally:
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(gate, ignore_errors=True)


def reset_gate(gate: Path) -> None:
    for f in gate.iterdir():
        f.unlink()


def busy_pids(gate: Path) -> list[int]:
    return sorted(int(f.name.split("-")[1]) for f in gate.glob("busy-*"))


def test_actor_killed_mid_round_fails_that_client_and_the_run_finishes(tmp_path, shared_ray):
    gate = shared_ray
    reset_gate(gate)
    over = dict(runtime="ray", workers=2, clients=2, rounds=2, model=GATED, min_clients=1)
    rt = RayRuntime(small_config(**over))
    killed: list[int] = []

    def killer():  # both actors are inside a forward pass: kill one, then open the gate
        try:
            if wait_until(lambda: len(busy_pids(gate)) == 2, 240):
                killed.append(busy_pids(gate)[0])
                os.kill(killed[0], signal.SIGKILL)
        finally:
            (gate / "open").touch()

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        res = run(tmp_path, "killed", runtime_obj=rt, **over)
    finally:
        thread.join()
    assert killed, "the actors never reached the gate"
    r1, r2 = records(res)
    assert (r1["clients_succeeded"], r1["clients_failed"]) == (1, 1)
    assert "ray actor died" in r1["failures"][0]["reason"]
    assert r1["bytes_down"] > 0 and r1["bytes_up"] > 0
    assert (r2["clients_succeeded"], r2["clients_failed"]) == (2, 0)  # the actor was replaced
    assert rt.replaced == 1
    assert res.state.round == 2 and ray.is_initialized()  # not ours to shut down


def test_round_deadline_fails_stragglers_and_kills_their_actors(shared_ray):
    gate = shared_ray
    reset_gate(gate)
    cfg = small_config(runtime="ray", workers=2, clients=3, model=GATED, round_timeout=600)
    exp = Experiment.build(cfg)
    rt = Dispatcher(RayRuntime(cfg), cfg.round_timeout)
    rt.start(exp)
    try:
        payload = encode_tensors(exp.initial)

        def submit(cid, rnd):
            task = ClientTask(cid, rnd, seed=cid, settings=small_settings())
            rt.submit(task, payload, Expectation(task, exp.initial, exp.spec,
                                                 exp.shard_size(cid)))

        for cid in range(3):  # two start (and block at the gate), one waits for an actor
            submit(cid, 1)
        assert wait_until(lambda: len(busy_pids(gate)) == 2, 240)
        stuck = busy_pids(gate)
        out = list(rt.results(timeout=1.0))
        assert sorted(r.client_id for r in out) == [0, 1, 2]
        assert not any(r.ok for r in out)
        reasons = sorted(r.reason for r in out)
        assert sum("no result within" in r and "actor killed" in r for r in reasons) == 2
        assert sum("not started within" in r for r in reasons) == 1
        assert rt.pending() == 0 and rt.replaced == 2
        assert wait_until(lambda: not any(alive(p) for p in stuck))  # stuck actors were killed
        (gate / "open").touch()
        for cid in range(3):
            submit(cid, 2)
        again = list(rt.results(timeout=120))
        assert sorted(r.client_id for r in again if r.ok) == [0, 1, 2]
        assert rt.object_store_puts == 1  # same payload object both times: put once
    finally:
        rt.close()


def test_a_straggler_fails_alone_while_later_tasks_run_on(shared_ray):
    """As the async loop uses it: the oldest task's deadline passes while a later one runs;
    only the straggler fails (and only its actor is replaced), the later task finishes."""
    gate = shared_ray
    reset_gate(gate)
    cfg = small_config(runtime="ray", workers=2, clients=2, model=GATED, round_timeout=4)
    exp = Experiment.build(cfg)
    rt = Dispatcher(RayRuntime(cfg), cfg.round_timeout)
    rt.start(exp)
    try:
        payload = encode_tensors(exp.initial)

        def submit(cid):
            task = ClientTask(cid, 1, seed=cid, settings=small_settings())
            rt.submit(task, payload, Expectation(task, exp.initial, exp.spec,
                                                 exp.shard_size(cid)))

        t0 = time.monotonic()
        submit(0)
        assert wait_until(lambda: len(busy_pids(gate)) == 1, 60)
        time.sleep(1.5)
        submit(1)
        assert wait_until(lambda: len(busy_pids(gate)) == 2, 60)
        out = list(rt.results(timeout=max(0.0, t0 + 4 - time.monotonic())))
        assert [(r.client_id, r.ok) for r in out] == [(0, False)]
        assert "deadline" in out[0].reason and rt.replaced == 1
        assert rt.pending() == 1  # client 1's task is still running on its own actor
        (gate / "open").touch()
        rest = list(rt.results(timeout=60))
        assert [(r.client_id, r.ok) for r in rest] == [(1, True)]
    finally:
        rt.close()


def small_settings():
    from tinyfed.client import TrainSettings

    return TrainSettings(epochs=1, batch_size=20, lr=0.1)
