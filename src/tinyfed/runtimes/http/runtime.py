"""HttpRuntime: the HTTP transport, a FastAPI app in a uvicorn thread.

`send` publishes a job for its client and returns; remote clients long-poll for it, train with
the same `ClientWorker` every runtime uses, and post the update frame back; the handlers check
it (on their own threads) and `receive` delivers each admitted update or failure as it arrives.
`cancel` closes a job the dispatcher found due (a later upload for it is 409). The server loop
stays in the main thread and never sees HTTP.
"""

from __future__ import annotations

import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from tinyfed import netutil, wire
from tinyfed.checkpoint import atomic_write
from tinyfed.errors import ConfigError
from tinyfed.experiment import Experiment
from tinyfed.metrics import EventBus
from tinyfed.runtimes.base import Delivery, Job, Stopped
from tinyfed.runtimes.http.app import create_app
from tinyfed.runtimes.http.auth import TokenBook, new_token
from tinyfed.runtimes.http.conn import protocol_class
from tinyfed.runtimes.http.hub import Hub, max_update_frame


@dataclass
class HttpOptions:
    """How the server listens; CLI-only settings that do not change what a run computes."""

    tokens: dict[int, str]
    host: str = "127.0.0.1"
    port: int = 0
    tls_cert: str | None = None
    tls_key: str | None = None
    url_file: str | None = None
    viewer_token: str = field(default_factory=new_token)
    dashboard: bool = False  # mount the live dashboard (read-only, no token) at /dashboard
    wait_clients: int = 0  # hold round 1 until this many client ids have registered
    linger: float = 3.0  # seconds to keep answering 410 after the run ends, so clients exit
    announce: bool = True


MIN_CONNECTIONS = 1024  # connections (and requests in flight) served at once, at least


def bind(host: str, port: int) -> socket.socket:
    """The server's non-blocking listening socket (uvicorn serves on it)."""
    sock = netutil.bind(host, port, "HTTP server")
    sock.setblocking(False)
    return sock




class HttpRuntime:
    def __init__(self, config, options: HttpOptions | None = None, bus: EventBus | None = None):
        self.config = config
        self.options = options or HttpOptions(tokens={})
        self.bus = bus
        max_frame = config.max_frame
        self.max_body = max_frame
        self.hub = Hub(max_frame)
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._dash = None

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self, experiment: Experiment) -> None:
        opts = self.options
        missing = sorted(set(experiment.client_ids) - set(opts.tokens))
        if missing:
            raise ConfigError(f"no token for client(s) {missing[:10]}; the tokens file must "
                              f"name every client id 0..{experiment.config.clients - 1}")
        if bool(opts.tls_cert) != bool(opts.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together; give both or neither")
        for path in (opts.tls_cert, opts.tls_key):
            if path and not Path(path).is_file():
                raise ConfigError(f"TLS file {path!r} does not exist")
        self.hub.set_model(wire.encode_tensors(experiment.initial), 0)
        self.hub.max_update = min(self.max_body, max_update_frame(experiment.spec))
        app = create_app(self.hub, TokenBook(opts.tokens, opts.viewer_token),
                         experiment.config.model_dump(), self.bus, self.max_body)
        if opts.dashboard and self.bus is not None:
            from tinyfed.dashboard import Dashboard, mount

            self._dash = Dashboard()
            self._dash.add_bus(self.bus, config=experiment.config, name="run")
            mount(app.app, self._dash, "/dashboard")  # on the FastAPI app behind the hot routes
        sock = bind(opts.host, opts.port)
        port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False,
                                ssl_certfile=opts.tls_cert, ssl_keyfile=opts.tls_key,
                                timeout_graceful_shutdown=2, server_header=False,
                                proxy_headers=False,  # clients are told apart by token, not IP
                                http=protocol_class(),  # request headers within a deadline
                                timeout_keep_alive=5,
                                # beyond this many connections and requests at once: 503
                                limit_concurrency=max(MIN_CONNECTIONS,
                                                      4 * experiment.config.clients),
                                backlog=2048)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, args=(sock,), name="tinyfed-http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"HTTP server on {opts.host}:{port} failed to start")
            time.sleep(0.01)
        scheme = "https" if opts.tls_cert else "http"
        host = f"[{opts.host}]" if ":" in opts.host else opts.host
        self.url = f"{scheme}://{host}:{port}"
        if opts.url_file:
            atomic_write(Path(opts.url_file), self.url.encode())
        if opts.announce:
            print(f"tinyfed: serving on {self.url} (API docs {self.url}/docs)", file=sys.stderr,
                  flush=True)
            if self._dash is not None:
                print(f"tinyfed: dashboard {self.url}/dashboard", file=sys.stderr, flush=True)
        if opts.wait_clients:
            if opts.announce:
                print(f"tinyfed: waiting for {opts.wait_clients} client(s) to register",
                      file=sys.stderr, flush=True)
            while len(self.hub.registered) < opts.wait_clients:
                time.sleep(0.05)

    def _serve(self, sock: socket.socket) -> None:
        assert self._server is not None
        try:
            self._server.run(sockets=[sock])
        finally:
            sock.close()

    def close(self) -> None:
        """End the run for clients (410), give them a moment to hear it, stop the server."""
        self.hub.finish()
        if self._server is None or self._thread is None:
            return
        deadline = time.monotonic() + self.options.linger
        while time.monotonic() < deadline and self._thread.is_alive():
            if not self.hub.registered or self.hub.farewelled() >= set(self.hub.registered):
                break
            time.sleep(0.05)
        if self._dash is not None:
            self._dash.close()
        self._server.should_exit = True
        self._thread.join(10)
        self._server = None

    # ---- the Transport protocol ---------------------------------------------------------
    def send(self, job: Job) -> None:
        self.hub.set_model(job.payload, job.task.version)
        self.hub.publish(job)

    def receive(self, timeout: float) -> Delivery | None:
        try:
            return self.hub.results.get(timeout=timeout)
        except queue.Empty:
            return None

    def waiting(self) -> int:
        """Results admitted and queued (the async loop merges these before dispatching, so
        this transport offers the same count as `ready`)."""
        return self.hub.results.qsize()

    ready = waiting

    def cancel(self, job: Job) -> Stopped | None:
        return self.hub.cancel(job)
