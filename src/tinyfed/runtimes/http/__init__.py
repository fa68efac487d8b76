"""The HTTP runtime: a FastAPI app served by uvicorn in a thread of the server process
(`runtime`, `app`, `hot`, `hub`), and the device-side client loop that pulls tasks and pushes
updates over it (`remote`). Nothing is imported here, so a device that imports `remote` never
loads FastAPI or uvicorn."""
