"""Listening sockets bound by tinyfed itself, so `--port 0` yields the real port at once."""

from __future__ import annotations

import socket

from tinyfed.errors import ConfigError


def bind(host: str, port: int, what: str = "server", backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on host:port; a busy or bad address is a one-line ConfigError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"{what} address {host}:{port}: cannot listen ({exc.strerror}); "
            f"choose another --port, or 0 for any free port"
        ) from None
    sock.listen(backlog)
    return sock
