"""Serve an ASGI app with uvicorn on a background thread; port 0 picks a free port.

The socket is bound here, before uvicorn starts, so the real address is known (and printed)
at once and a busy port is a clear error instead of a log line from another thread.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

from tinyfed.netutil import bind


@dataclass
class Handle:
    url: str
    server: uvicorn.Server
    thread: threading.Thread
    sock: socket.socket

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0) -> Handle:
    """Start serving `app`; returns once the server accepts connections."""
    sock = bind(host, port, "dashboard", backlog=128)
    real_port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2,
                            lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="tinyfed-dashboard-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    shown = f"[{host}]" if ":" in host else host
    return Handle(f"http://{shown}:{real_port}/", server, thread, sock)
