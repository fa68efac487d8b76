"""The dashboard as a FastAPI router: the page, its static files, the event stream, a snapshot.

One `Dashboard` (a hub, its run watches and a poller thread) can be served on its own
(`create_app`) or mounted into another app (`mount`, used by `tinyfed serve` at /dashboard).
All page URLs are relative, so any prefix works.
"""

from __future__ import annotations

import threading
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)

from tinyfed.config import Config
from tinyfed.dashboard.hub import Hub
from tinyfed.dashboard.sources import Log, RunWatch, stderr_log
from tinyfed.dashboard.stream import event_stream
from tinyfed.metrics import EventBus

POLL_SECONDS = 0.5
TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html",
         ".txt": "text/plain"}


def static_file(name: str) -> bytes:
    """A file shipped in tinyfed/dashboard/static (package data), never from the network."""
    node = resources.files("tinyfed.dashboard").joinpath("static", name)
    if "/" in name or name.startswith(".") or not node.is_file():
        raise HTTPException(404, f"no static file {name!r}")
    return node.read_bytes()


class Dashboard:
    """Runs to show, and a thread that polls their folders every half second."""

    def __init__(self, log: Log = stderr_log, poll_seconds: float = POLL_SECONDS):
        self.hub = Hub()
        self.watches: list[RunWatch] = []
        self.log = log
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _name(self, name: str) -> str:
        taken = {w_name["name"] for w_name in self.hub.runs()}
        unique, n = name, 2
        while unique in taken:
            unique, n = f"{name} ({n})", n + 1
        return unique

    def add_folder(self, folder: str | Path, name: str | None = None) -> RunWatch:
        """A run folder, finished or still being written (metrics.jsonl is tailed)."""
        path = Path(folder)
        watch = RunWatch(self.hub, self._name(name or path.resolve().name or str(path)), path,
                         log=self.log)
        return self._add(watch)

    def add_bus(self, bus: EventBus, config: Config | None = None,
                folder: str | Path | None = None, name: str = "run") -> RunWatch:
        """The run in this process: records straight from its EventBus (history included)."""
        watch = RunWatch(self.hub, self._name(name), Path(folder) if folder else None, bus=bus,
                         config=config, log=self.log)
        return self._add(watch)

    def _add(self, watch: RunWatch) -> RunWatch:
        self.watches.append(watch)
        watch.poll()
        return watch

    def start(self) -> Dashboard:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="tinyfed-dashboard-poll",
                                            daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            for watch in list(self.watches):
                watch.poll()

    def close(self) -> None:
        """Stop polling and end every open stream (so a server can shut down promptly)."""
        self._stop.set()
        self.hub.closed = True
        for watch in self.watches:
            watch.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def router(self, prefix: str = "") -> APIRouter:
        return make_router(self, prefix)


def make_router(dash: Dashboard, prefix: str = "") -> APIRouter:
    """Routes at `prefix` ("" or "/something"): the page is `prefix + "/"`."""
    prefix = prefix.rstrip("/")
    router = APIRouter(prefix=prefix)

    if prefix:
        @router.get("", include_in_schema=False)
        def _bare(request: Request) -> Response:
            # "/dashboard" -> "/dashboard/" so the page's relative URLs resolve under it.
            return RedirectResponse(request.url.path + "/")

    @router.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse(static_file("index.html"))

    @router.get("/static/{name}")
    def static(name: str) -> Response:
        suffix = Path(name).suffix
        return Response(static_file(name), media_type=TYPES.get(suffix, "application/octet-stream"),
                        headers={"Cache-Control": "no-cache"})

    @router.get("/events")
    def events(request: Request) -> StreamingResponse:
        last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        return StreamingResponse(
            event_stream(dash.hub, last, request.is_disconnected),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @router.get("/api/state")
    def state() -> JSONResponse:
        return JSONResponse(dash.hub.snapshot())

    return router


def create_app(dash: Dashboard) -> FastAPI:
    """A stand-alone app serving the dashboard at /."""
    app = FastAPI(title="tinyfed dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(dash.router())

    @app.get("/favicon.ico", include_in_schema=False)
    def _favicon() -> Response:
        return Response(status_code=204)

    return app


def mount(app: FastAPI, dash: Dashboard, prefix: str = "/dashboard") -> Dashboard:
    """Serve `dash` inside another FastAPI app at `prefix` (starts its poller)."""
    app.include_router(dash.router(prefix))
    dash.start()
    return dash
