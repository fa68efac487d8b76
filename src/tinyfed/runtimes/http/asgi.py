"""Two ASGI pieces for the hot path, cheaper than their generic Starlette counterparts.

`BootHeader` stamps every response with the server's boot id as a plain ASGI middleware
(Starlette's `@app.middleware("http")` wraps each request in a task group and memory streams,
which cost more than the rest of an update's handling). `PartsResponse` sends a frame as its
per-client head followed by the payload every client shares, so the payload is never copied
into one buffer per client.
"""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BootHeader:
    """Add `name: value` to the headers of every HTTP response."""

    def __init__(self, app: ASGIApp, name: str, value: str) -> None:
        self.app = app
        self.header = (name.lower().encode("latin-1"), value.encode("latin-1"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, stamped)


class PartsResponse(Response):
    """A binary response whose body is several byte strings sent one after another."""

    def __init__(self, parts: tuple[bytes, ...], media_type: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(b"", status_code=200, headers=headers, media_type=media_type)
        self.parts = parts
        self.headers["content-length"] = str(sum(len(p) for p in parts))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        last = len(self.parts) - 1
        for i, part in enumerate(self.parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < last})
