"""The HTTP API against a real uvicorn server on 127.0.0.1 (random port), driven by httpx.

Every bad input is answered with its status, counted, and never becomes an accepted update.
"""

from __future__ import annotations

import json
import math
import ssl
import threading

import httpx
import pytest
import torch

from tests.conftest import small_config
from tests.http_helpers import TOKENS, auth, make_task, self_signed
from tinyfed import protocol, wire
from tinyfed.errors import ConfigError
from tinyfed.experiment import Experiment
from tinyfed.metrics import EventBus
from tinyfed.protocol import ClientWorker
from tinyfed.runtimes.dispatch import Dispatcher
from tinyfed.runtimes.http.auth import TokenBook, parse_tokens, read_tokens
from tinyfed.runtimes.http.runtime import HttpOptions, HttpRuntime
from tinyfed.wire import Kind

FRAME = {"Content-Type": "application/octet-stream"}


@pytest.fixture(scope="module")
def exp():
    return Experiment.build(small_config(max_frame_mb=1.0, round_timeout=30.0))


@pytest.fixture
def served(exp):
    bus = EventBus()
    rt = Dispatcher(HttpRuntime(exp.config, HttpOptions(tokens=dict(TOKENS), announce=False,
                                                        linger=0.2), bus), exp.config.round_timeout)
    rt.start(exp)
    with httpx.Client(base_url=rt.url, timeout=20) as http:
        yield rt, http, bus
    rt.close()


def worker(exp) -> ClientWorker:
    ds = exp.dataset
    return ClientWorker(exp.config.model, ds.input_shape, ds.num_classes, exp.shard)


def publish(rt, exp, cid, rnd):
    task, expect = make_task(exp, cid, rnd)
    rt.submit(task, wire.encode_tensors(exp.initial), expect)
    return task


def fetch(http, cid) -> bytes:
    r = http.get("/v1/task", params={"client_id": cid, "wait": 5}, headers=auth(cid))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    return r.content


def post(http, cid, body, **kw):
    return http.post("/v1/update", params={"client_id": cid}, content=body,
                     headers={**auth(cid), **FRAME, **kw.pop("headers", {})}, **kw)


def update_frame(header: dict, tensors: dict) -> bytes:
    return wire.encode_frame(Kind.UPDATE, header, wire.encode_tensors(tensors))


def test_round_trip_equals_in_process_update(served, exp):
    rt, http, _ = served
    publish(rt, exp, 1, 1)
    reply = worker(exp).handle(fetch(http, 1))
    r = post(http, 1, reply)
    assert r.status_code == 200 and r.json()["accepted"] is True
    results = list(rt.results(5))
    assert [(res.client_id, res.round, res.ok) for res in results] == [(1, 1, True)]
    task, expect = make_task(exp, 1, 1)
    local = protocol.check_update(worker(exp).handle(protocol.task_frame(
        task, wire.encode_tensors(exp.initial))), expect)
    for name, value in local.weights.items():
        assert torch.equal(value, results[0].weights[name])
    assert results[0].bytes_up == len(reply)
    assert results[0].bytes_down == len(protocol.task_frame(task, wire.encode_tensors(
        exp.initial)))


def test_health_needs_no_token_but_everything_else_does(served):
    _, http, _ = served
    assert http.get("/v1/health").json()["status"] == "ok"
    for path in ("/v1/model", "/v1/config", "/v1/metrics", "/v1/task?client_id=0"):
        r = http.get(path)
        assert r.status_code == 401 and r.json() == {"error": "missing or invalid bearer token"}
    r = http.get("/v1/config", headers={"Authorization": "Bearer not-a-token-at-all"})
    assert r.status_code == 401
    assert http.get("/v1/config", headers=auth(0)).json()["clients"] == 4


def test_token_bound_to_its_client_id(served, exp):
    rt, http, _ = served
    publish(rt, exp, 2, 1)
    r = http.get("/v1/task", params={"client_id": 2, "wait": 0}, headers=auth(3))
    assert r.status_code == 403
    frame = worker(exp).handle(fetch(http, 2))
    assert post(http, 2, frame, headers=auth(1)).status_code == 403
    assert rt.hub.counters["403"] == 2
    assert rt.pending() == 1  # the task is still open: nothing was accepted


def test_no_task_is_204_with_retry_after(served):
    _, http, _ = served
    r = http.get("/v1/task", params={"client_id": 0, "wait": 0.2}, headers=auth(0))
    assert r.status_code == 204 and r.headers["retry-after"] == "1"


@pytest.mark.parametrize("params, where", [
    ({"wait": 1}, "client_id"), ({"client_id": -1}, "client_id"),
    ({"client_id": "1.5"}, "client_id"), ({"client_id": 0, "wait": 31}, "wait"),
    ({"client_id": 0, "wait": "nan"}, "wait"), ({"client_id": 0, "wait": "soon"}, "wait")])
def test_task_and_update_routes_check_their_query(served, params, where):
    rt, http, _ = served
    for method in ("GET", "POST"):
        if method == "POST" and where == "wait":
            continue
        path = "/v1/task" if method == "GET" else "/v1/update"
        r = http.request(method, path, params=params, headers=auth(0), content=b"x")
        assert r.status_code == 422, r.text
        assert r.json()["error"].startswith(f"invalid request query.{where}")
        assert r.headers["x-tinyfed-boot"] == rt.hub.boot_id  # every response, hot or not


def test_long_poll_wakes_when_a_task_is_published(served, exp):
    rt, http, _ = served
    got = {}

    def poll():
        got["r"] = http.get("/v1/task", params={"client_id": 3, "wait": 20}, headers=auth(3))

    t = threading.Thread(target=poll)
    t.start()
    publish(rt, exp, 3, 1)
    t.join(30)
    assert got["r"].status_code == 200
    assert wire.decode_frame(got["r"].content).header["client_id"] == 3


def test_model_etag_and_304(served):
    _, http, _ = served
    r = http.get("/v1/model", headers=auth(0))
    assert r.status_code == 200
    msg = wire.decode_frame(r.content)
    assert msg.kind == Kind.MODEL and msg.header["version"] == 0
    r2 = http.get("/v1/model", headers={**auth(0), "If-None-Match": r.headers["etag"]})
    assert r2.status_code == 304 and r2.content == b""


def test_duplicate_and_late_updates_are_409_and_counted(served, exp):
    rt, http, _ = served
    publish(rt, exp, 0, 1)
    reply = worker(exp).handle(fetch(http, 0))
    assert post(http, 0, reply).status_code == 200
    r = post(http, 0, reply)
    assert r.status_code == 409 and "duplicate" in r.json()["error"]
    assert [res.ok for res in rt.results(5)] == [True]
    # a round that is over: the task expired at its deadline, the update comes after
    rt.config = rt.config.model_copy(update={"round_timeout": 0.3})
    publish(rt, exp, 0, 2)
    late = worker(exp).handle(fetch(http, 0))
    failed = list(rt.results(0.3))
    assert [f.ok for f in failed] == [False]
    assert failed[0].reason.startswith("deadline: no result within round_timeout=")
    assert failed[0].reason.endswith("(task closed: a late upload is refused with 409)")
    r = post(http, 0, late)
    assert r.status_code == 409 and "late" in r.json()["error"]
    assert rt.hub.counters["409"] == 2
    assert rt.hub.counters["duplicate"] == 1 and rt.hub.counters["late"] == 1


def test_body_over_the_limit_is_413(served, exp):
    rt, http, _ = served
    publish(rt, exp, 1, 1)
    big = b"\0" * (rt.max_body + 1)
    assert post(http, 1, big).status_code == 413

    def chunks():  # no Content-Length: the stream itself is cut off
        for _ in range(rt.max_body // 65536 + 2):
            yield b"\0" * 65536

    r = http.post("/v1/update", params={"client_id": 1}, content=chunks(),
                  headers={**auth(1), **FRAME})
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert rt.hub.counters["413"] == 2
    assert rt.pending() == 1 and rt.hub.results.empty()


def bad_updates(exp, reply: bytes) -> dict[str, bytes]:
    msg = wire.decode_frame(reply)
    h, t = msg.header, msg.tensors
    name = sorted(t)[0]
    nan = {**t, name: t[name].clone()}
    nan[name].view(-1)[0] = math.nan
    return {
        "garbage": b"this is not a frame at all, not even close...",
        "wrong shape": update_frame(h, {**t, name: t[name][:1]}),
        "NaN": update_frame(h, nan),
        "unknown tensor": update_frame(h, {**t, "extra.weight": torch.zeros(2)}),
        "count too large": update_frame({**h, "num_examples": exp.shard_size(h["client_id"]) + 1},
                                        t),
        "wrong dtype": update_frame(h, {**t, name: t[name].double()}),
    }


def test_bad_frames_are_422_counted_and_never_accepted(served, exp):
    rt, http, _ = served
    w = worker(exp)
    publish(rt, exp, 0, 1)
    cases = bad_updates(exp, w.handle(fetch(http, 0)))
    statuses = {}
    for rnd, (case, body) in enumerate(cases.items(), start=1):
        if rnd > 1:  # each admissible-looking bad frame uses up its task; give a fresh one
            publish(rt, exp, 0, rnd)
            fetch(http, 0)
            msg = wire.decode_frame(body) if case != "garbage" else None
            if msg is not None:
                body = wire.encode_frame(Kind.UPDATE, {**msg.header, "round": rnd,
                                                       "version": rnd - 1},
                                         wire.encode_tensors(msg.tensors))
        r = post(http, 0, body)
        statuses[case] = (r.status_code, r.json()["error"])
        assert "Traceback" not in r.text
    assert {c: s for c, (s, _) in statuses.items()} == {c: 422 for c in cases}
    assert "malformed frame" in statuses["garbage"][1]
    assert "shape" in statuses["wrong shape"][1]
    assert "non-finite" in statuses["NaN"][1]
    assert "unknown tensors" in statuses["unknown tensor"][1]
    assert "num_examples" in statuses["count too large"][1]
    assert rt.hub.counters["422"] == len(cases)
    results = list(rt.results(0.5))  # garbage left round 1 open; round 2 superseded it
    assert len(results) == len(cases) and not any(res.ok for res in results)
    served_model = wire.decode_frame(http.get("/v1/model", headers=auth(0)).content).tensors
    assert all(torch.equal(served_model[k], v) for k, v in exp.initial.items())
    counters = http.get("/v1/metrics", headers=auth(0)).json()["counters"]
    assert counters["422"] == len(cases)


def test_errors_are_json_without_traces(served):
    _, http, _ = served
    r = http.get("/v1/task", params={"client_id": "x"}, headers=auth(0))
    assert r.status_code == 422 and set(r.json()) == {"error"}
    r = http.get("/v1/nowhere", headers=auth(0))
    assert r.status_code == 404 and set(r.json()) == {"error"}


def test_openapi_documents_the_routes(served):
    _, http, _ = served
    paths = http.get("/openapi.json").json()["paths"]
    for path in ("/v1/health", "/v1/model", "/v1/task", "/v1/update", "/v1/metrics",
                 "/v1/events", "/v1/register", "/v1/config"):
        assert path in paths
    task = paths["/v1/task"]["get"]
    assert [p["name"] for p in task["parameters"]] == ["client_id", "wait"]
    assert {"200", "204", "401", "403", "410", "422"} <= set(task["responses"])
    assert "application/octet-stream" in paths["/v1/update"]["post"]["requestBody"]["content"]
    assert http.get("/docs").status_code == 200


def test_events_stream_history_then_live(served):
    rt, http, bus = served
    bus.publish({"kind": "round", "round": 1})
    lines = []
    with http.stream("GET", "/v1/events", params={"token": TOKENS[2]}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(json.loads(line[6:]))
                if len(lines) == 1:
                    bus.publish({"kind": "round", "round": 2})
                else:
                    break
    assert [rec["round"] for rec in lines] == [1, 2]


def test_tokens_file_errors_name_the_line(tmp_path):
    good = parse_tokens("# comment\n0 abcdefghijklmnopqrst\n\n1 ABCDEFGHIJKLMNOPQRST\n")
    assert good == {0: "abcdefghijklmnopqrst", 1: "ABCDEFGHIJKLMNOPQRST"}
    for text, where in (("0 abcdefghijklmnopqrst\nnonsense\n", ":2:"),
                        ("x abcdefghijklmnopqrst\n", ":1:"),
                        ("0 short\n", ":1:"),
                        ("0 abcdefghijklmnopqrst\n0 ABCDEFGHIJKLMNOPQRST\n", ":2:")):
        path = tmp_path / "t.txt"
        path.write_text(text)
        with pytest.raises(ConfigError, match=where):
            read_tokens(path)
    book = TokenBook(good)
    assert book.identify("Bearer abcdefghijklmnopqrst") == 0
    assert book.identify("Basic abcdefghijklmnopqrst") is None
    assert book.identify("Bearer abcdefghijklmnopqrsX") is None


def test_tokens_command_prints_fresh_pairs(capsys):
    from tinyfed.cli import main

    assert main(["tokens", "--clients", "3"]) == 0
    lines = capsys.readouterr().out.split("\n")[:-1]
    pairs = parse_tokens("\n".join(lines))
    assert sorted(pairs) == [0, 1, 2] and len(set(pairs.values())) == 3


def test_tls(exp, tmp_path):
    cert, key = self_signed(tmp_path)
    rt = Dispatcher(HttpRuntime(exp.config, HttpOptions(
        tokens=dict(TOKENS), tls_cert=str(cert), tls_key=str(key), announce=False, linger=0.1)),
        exp.config.round_timeout)
    rt.start(exp)
    try:
        assert rt.url.startswith("https://127.0.0.1:")
        trust = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=rt.url, verify=trust, timeout=10) as http:
            assert http.get("/v1/health").status_code == 200
            publish(rt, exp, 1, 1)
            reply = worker(exp).handle(fetch(http, 1))
            assert post(http, 1, reply).status_code == 200
        assert [r.ok for r in rt.results(5)] == [True]
        with httpx.Client(base_url=rt.url, timeout=10) as untrusting, \
                pytest.raises(httpx.ConnectError):
            untrusting.get("/v1/health")
        plain = rt.url.replace("https://", "http://")
        with httpx.Client(timeout=10) as http, pytest.raises(httpx.HTTPError):
            http.get(plain + "/v1/health")
    finally:
        rt.close()


def test_missing_tokens_and_half_tls_are_config_errors(exp, tmp_path):
    with pytest.raises(ConfigError, match="no token for client"):
        HttpRuntime(exp.config, HttpOptions(tokens={0: TOKENS[0]}, announce=False)).start(exp)
    with pytest.raises(ConfigError, match="go together"):
        HttpRuntime(exp.config, HttpOptions(tokens=dict(TOKENS), tls_cert="x.pem",
                                            announce=False)).start(exp)


def test_dashboard_mounted_on_request(exp):
    rt = HttpRuntime(exp.config, HttpOptions(tokens=dict(TOKENS), announce=False, linger=0.1,
                                             dashboard=True), EventBus())
    rt.start(exp)
    try:
        with httpx.Client(base_url=rt.url, timeout=10) as http:
            assert http.get("/dashboard").status_code in (200, 307)
            assert http.get("/dashboard/", follow_redirects=True).status_code == 200
    finally:
        rt.close()
