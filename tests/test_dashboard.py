"""The dashboard's event log, SSE stream, run-folder tailing and HTTP routes (no browser)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.conftest import small_config
from tinyfed.dashboard import Dashboard, create_app, mount, serve_in_thread
from tinyfed.dashboard.estimate import payload_bytes
from tinyfed.dashboard.hub import Hub, format_sse
from tinyfed.dashboard.sources import RunWatch
from tinyfed.dashboard.stream import event_stream
from tinyfed.metrics import EventBus


def rec(n: int, **extra) -> dict:
    return {"kind": "round", "round": n, "test_accuracy": 0.1 * n, "bytes_down": 100 * n, **extra}


def parse_sse(text: str) -> list[dict]:
    """SSE text -> [{"id", "event", "data"}] (comments and retry lines dropped)."""
    out = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines()
                      if ": " in line and not line.startswith(":"))
        if "event" in fields:
            out.append({"id": fields.get("id"), "event": fields["event"],
                        "data": json.loads(fields["data"])})
    return out


async def take(gen, count: int) -> str:
    """The first `count` SSE messages (blank-line separated chunks) of a stream."""
    chunks = []
    while len(chunks) < count:
        chunks.append(await gen.__anext__())
    return "".join(chunks)


def test_format_sse_is_one_event_with_single_line_json():
    text = format_sse("record", {"a": 1, "s": "x\ny"}, "b00t:7")
    assert text == 'id: b00t:7\nevent: record\ndata: {"a":1,"s":"x\\ny"}\n\n'
    assert format_sse("hello", [1]) == "event: hello\ndata: [1]\n\n"
    with pytest.raises(ValueError):
        format_sse("record", {"x": float("nan")})


def test_stream_sends_history_then_live_events_with_ids():
    hub = Hub()
    run = hub.add_run("a")
    hub.add_record(run, rec(1))
    hub.add_record(run, rec(2))

    async def scenario():
        gen = event_stream(hub, None, poll=0.01)
        head = parse_sse(await take(gen, 5))  # retry, hello, meta, record 1, record 2
        threading.Thread(target=hub.add_record, args=(run, rec(3))).start()
        live = parse_sse(await take(gen, 1))
        await gen.aclose()
        return head, live

    head, live = asyncio.run(scenario())
    assert [e["event"] for e in head] == ["hello", "meta", "record", "record"]
    assert head[0]["data"] == {"boot": hub.boot, "resumed": False}
    assert [e["id"] for e in head[1:]] == [f"{hub.boot}:0", f"{hub.boot}:1", f"{hub.boot}:2"]
    assert [e["data"]["record"] for e in head[2:]] == [rec(1), rec(2)]
    assert [e["data"]["seq"] for e in head[2:]] == [0, 1]
    assert live == [{"id": f"{hub.boot}:3", "event": "record",
                     "data": {"type": "record", "run": 0, "seq": 2, "record": rec(3)}}]


def test_resume_position_continues_only_on_the_same_server():
    hub = Hub()
    run = hub.add_run("a")
    for n in range(1, 4):
        hub.add_record(run, rec(n))  # events 0 (meta), 1, 2, 3
    assert hub.resume_position(None) == 0
    assert hub.resume_position(f"{hub.boot}:1") == 2
    assert hub.resume_position(f"{hub.boot}:3") == 4
    assert hub.resume_position(f"{hub.boot}:99") == 4
    assert hub.resume_position("otherboot:1") == 0  # a restarted server: full replay
    assert hub.resume_position(f"{hub.boot}:x") == 0


def test_reconnect_with_last_event_id_resumes_without_repeating():
    hub = Hub()
    run = hub.add_run("a")
    for n in range(1, 4):
        hub.add_record(run, rec(n))

    async def scenario(last):
        gen = event_stream(hub, last, poll=0.01)
        text = await take(gen, 2 + len(hub) - hub.resume_position(last))
        await gen.aclose()
        return parse_sse(text)

    resumed = asyncio.run(scenario(f"{hub.boot}:2"))
    assert resumed[0]["data"] == {"boot": hub.boot, "resumed": True}
    assert [e["data"]["record"]["round"] for e in resumed[1:]] == [3]
    replay = asyncio.run(scenario("someoneelse:2"))
    assert replay[0]["data"]["resumed"] is False
    assert [e["data"]["record"]["round"] for e in replay[1:] if e["event"] == "record"] == [1, 2, 3]


def test_stream_ends_when_the_hub_closes():
    hub = Hub()

    async def scenario():
        chunks = []
        async for chunk in event_stream(hub, None, poll=0.01):
            chunks.append(chunk)
            hub.closed = True
        return chunks

    assert len(asyncio.run(scenario())) == 2  # retry and hello, then the loop ends


def write_lines(path: Path, lines: list[str], mode: str = "a") -> None:
    with path.open(mode, encoding="utf-8") as fh:
        fh.write("".join(lines))


def test_folder_watch_tails_appends_skips_bad_lines_and_resets_on_rewrite(tmp_path):
    logged: list[str] = []
    hub = Hub()
    metrics = tmp_path / "metrics.jsonl"
    write_lines(metrics, [json.dumps(rec(1)) + "\n", json.dumps(rec(2)) + "\n"])
    watch = RunWatch(hub, "r", tmp_path, log=logged.append)
    watch.poll()
    assert [r["round"] for r in hub.snapshot()["runs"][0]["records"]] == [1, 2]
    # A half-written line waits for its newline; bad lines are reported, the rest still shown.
    line3 = json.dumps(rec(3))
    write_lines(metrics, ["not json\n", "[1, 2]\n", '{"x": NaN}\n', line3[:10]])
    watch.poll()
    write_lines(metrics, [line3[10:] + "\n", "\n", json.dumps(rec(4)) + "\n"])
    watch.poll()
    snap = hub.snapshot()["runs"][0]
    assert [r["round"] for r in snap["records"]] == [1, 2, 3, 4]
    assert snap["records"][2] == rec(3)
    assert snap["problems"] == [
        f"{metrics}:3: not valid JSON (Expecting value)",
        f"{metrics}:4: a record must be a JSON object",
        f"{metrics}:5: contains NaN or Infinity, which a record never holds",
    ]
    assert logged == [f"skipped {p}" for p in snap["problems"]]
    # A resume rewrites the file (os.replace): the page drops its records and re-reads.
    tmp = tmp_path / "metrics.jsonl.tmp"
    write_lines(tmp, [json.dumps(rec(1, again=True)) + "\n"], "w")
    os.replace(tmp, metrics)
    watch.poll()
    events = hub.since(0)
    assert events[-2] == {"type": "reset", "run": 0}
    assert events[-1] == {"type": "record", "run": 0, "seq": 0, "record": rec(1, again=True)}
    assert hub.snapshot()["runs"][0]["records"] == [rec(1, again=True)]


def test_folder_watch_explains_missing_folders_and_files_then_clears(tmp_path):
    logged: list[str] = []
    hub = Hub()
    folder = tmp_path / "later"
    watch = RunWatch(hub, "later", folder, log=logged.append)
    watch.poll()
    notice = hub.runs()[0]["notice"]
    assert notice == f"run folder {str(folder)!r} does not exist; waiting for it to appear"
    folder.mkdir()
    watch.poll()
    assert "not a tinyfed run folder (no config.toml, no metrics.jsonl)" in hub.runs()[0]["notice"]
    config = small_config(clients=5, fraction=0.4)
    (folder / "config.toml").write_text(config.to_toml())
    watch.poll()
    info = hub.runs()[0]
    assert "has no metrics.jsonl yet" in info["notice"]
    assert info["config"]["clients"] == 5 and info["clients_per_round"] == 2
    assert info["payload_bytes"] == payload_bytes(config)
    (folder / "metrics.jsonl").write_text(json.dumps(rec(1)) + "\n")
    watch.poll()
    assert hub.runs()[0]["notice"] is None
    assert len(logged) == 3  # each notice printed once, not on every poll
    watch.poll()
    assert len(logged) == 3


def test_payload_bytes_is_the_encoded_initial_model():
    from tinyfed.experiment import Experiment
    from tinyfed.wire import encode_tensors

    config = small_config()
    assert payload_bytes(config) == len(encode_tensors(Experiment.build(config).initial))
    # mlp128 on 1x28x28, 10 classes: (784*128 + 128 + 128*10 + 10) float32 values plus header
    assert payload_bytes(config) > 4 * (784 * 128 + 128 + 1280 + 10)


def test_bus_watch_sends_resumed_history_and_live_records_once(tmp_path):
    bus = EventBus()
    bus.preload([rec(1), rec(2)])  # what execute() does on resume, without publishing
    hub = Hub()
    watch = RunWatch(hub, "live", tmp_path, bus=bus, config=small_config())
    bus.publish(rec(3))
    watch.poll()
    bus.publish(rec(4))
    snap = hub.snapshot()["runs"][0]
    assert [r["round"] for r in snap["records"]] == [1, 2, 3, 4]
    assert snap["notice"] is None and snap["config"]["model"] == "mlp128"
    watch.close()
    bus.publish(rec(5))
    assert len(hub.snapshot()["runs"][0]["records"]) == 4


def test_progress_inside_a_round_reaches_the_stream_latest_only_and_never_the_log(tmp_path):
    bus = EventBus()
    hub = Hub()
    watch = RunWatch(hub, "live", tmp_path, bus=bus, config=small_config())
    bus.publish(rec(1, wall_seconds=2.0))
    logged = len(hub)
    for done in (1, 2):  # round 2: 2 s per client so far, 4 planned, 3 rounds in the run
        bus.notify({"kind": "progress", "round": 2, "done": done, "planned": 4, "failed": 0,
                    "bytes": 1500 * done, "seconds": 2.0 * done, "rounds": 3,
                    "elapsed_seconds": 2.0 + 2.0 * done})
    assert len(hub) == logged  # transient: the replayable log did not grow

    async def scenario():
        gen = event_stream(hub, None, poll=0.01)
        return parse_sse(await take(gen, 2 + logged + 1))

    events = asyncio.run(scenario())
    progress = [e for e in events if e["event"] == "progress"]
    assert len(progress) == 1 and progress[0]["id"] is None  # the latest only, no id
    # round ETA = 4 s elapsed × 2 clients to come / 2 done; run ETA adds 1 round × 2 s mean
    assert progress[0]["data"]["text"] == (
        "round 2: 2/4 clients · 3.00 kB so far · round ETA 4 s · run ETA 6 s")
    watch.close()
    bus.notify({"kind": "progress", "round": 3, "done": 1, "planned": 4, "failed": 0,
                "bytes": 1, "seconds": 1.0, "rounds": 3, "elapsed_seconds": 9.0})
    assert hub.progress_since(0)[1][0]["round"] == 2  # a closed watch hears nothing more


def test_http_routes_serve_page_static_files_and_event_stream(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rec(1)) + "\nbroken\n")
    dash = Dashboard(log=lambda m: None, poll_seconds=0.05)
    dash.add_folder(tmp_path, name="one")
    handle = serve_in_thread(create_app(dash.start()), "127.0.0.1", 0)
    try:
        with httpx.Client(base_url=handle.url, timeout=10) as http:
            page = http.get("/")
            assert page.status_code == 200 and 'src="static/dashboard.js"' in page.text
            js = http.get("/static/uPlot.iife.min.js")
            assert js.headers["content-type"].startswith("text/javascript")
            assert len(js.content) > 10_000
            assert http.get("/static/..%2Fapp.py").status_code == 404
            assert http.get("/static/nothing.js").status_code == 404
            assert http.get("/api/state").json()["runs"][0]["problems"] == [
                f"{tmp_path / 'metrics.jsonl'}:2: not valid JSON (Expecting value)"]
            with http.stream("GET", "/events") as resp:
                assert resp.headers["content-type"].startswith("text/event-stream")
                text = ""
                for chunk in resp.iter_text():
                    text += chunk
                    if text.count("event: ") >= 4:
                        break
            events = parse_sse(text)
            assert [e["event"] for e in events] == ["hello", "meta", "record", "problem"]
            assert events[2]["data"]["record"] == rec(1)
    finally:
        dash.close()
        handle.stop()
    assert not handle.thread.is_alive()


def test_mount_serves_the_page_under_a_prefix(tmp_path):
    app = FastAPI()
    dash = mount(app, Dashboard(log=lambda m: None), "/dashboard")
    dash.add_folder(tmp_path)
    try:
        client = TestClient(app)
        bare = client.get("/dashboard", follow_redirects=False)
        assert bare.status_code == 307 and bare.headers["location"].endswith("/dashboard/")
        assert "tinyfed dashboard" in client.get("/dashboard/").text
        assert client.get("/dashboard/static/dashboard.css").status_code == 200
        assert client.get("/dashboard/api/state").json()["runs"][0]["name"] == tmp_path.name
    finally:
        dash.close()


def test_busy_port_is_a_clear_error():
    from tinyfed.dashboard.serve import bind
    from tinyfed.errors import ConfigError

    sock = bind("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}: cannot listen"):
            bind("127.0.0.1", port)
    finally:
        sock.close()
