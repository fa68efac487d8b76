"""Hostile connections against a real uvicorn server on 127.0.0.1: honest clients keep
completing their updates while an attacker holds connections, trickles bodies, floods chunks or
opens event streams. Every loop here is bounded in count and time and stops by itself."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from tests.conftest import small_config
from tests.http_helpers import TOKENS, auth, make_task
from tinyfed import wire
from tinyfed.experiment import Experiment
from tinyfed.metrics import EventBus
from tinyfed.protocol import ClientWorker
from tinyfed.runtimes.dispatch import Dispatcher
from tinyfed.runtimes.http import app as app_module
from tinyfed.runtimes.http import conn, hot, hub
from tinyfed.runtimes.http.runtime import HttpOptions, HttpRuntime
from tinyfed.wire import Kind

FRAME = {"Content-Type": "application/octet-stream"}


@pytest.fixture(scope="module")
def exp():
    return Experiment.build(small_config(round_timeout=60.0))


@pytest.fixture
def served(exp, monkeypatch):
    monkeypatch.setattr(conn, "HEADER_TIMEOUT", 1.0)
    monkeypatch.setattr(hot, "BODY_TIMEOUT", 1.0)
    monkeypatch.setattr(app_module, "MAX_SUBSCRIBERS", 4)
    bus = EventBus()
    rt = Dispatcher(HttpRuntime(exp.config, HttpOptions(tokens=dict(TOKENS), announce=False,
                                                        linger=0.2), bus), exp.config.round_timeout)
    rt.start(exp)
    with httpx.Client(base_url=rt.url, timeout=20) as http:
        yield rt, http, bus
    rt.close()


def address(rt) -> tuple[str, int]:
    host, port = rt.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def honest_update(rt, http, exp, cid: int, rnd: int) -> httpx.Response:
    task, expect = make_task(exp, cid, rnd)
    rt.submit(task, wire.encode_tensors(exp.initial), expect)
    r = http.get("/v1/task", params={"client_id": cid, "wait": 5}, headers=auth(cid))
    assert r.status_code == 200
    ds = exp.dataset
    reply = ClientWorker(exp.config.model, ds.input_shape, ds.num_classes,
                         exp.shard).handle(r.content)
    return http.post("/v1/update", params={"client_id": cid}, content=reply,
                     headers={**auth(cid), **FRAME})


def slow_post(rt, cid: int, declared: int) -> socket.socket:
    """A POST that announces `declared` body bytes and sends ten."""
    sock = socket.create_connection(address(rt), timeout=10)
    sock.sendall(f"POST /v1/update?client_id={cid} HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: Bearer {TOKENS[cid]}\r\nContent-Type: application/octet-stream"
                 f"\r\nContent-Length: {declared}\r\n\r\n".encode() + b"0123456789")
    return sock


def status_of(sock: socket.socket) -> int | None:
    """The status of the response on `sock`, or None if it closed without one."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        data += chunk
    return int(data.split(b" ", 2)[1])


def test_stalled_uploads_hold_no_slot_and_time_out(served, exp):
    rt, http, _ = served
    attackers = [slow_post(rt, 3, 100_000) for _ in range(8)]
    try:
        # one client has at most 2 uploads in progress: the other six are refused at once
        refused = [s for s in attackers[2:] if status_of(s) == 429]
        assert len(refused) == 6
        for rnd, cid in enumerate((0, 1, 2), start=1):  # honest clients are served meanwhile
            r = honest_update(rt, http, exp, cid, rnd)
            assert r.status_code == 200 and r.json()["accepted"] is True
        assert http.get("/v1/health", timeout=5).json()["status"] == "ok"
        # the two stalled bodies end with 408 once BODY_TIMEOUT passed
        assert [status_of(s) for s in attackers[:2]] == [408, 408]
        assert rt.hub.counters["408"] == 2 and rt.hub.counters["429"] == 6
    finally:
        for s in attackers:
            s.close()


def test_chunked_flood_is_refused_at_an_update_size(served, exp):
    rt, http, _ = served
    limit = rt.hub.max_update
    assert limit < 8 << 20  # the small test model: far below the 256 MB frame cap
    sock = socket.create_connection(address(rt), timeout=10)
    sock.sendall(f"POST /v1/update?client_id=2 HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: Bearer {TOKENS[2]}\r\nTransfer-Encoding: chunked\r\n"
                 f"Content-Type: application/octet-stream\r\n\r\n".encode())
    chunk = b"%x\r\n" % (64 << 10) + b"x" * (64 << 10) + b"\r\n"
    sent = 0
    try:
        for _ in range(4 * limit // (64 << 10)):  # bounded: at most 4× the limit
            sock.sendall(chunk)
            sent += 64 << 10
    except OSError:  # the server answered and closed: the rest is refused unread
        pass
    assert status_of(sock) == 413
    sock.close()
    assert rt.hub.counters["413"] == 1
    r = honest_update(rt, http, exp, 2, 1)
    assert r.status_code == 200


def test_idle_and_half_open_connections_are_closed(served, exp):
    rt, http, _ = served
    idle = socket.create_connection(address(rt), timeout=10)
    half = socket.create_connection(address(rt), timeout=10)
    half.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    try:
        assert http.get("/v1/health").status_code == 200
        start = time.monotonic()
        assert idle.recv(1) == b"" and half.recv(1) == b""  # closed by the server
        assert time.monotonic() - start < 9  # well before the socket's own 10 s timeout
    finally:
        idle.close()
        half.close()


def test_event_stream_subscribers_are_bounded(served):
    rt, http, bus = served
    for n in range(50):
        bus.publish({"kind": "round", "round": n + 1})
    clients = [httpx.Client(base_url=rt.url, timeout=10) for _ in range(6)]
    streams, statuses = [], []
    try:
        for c in clients:
            s = c.stream("GET", "/v1/events", params={"token": TOKENS[0]})
            r = s.__enter__()
            streams.append(s)
            statuses.append(r.status_code)
        assert statuses == [200] * 4 + [503] * 2
        assert http.get("/v1/health", timeout=5).status_code == 200
        page = http.get("/v1/metrics", params={"since": 45, "limit": 3},
                        headers=auth(0)).json()
        assert [r["round"] for r in page["records"]] == [46, 47, 48]
        assert page["next"] == 48
    finally:
        for s in streams:
            s.__exit__(None, None, None)
        for c in clients:
            c.close()
    # closed streams free their places (the server notices a gone reader within a second)
    for _ in range(50):  # bounded wait, not a timed assertion
        with http.stream("GET", "/v1/events", params={"token": TOKENS[0]}) as r:
            if r.status_code == 200:
                break
        time.sleep(0.1)
    assert r.status_code == 200


def test_a_poisoned_metric_is_422_naming_it(served, exp):
    rt, http, _ = served
    task, expect = make_task(exp, 1, 1)
    rt.submit(task, wire.encode_tensors(exp.initial), expect)
    r = http.get("/v1/task", params={"client_id": 1, "wait": 5}, headers=auth(1))
    ds = exp.dataset
    reply = ClientWorker(exp.config.model, ds.input_shape, ds.num_classes,
                         exp.shard).handle(r.content)
    msg = wire.decode_frame(reply)
    bad = wire.encode_frame(Kind.UPDATE, {**msg.header, "metrics": {"train_loss": 1e300}},
                            wire.encode_tensors(msg.tensors))
    r = http.post("/v1/update", params={"client_id": 1}, content=bad,
                  headers={**auth(1), **FRAME})
    assert r.status_code == 422 and "train_loss" in r.json()["error"]
    results = list(rt.results(1))
    assert len(results) == 1 and not results[0].ok and "train_loss" in results[0].reason


def test_a_retry_after_a_server_fault_is_accepted(served, exp, monkeypatch):
    rt, http, _ = served
    real = hub.check_update
    calls = []

    def flaky(frame, expect):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk hiccup")
        return real(frame, expect)

    monkeypatch.setattr(hub, "check_update", flaky)
    task, expect = make_task(exp, 0, 1)
    rt.submit(task, wire.encode_tensors(exp.initial), expect)
    r = http.get("/v1/task", params={"client_id": 0, "wait": 5}, headers=auth(0))
    ds = exp.dataset
    reply = ClientWorker(exp.config.model, ds.input_shape, ds.num_classes,
                         exp.shard).handle(r.content)
    first = http.post("/v1/update", params={"client_id": 0}, content=reply,
                      headers={**auth(0), **FRAME})
    assert first.status_code == 500 and "Traceback" not in first.text
    again = http.post("/v1/update", params={"client_id": 0}, content=reply,
                      headers={**auth(0), **FRAME})
    assert again.status_code == 200 and again.json()["accepted"] is True
    results = list(rt.results(1))
    assert [res.ok for res in results] == [True]


def test_health_stays_up_while_many_connections_are_held(served, exp):
    rt, http, _ = served
    held = []
    stop = threading.Event()
    try:
        for _ in range(64):  # bounded: 64 idle connections to loopback
            held.append(socket.create_connection(address(rt), timeout=10))
        assert http.get("/v1/health", timeout=5).status_code == 200
        r = honest_update(rt, http, exp, 1, 1)
        assert r.status_code == 200
    finally:
        stop.set()
        for s in held:
            s.close()
