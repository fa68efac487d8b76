"""The two routes every update crosses, `GET /v1/task` and `POST /v1/update`, served straight
from ASGI in front of the FastAPI app.

FastAPI's routing, parameter solving and middleware stack (each layer wraps every message
sent and received) cost more than an update's own handling: on this project's 2-core machine
they were a third of the event loop's time under load (bench/bench_http_load.py). The rules
are the API's: bearer token bound to a client id (401/403), query parameters checked (422),
body limit (413), frames judged by the hub (409/422), every error `{"error": ...}` and never a
stack trace. The OpenAPI document describes both routes (`OPENAPI`); every other route is
FastAPI's.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from tinyfed.runtimes.http.auth import TokenBook
from tinyfed.runtimes.http.hub import Hub, Verdict

FRAME = "application/octet-stream"
MAX_WAIT = 30.0  # longest long-poll a client may ask for, seconds
PER_CLIENT_UPLOADS = 2  # one client's uploads in progress at once (a retry may overlap)
BODY_TIMEOUT = 30.0  # seconds a whole update body may take to arrive before 408


class ApiError(Exception):
    """An HTTP error answered as `{"error": message}` with `status` and extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def identify(tokens: TokenBook, hub: Hub, authorization: str | None,
             token: str | None = None) -> int:
    """The client id (or viewer) a bearer token stands for; 401 without a known one."""
    who = tokens.identify(authorization)
    if who is None and token:
        who = tokens.identify(f"Bearer {token}")
    if who is None:
        hub.count(401)
        raise ApiError(401, "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})
    return who


def as_client(tokens: TokenBook, hub: Hub, authorization: str | None, client_id: int) -> None:
    """403 unless the token is the one of `client_id`."""
    if identify(tokens, hub, authorization) != client_id:
        hub.count(403)
        raise ApiError(403, f"this token is not allowed to act as client {client_id}")


Reply = tuple[int, dict[str, str], tuple[bytes, ...]]


def json_reply(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Reply:
    data = json.dumps(body, separators=(",", ":")).encode()
    return status, {"content-type": "application/json", **(headers or {})}, (data,)


class HotRoutes:
    """ASGI app: the two hot routes itself, everything else passed to `app`."""

    def __init__(self, app: ASGIApp, hub: Hub, tokens: TokenBook, max_body: int,
                 uploads: asyncio.Semaphore, checkers: Executor,
                 stamp: tuple[str, str]) -> None:
        self.app, self.hub, self.tokens, self.max_body = app, hub, tokens, max_body
        self.uploads, self.checkers = uploads, checkers
        self.busy: Counter[int] = Counter()  # uploads in progress per client id
        self.stamp = (stamp[0].lower().encode("latin-1"), stamp[1].encode("latin-1"))
        self.routes: dict[tuple[str, str], Callable[[Scope, Receive], Awaitable[Reply]]] = {
            ("GET", "/v1/task"): self.task, ("POST", "/v1/update"): self.update}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get((scope.get("method", ""), scope.get("path", ""))) \
            if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        try:
            status, headers, parts = await route(scope, receive)
        except ApiError as exc:
            status, headers, parts = json_reply(exc.status, {"error": exc.message}, exc.headers)
        except Exception:  # noqa: BLE001 - never a stack trace on the wire
            status, headers, parts = json_reply(500, {"error": "internal server error"})
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        raw += [(b"content-length", str(sum(map(len, parts))).encode()), self.stamp]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        last = len(parts) - 1
        for i, part in enumerate(parts or (b"",)):
            await send({"type": "http.response.body", "body": part, "more_body": i < last})

    # ---- the routes ---------------------------------------------------------------------
    async def task(self, scope: Scope, receive: Receive) -> Reply:
        """Long-poll this client's next TASK frame (204 + Retry-After when none, 410 at the
        end)."""
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        client_id = query_int(query, "client_id")
        wait = query_float(query, "wait", 20.0, 0.0, MAX_WAIT)
        as_client(self.tokens, self.hub, header(scope, b"authorization"), client_id)
        self.hub.register(client_id)
        parts = await self.hub.wait_task(client_id, wait)
        if parts is not None:
            return 200, {"content-type": FRAME}, parts
        if self.hub.finished:
            self.hub.farewell(client_id)
            raise ApiError(410, "the run is over")
        return 204, {"retry-after": "1"}, ()

    async def update(self, scope: Scope, receive: Receive) -> Reply:
        """Admit an UPDATE or FAILURE frame for this client's open task."""
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        client_id = query_int(query, "client_id")
        as_client(self.tokens, self.hub, header(scope, b"authorization"), client_id)
        if self.busy[client_id] >= PER_CLIENT_UPLOADS:
            self.hub.count(429)
            raise ApiError(429, f"client {client_id} already has {PER_CLIENT_UPLOADS} uploads "
                                "in progress", {"Retry-After": "1"})
        self.busy[client_id] += 1
        try:
            body = await self.read_body(scope, receive)
            async with self.uploads:  # a slot only to check a whole body, never to wait for one
                try:
                    result = await asyncio.get_running_loop().run_in_executor(
                        self.checkers, self.hub.accept, client_id, body)
                except Verdict as v:
                    raise ApiError(v.status, v.reason) from None
        finally:
            self.busy[client_id] -= 1
            if not self.busy[client_id]:
                del self.busy[client_id]
        return json_reply(200, {"accepted": result.ok, "client_id": client_id,
                                "round": result.round, "reason": result.reason or None})

    async def read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The body, refusing (413) anything over an update's size before or while reading it
        (chunked bodies are counted as they arrive), and (408) one that does not arrive in time:
        a stalled or trickled upload holds no check slot and ends at BODY_TIMEOUT."""
        limit = min(self.max_body, self.hub.max_update)
        declared = header(scope, b"content-length")
        if declared is not None:
            if not (declared.isascii() and declared.isdigit() and len(declared) <= 19):
                raise ApiError(400, "invalid Content-Length")
            if int(declared) > limit:
                self.hub.count(413)
                raise ApiError(413, f"body of {declared} bytes exceeds the limit of {limit} bytes")
        try:
            return await bounded_time(self.collect(receive, limit), BODY_TIMEOUT)
        except TimeoutError:
            self.hub.count(408)
            raise ApiError(408, f"the body did not arrive within {BODY_TIMEOUT:g} s") from None

    async def collect(self, receive: Receive, limit: int) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ApiError(400, "the client went away before sending its whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                self.hub.count(413)
                raise ApiError(413, f"body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


async def bounded_time(awaitable, seconds: float):
    """`awaitable`, or TimeoutError after `seconds`: one timer per body, not one per chunk
    (`asyncio.timeout` where there is one, 3.11+; `wait_for` before)."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await awaitable
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except asyncio.TimeoutError:
        raise TimeoutError from None


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def query_int(query: dict[str, list[str]], name: str) -> int:
    """A required integer ≥ 0 from the query string (422 naming it otherwise)."""
    values = query.get(name)
    if not values:
        raise ApiError(422, f"invalid request query.{name}: field required")
    text = values[-1].strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 10):
        raise ApiError(422, f"invalid request query.{name}: an integer in [0, 9999999999] "
                            f"is required, got {values[-1][:40]!r}")
    return int(text)


def query_float(query: dict[str, list[str]], name: str, default: float, lo: float,
                hi: float) -> float:
    """An optional number in [lo, hi] from the query string (422 naming it otherwise)."""
    values = query.get(name)
    if not values:
        return default
    try:
        value = float(values[-1][:40])
    except ValueError:
        value = math.nan
    if not lo <= value <= hi:
        raise ApiError(422, f"invalid request query.{name}: a number in [{lo:g}, {hi:g}] is "
                            f"required, got {values[-1]!r}")
    return value


_CLIENT_ID = {"name": "client_id", "in": "query", "required": True,
              "schema": {"type": "integer", "minimum": 0, "maximum": 9999999999,
                         "title": "Client Id"}}
_ERRORS = {str(code): {"description": why, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}}}}}} for code, why in (
    (401, "missing or invalid bearer token"), (403, "the token belongs to another client"),
    (422, "invalid query, or a frame that fails to parse or validate"))}

OPENAPI: dict[str, dict[str, Any]] = {
    "/v1/task": {"get": {
        "summary": "Long-poll this client's next TASK frame",
        "operationId": "get_task_v1_task_get",
        "parameters": [_CLIENT_ID, {"name": "wait", "in": "query", "required": False, "schema": {
            "type": "number", "minimum": 0, "maximum": MAX_WAIT, "default": 20.0,
            "title": "Wait"}}],
        "responses": {"200": {"description": "the TASK frame", "content": {FRAME: {}}},
                      "204": {"description": "no task yet (see Retry-After)"},
                      "410": {"description": "the run is over"}, **_ERRORS}}},
    "/v1/update": {"post": {
        "summary": "Post an UPDATE or FAILURE frame for the open task",
        "operationId": "post_update_v1_update_post",
        "parameters": [_CLIENT_ID],
        "requestBody": {"required": True, "content": {FRAME: {"schema": {
            "type": "string", "format": "binary"}}}},
        "responses": {"200": {"description": "admitted", "content": {"application/json": {}}},
                      "408": {"description": "the body stopped flowing"},
                      "409": {"description": "no open task: late, duplicate or unknown"},
                      "413": {"description": "body over an update's size"},
                      "429": {"description": "this client has uploads in progress"},
                      **_ERRORS}}},
}
