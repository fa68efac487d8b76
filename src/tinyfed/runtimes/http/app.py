"""The versioned HTTP API over a Hub: routes, bearer auth, body limit, JSON errors.

No route returns a stack trace: every error is `{"error": "..."}` with its status. Uploads are
binary wire frames (never pickle, never JSON floats). The two routes every update crosses
(`/v1/task`, `/v1/update`) are served by `hot.HotRoutes` in front of this FastAPI app.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinyfed import __version__
from tinyfed.metrics import EventBus
from tinyfed.runtimes.http.asgi import BootHeader, PartsResponse
from tinyfed.runtimes.http.auth import VIEWER, TokenBook
from tinyfed.runtimes.http.hot import FRAME, OPENAPI, ApiError, HotRoutes, as_client, identify
from tinyfed.runtimes.http.hub import BOOT_HEADER, Hub

UPLOADS = 8  # update bodies checked at once
MAX_SUBSCRIBERS = 32  # open /v1/events streams; more get 503
STREAM_HISTORY = 1000  # newest records a new subscriber is sent before live ones
PAGE, MAX_PAGE = 1000, 5000  # /v1/metrics records per answer: default and most
CHECKERS = 2  # threads that decode and validate update frames off the event loop


def no_telemetry() -> dict[str, Any]:
    """FastAPI's OpenTelemetry hooks switched off where this FastAPI has them (0.165+): they ask
    the global providers on every request, which costs more than an update's routing, and a
    tinyfed server reports through its own records."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(hub: Hub, tokens: TokenBook, config: dict[str, Any], bus: EventBus | None = None,
               max_body: int = 256 << 20, max_uploads: int = UPLOADS) -> HotRoutes:
    """The ASGI app of one server: `HotRoutes` (task and update) in front of the FastAPI app
    (everything else, at `.app`). `config` is the experiment config served to clients.

    At most `max_uploads` update bodies are read and checked at once; other uploads wait
    unread (uvicorn stops reading their sockets), so memory does not grow with the number of
    clients posting at the same moment. Frames are checked on `CHECKERS` threads of their own:
    the event loop stays free, and few threads mean few malloc arenas holding freed buffers
    (Starlette's 40-thread pool cost 240 MB of peak RSS at 100 clients)."""
    checkers = ThreadPoolExecutor(CHECKERS, thread_name_prefix="tinyfed-check")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        hub.loop = asyncio.get_running_loop()
        try:
            yield
        finally:
            checkers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="tinyfed", version=__version__, debug=False, lifespan=lifespan,
                  description="Federated learning server: clients pull tasks and push updates as "
                              "binary tinyfed wire frames.", **no_telemetry())

    app.add_middleware(BootHeader, name=BOOT_HEADER, value=hub.boot_id)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(422, f"invalid request {where}: {first.get('msg', 'malformed')}")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return error(500, "internal server error")

    def who(request: Request, token: str | None = None) -> int:
        return identify(tokens, hub, request.headers.get("authorization"), token)

    @app.get("/v1/health", summary="Liveness (no auth)")
    async def health():
        return {"status": "finished" if hub.finished else "ok", "version": __version__,
                "boot_id": hub.boot_id,
                "model_version": hub.model.version if hub.model else None}

    @app.post("/v1/register", summary="Announce a client (again, after a server restart)")
    async def register(request: Request, client_id: int = Query(..., ge=0)):
        as_client(tokens, hub, request.headers.get("authorization"), client_id)
        hub.register(client_id)
        return {"client_id": client_id, "boot_id": hub.boot_id, "finished": hub.finished}

    @app.get("/v1/config", summary="The experiment config (clients rebuild their shards from it)")
    async def get_config(request: Request):
        who(request)
        return config

    @app.get("/v1/model", summary="The current global model as a MODEL wire frame",
             responses={200: {"content": {FRAME: {}}}, 304: {"description": "unchanged"}})
    async def get_model(request: Request):
        who(request)
        snap = hub.model  # one read of an immutable snapshot: never waits for a writer
        if snap is None:
            raise ApiError(503, "no model published yet", {"Retry-After": "1"})
        headers = {"ETag": snap.etag, "X-Model-Version": str(snap.version)}
        if request.headers.get("if-none-match") == snap.etag:
            return Response(status_code=304, headers=headers)
        return PartsResponse((snap.head, snap.payload), media_type=FRAME, headers=headers)

    @app.get("/v1/metrics", summary="Metrics records (a page of at most `limit`, numbered "
             "from `since`) and request counters")
    async def get_metrics(request: Request, since: int = Query(0, ge=0, le=2**53),
                          limit: int = Query(PAGE, ge=1, le=MAX_PAGE)):
        who(request)
        number, records = bus.since(since) if bus else (0, [])
        first = number - len(records)
        page = records[:limit]
        return {"records": page, "first": first, "next": first + len(page),
                "counters": dict(hub.counters), "clients_registered": len(hub.registered)}

    subscribers = [0]  # open event streams

    @app.get("/v1/events", summary="Server-sent events: recent metrics records, then live",
             responses={200: {"content": {"text/event-stream": {}}},
                        503: {"description": "too many subscribers"}})
    async def events(request: Request, token: str | None = Query(None)):
        who(request, token)
        if subscribers[0] >= MAX_SUBSCRIBERS:
            hub.count(503)
            raise ApiError(503, f"{MAX_SUBSCRIBERS} event streams are open; try again later",
                           {"Retry-After": "5"})
        subscribers[0] += 1

        async def stream():
            try:
                async for part in stream_records(request, hub, bus):
                    yield part
            finally:
                subscribers[0] -= 1

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    fastapi_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's document plus the two routes `HotRoutes` serves."""
        if app.openapi_schema is None:
            fastapi_openapi()["paths"].update(OPENAPI)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.viewer_id = VIEWER
    return HotRoutes(app, hub, tokens, max_body, asyncio.Semaphore(max_uploads), checkers,
                     (BOOT_HEADER, hub.boot_id))


async def stream_records(request: Request, hub: Hub, bus: EventBus | None):
    """SSE frames: `data: <record JSON>` for the history, then for each new record."""
    if bus is None:
        return
    loop = asyncio.get_running_loop()
    live: asyncio.Queue = asyncio.Queue()

    def sink(record):
        loop.call_soon_threadsafe(live.put_nowait, record)

    bus.subscribe(sink)
    try:
        history = bus.history[-STREAM_HISTORY:]
        seen = {id(r) for r in history}  # a record published while subscribing comes once
        for i, record in enumerate(history):
            yield f"data: {json.dumps(record)}\n\n"
            if i % 64 == 63:
                await asyncio.sleep(0)  # let other requests run between slices of history
        while not hub.finished:
            try:
                record = await asyncio.wait_for(live.get(), 1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    break
                yield ": keep-alive\n\n"
                continue
            if id(record) not in seen:
                yield f"data: {json.dumps(record)}\n\n"
        while not live.empty():
            yield f"data: {json.dumps(live.get_nowait())}\n\n"
        yield "event: end\ndata: {}\n\n"
    finally:
        bus.unsubscribe(sink)
