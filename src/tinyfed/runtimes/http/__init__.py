"""The HTTP runtime: a FastAPI app served by uvicorn in a thread of the server process, and the
device-side client loop that pulls tasks and pushes updates over it."""

from tinyfed.runtimes.http.runtime import HttpOptions, HttpRuntime

__all__ = ["HttpOptions", "HttpRuntime"]
