"""The HTTP API fuzzed from its own /openapi.json with schemathesis, against a real uvicorn
server on 127.0.0.1: no input, with or without a token, gets a 500 or a stack trace.

Bounded: a fixed number of examples per operation, derandomized; every client has an open task
so long-polls answer at once; the event stream (which never ends while a run is live) is
checked by its own tests instead.
"""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.conftest import small_config
from tests.http_helpers import TOKENS, auth, make_task
from tinyfed import wire
from tinyfed.experiment import Experiment
from tinyfed.metrics import EventBus
from tinyfed.runtimes.dispatch import Dispatcher
from tinyfed.runtimes.http.runtime import HttpOptions, HttpRuntime


@pytest.fixture(scope="module")
def server():
    exp = Experiment.build(small_config(round_timeout=600.0))
    bus = EventBus()
    rt = Dispatcher(HttpRuntime(exp.config, HttpOptions(tokens=dict(TOKENS), announce=False,
                                                        linger=0.1), bus), exp.config.round_timeout)
    rt.start(exp)
    payload = wire.encode_tensors(exp.initial)
    for cid in TOKENS:
        task, expect = make_task(exp, cid, 1)
        rt.submit(task, payload, expect)
    bus.publish({"kind": "round", "round": 1, "test_accuracy": 0.5})
    yield rt
    rt.close()


FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def call(case, server, headers: dict[str, str]) -> int:
    headers = {**dict(case.headers or {}), **headers}
    if case.path == "/v1/task" and isinstance(case.query, dict):
        case.query["wait"] = 0  # a long-poll without an open task would wait; never 30 s here
    response = case.call(headers=headers, timeout=15)
    assert response.status_code < 500, (case.method, case.path, case.query,
                                        response.content[:200])
    assert b"Traceback" not in response.content
    return response.status_code


def test_no_input_with_or_without_a_token_gets_a_server_error(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/task", "/v1/update", "/v1/model", "/v1/metrics", "/v1/config"} <= paths
    seen: Counter[tuple[str, str, int]] = Counter()
    for op in operations:
        if op.path == "/v1/events":  # never ends while the run is live: tests of its own
            continue

        @FUZZ
        @given(case=op.as_strategy())
        def fuzz(case):
            seen[(case.method, case.path, call(case, server, auth(0)))] += 1
            seen[(case.method, case.path, call(case, server, {}))] += 1

        fuzz()
    per_path = Counter()
    for (_, path, _), n in seen.items():
        per_path[path] += n
    assert len(per_path) == len(operations) - 1
    # operations with parameters or a body get many distinct inputs (the others have one)
    assert all(per_path[p] >= 20 for p in ("/v1/task", "/v1/update", "/v1/metrics",
                                           "/v1/register")), per_path
    statuses = {status for (_, _, status) in seen}
    assert {200, 401, 422} <= statuses  # generated inputs reach the routes, not just auth
    assert not server.hub.finished and server.hub.model is not None
