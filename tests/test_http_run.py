"""Whole runs over HTTP with real processes: `tinyfed serve`, `tinyfed client`, and
`--runtime http`; kills are real SIGKILLs to real pids, and every process is reaped."""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest
from safetensors.torch import load_file

from tests.conftest import small_config
from tests.http_helpers import Procs, wait_for
from tinyfed.runner import execute, open_run
from tinyfed.runtimes.http.auth import new_tokens, write_tokens


def records(folder):
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rounds(folder):
    return [r for r in records(folder) if r.get("kind", "round") == "round"]


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.kill_all()


def run_with(runtime: str, out, **over):
    cfg = small_config(out=str(out), runtime=runtime, deterministic=True, **over)
    run_dir, cfg = open_run(cfg, None, {})
    return execute(cfg, run_dir, live=False, stream=open(os.devnull, "w"))


def test_http_sync_deterministic_is_bit_identical_to_in_process(tmp_path):
    a = run_with("inprocess", tmp_path / "a")
    b = run_with("http", tmp_path / "b", workers=2)
    wa, wb = load_file(str(tmp_path / "a/model.safetensors")), load_file(
        str(tmp_path / "b/model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all((wa[k] == wb[k]).all() and wa[k].dtype == wb[k].dtype for k in wa)
    assert [r["clients_succeeded"] for r in b.state.records] == [4, 4]
    assert a.state.cum_bytes_down == b.state.cum_bytes_down
    assert a.state.cum_bytes_up == b.state.cum_bytes_up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_args(out, tokens, port, *extra):
    return ["serve", "--dataset", "synthetic", "--set", "synthetic_size=600", "--model",
            "mlp128", "--clients", "4", "--batch-size", "20", "--lr", "0.1", "--seed", "3",
            "--deterministic", "--plain", "--port", str(port), "--tokens", str(tokens),
            "--out", str(out), *extra]


def client_args(url, tokens, ids, *extra):
    return ["client", "--server", url, "--tokens", str(tokens), "--client-ids", ids,
            "--backoff", "0.1", *extra]


def test_server_killed_mid_run_resumes_and_clients_carry_on(tmp_path, procs):
    tokens = tmp_path / "tokens.txt"
    write_tokens(tokens, new_tokens(range(4)))
    out, port = tmp_path / "run", free_port()
    url = f"http://127.0.0.1:{port}"
    server = procs.start(*serve_args(out, tokens, port, "--rounds", "4"), log=tmp_path / "s1.log")
    wait_for(lambda: "serving on" in (tmp_path / "s1.log").read_text(), what="the server")
    for ids in ("0,1", "2,3"):
        procs.start(*client_args(url, tokens, ids, "--delay", "0.3", "--retries", "50"),
                    log=tmp_path / f"c{ids}.log")
    wait_for(lambda: len(rounds(out)) >= 2 or server.poll() is not None, what="two rounds")
    os.kill(server.pid, signal.SIGKILL)
    server.wait()
    done = len(rounds(out))
    assert 2 <= done < 4
    server2 = procs.start("serve", "--resume", str(out), "--port", str(port), "--tokens",
                          str(tokens), "--plain", log=tmp_path / "s2.log")
    assert wait_for(lambda: server2.poll() is not None, what="the resumed run") is not None
    assert server2.returncode == 0, (tmp_path / "s2.log").read_text()[-2000:]
    assert [r["round"] for r in rounds(out)] == [1, 2, 3, 4]
    for client in procs.procs[1:3]:  # clients hear "run over" and exit by themselves
        assert wait_for(lambda c=client: c.poll() is not None, what="client exit") is not None
        assert client.returncode == 0
    ref = run_with("inprocess", tmp_path / "ref", rounds=4)
    got = load_file(str(out / "model.safetensors"))
    want = load_file(str(tmp_path / "ref/model.safetensors"))
    assert all((got[k] == want[k]).all() for k in want)
    assert ref.state.round == 4


def test_client_killed_mid_round_is_dropped_at_the_deadline(tmp_path, procs):
    tokens = tmp_path / "tokens.txt"
    write_tokens(tokens, new_tokens(range(4)))
    out, port = tmp_path / "run", free_port()
    url = f"http://127.0.0.1:{port}"
    server = procs.start(*serve_args(out, tokens, port, "--rounds", "2", "--round-timeout", "8",
                                    "--wait-clients", "4"),
                         log=tmp_path / "s.log")
    wait_for(lambda: "serving on" in (tmp_path / "s.log").read_text(), what="the server")
    procs.start(*client_args(url, tokens, "0,1"), log=tmp_path / "a.log")
    slow_log = tmp_path / "b.log"
    slow = procs.start(*client_args(url, tokens, "2,3", "--delay", "60"), log=slow_log)
    wait_for(lambda: "trained round" in slow_log.read_text(), what="the slow client training")
    os.kill(slow.pid, signal.SIGKILL)
    slow.wait()
    wait_for(lambda: server.poll() is not None, what="the run to end")
    assert server.returncode == 0
    recs = rounds(out)
    assert [r["round"] for r in recs] == [1, 2]
    assert [r["clients_succeeded"] for r in recs] == [2, 2]  # the two live clients' updates
    for r in recs:  # the dead client's ids fail at the deadline in every round, counted
        assert {2, 3} <= {f["client_id"] for f in r["failures"]}
        assert r["clients_failed"] == len(r["failures"]) >= 2
    assert all("deadline" in f["reason"] for r in recs for f in r["failures"])


def test_async_run_over_http_merges_every_update(tmp_path):
    res = run_with("http", tmp_path / "async", workers=2, mode="async", async_rule="fedasync",
                   rounds=2)
    recs = res.history
    updates = [r for r in recs if r.get("kind") == "update"]
    assert [r["round"] for r in recs if r.get("kind", "round") == "round"] == [1, 2]
    assert len(updates) == 2 * 4 and [u["update"] for u in updates] == list(range(1, 9))
    assert res.stop_reason == "all updates merged"
