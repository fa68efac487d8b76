"""The server-sent event stream one page reads: a hello, the history, then live events.

EventSource reconnects by itself (after `retry` ms) and sends the last id it saw; `Hub`
decides whether that id lets the stream continue where it stopped or needs a full replay.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from tinyfed.dashboard.hub import Hub, format_sse

RETRY_MS = 1000
POLL_SECONDS = 0.2
KEEPALIVE_SECONDS = 15.0


async def event_stream(
    hub: Hub,
    last_event_id: str | None,
    disconnected: Callable[[], Awaitable[bool]] | None = None,
    poll: float = POLL_SECONDS,
) -> AsyncIterator[str]:
    """Yield SSE text until the client leaves or the hub closes.

    The hello event says whether this is a continuation (`resumed`); if not, the page clears
    what it has and rebuilds from the replay that follows, so nothing is drawn twice.
    """
    position = hub.resume_position(last_event_id)
    resumed = position > 0
    yield f"retry: {RETRY_MS}\n\n"
    yield format_sse("hello", {"boot": hub.boot, "resumed": resumed})
    idle, seen = 0.0, 0
    while not hub.closed:
        events = hub.since(position)
        for ev in events:
            yield format_sse(ev["type"], ev, f"{hub.boot}:{position}")
            position += 1
        seen, progress = hub.progress_since(seen)
        for ev in progress:  # no id: progress is transient, a reconnect gets the latest anew
            yield format_sse("progress", ev)
        if events or progress:
            idle = 0.0
            continue
        if disconnected is not None and await disconnected():
            return
        await asyncio.sleep(poll)
        idle += poll
        if idle >= KEEPALIVE_SECONDS:
            idle = 0.0
            yield ": keepalive\n\n"
