"""Connections that must finish their request headers in time.

uvicorn times out a keep-alive connection that stays silent, but not one that opens and sends
nothing, or trickles a request's headers a byte at a time: each such connection holds a socket
and a slot of `limit_concurrency` for ever. `protocol_class()` is uvicorn's httptools protocol
with one more timer: from connect (and from the end of each response) the request headers must
be complete within `HEADER_TIMEOUT` seconds, else the connection is closed. Bodies have their
own per-read timeout in `hot.HotRoutes`.
"""

from __future__ import annotations

import asyncio
from typing import Any

HEADER_TIMEOUT = 10.0  # seconds from connect (or the last response) to complete headers


def protocol_class(timeout: float | None = None) -> Any:
    """The protocol to give uvicorn's `http=`; "auto" where httptools is not installed."""
    timeout = HEADER_TIMEOUT if timeout is None else timeout
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # uvicorn without httptools: its own timeouts only
        return "auto"

    class HeaderDeadline(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this connection has the same bound

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline
