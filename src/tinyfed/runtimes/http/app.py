"""The versioned HTTP API over a Hub: routes, bearer auth, body limit, JSON errors.

No route returns a stack trace: every error is `{"error": "..."}` with its status. Uploads are
binary wire frames (never pickle, never JSON floats).
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
from tinyfed.runtimes.http.hub import Hub, Verdict

FRAME = "application/octet-stream"
MAX_WAIT = 30.0  # longest long-poll a client may ask for, seconds
UPLOADS = 8  # update bodies read at once
CHECKERS = 2  # threads that decode and validate update frames off the event loop
BOOT_HEADER = "X-Tinyfed-Boot"


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


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
               max_body: int = 256 << 20, max_uploads: int = UPLOADS) -> FastAPI:
    """The FastAPI app of one server. `config` is the experiment config served to clients.

    At most `max_uploads` update bodies are read and checked at once; other uploads wait
    unread (uvicorn stops reading their sockets), so memory does not grow with the number of
    clients posting at the same moment. Frames are checked on `CHECKERS` threads of their own:
    the event loop stays free, and few threads mean few malloc arenas holding freed buffers
    (Starlette's 40-thread pool cost 240 MB of peak RSS at 100 clients)."""
    uploads: list[asyncio.Semaphore] = []
    checkers = ThreadPoolExecutor(CHECKERS, thread_name_prefix="tinyfed-check")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        hub.loop = asyncio.get_running_loop()
        uploads.append(asyncio.Semaphore(max_uploads))
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

    def identify(request: Request, token: str | None = None) -> int:
        who = tokens.identify(request.headers.get("authorization"))
        if who is None and token:
            who = tokens.identify(f"Bearer {token}")
        if who is None:
            hub.count(401)
            raise ApiError(401, "missing or invalid bearer token",
                           {"WWW-Authenticate": "Bearer"})
        return who

    def as_client(request: Request, client_id: int) -> int:
        who = identify(request)
        if who != client_id:
            hub.count(403)
            raise ApiError(403, f"this token is not allowed to act as client {client_id}")
        return who

    @app.get("/v1/health", summary="Liveness (no auth)")
    async def health():
        return {"status": "finished" if hub.finished else "ok", "version": __version__,
                "boot_id": hub.boot_id,
                "model_version": hub.model.version if hub.model else None}

    @app.post("/v1/register", summary="Announce a client (again, after a server restart)")
    async def register(request: Request, client_id: int = Query(..., ge=0)):
        as_client(request, client_id)
        hub.register(client_id)
        return {"client_id": client_id, "boot_id": hub.boot_id, "finished": hub.finished}

    @app.get("/v1/config", summary="The experiment config (clients rebuild their shards from it)")
    async def get_config(request: Request):
        identify(request)
        return config

    @app.get("/v1/model", summary="The current global model as a MODEL wire frame",
             responses={200: {"content": {FRAME: {}}}, 304: {"description": "unchanged"}})
    async def get_model(request: Request):
        identify(request)
        snap = hub.model  # one read of an immutable snapshot: never waits for a writer
        if snap is None:
            raise ApiError(503, "no model published yet", {"Retry-After": "1"})
        headers = {"ETag": snap.etag, "X-Model-Version": str(snap.version)}
        if request.headers.get("if-none-match") == snap.etag:
            return Response(status_code=304, headers=headers)
        return PartsResponse((snap.head, snap.payload), media_type=FRAME, headers=headers)

    @app.get("/v1/task", summary="Long-poll this client's next TASK frame",
             responses={200: {"content": {FRAME: {}}}, 204: {"description": "no task yet"},
                        410: {"description": "the run is over"}})
    async def get_task(request: Request, client_id: int = Query(..., ge=0),
                       wait: float = Query(20.0, ge=0, le=MAX_WAIT)):
        as_client(request, client_id)
        hub.register(client_id)
        parts = await hub.wait_task(client_id, wait)
        if parts is not None:
            return PartsResponse(parts, media_type=FRAME)
        if hub.finished:
            hub.farewell(client_id)
            raise ApiError(410, "the run is over")
        return Response(status_code=204, headers={"Retry-After": "1"})

    @app.post("/v1/update", summary="Post an UPDATE or FAILURE frame for the open task",
              openapi_extra={"requestBody": {"content": {FRAME: {"schema": {
                  "type": "string", "format": "binary"}}}, "required": True}})
    async def post_update(request: Request, client_id: int = Query(..., ge=0)):
        as_client(request, client_id)
        async with uploads[0]:
            body = await read_limited(request, max_body, hub)
            try:
                result = await asyncio.get_running_loop().run_in_executor(
                    checkers, hub.accept, client_id, body)
            except Verdict as v:
                raise ApiError(v.status, v.reason) from None
        return {"accepted": result.ok, "client_id": client_id, "round": result.round,
                "reason": result.reason or None}

    @app.get("/v1/metrics", summary="Metrics records so far and request counters")
    async def get_metrics(request: Request):
        identify(request)
        return {"records": list(bus.history) if bus else [], "counters": dict(hub.counters),
                "clients_registered": len(hub.registered)}

    @app.get("/v1/events", summary="Server-sent events: every metrics record, history then live",
             responses={200: {"content": {"text/event-stream": {}}}})
    async def events(request: Request, token: str | None = Query(None)):
        identify(request, token)
        return StreamingResponse(stream_records(request, hub, bus),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    app.state.viewer_id = VIEWER
    return app


async def read_limited(request: Request, limit: int, hub: Hub) -> bytes:
    """The body, refusing (413) anything over `limit` before or while reading it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid Content-Length")
        if int(declared) > limit:
            hub.count(413)
            raise ApiError(413, f"body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            hub.count(413)
            raise ApiError(413, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


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
        history = list(bus.history)
        seen = {id(r) for r in history}  # a record published while subscribing comes once
        for record in history:
            yield f"data: {json.dumps(record)}\n\n"
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
