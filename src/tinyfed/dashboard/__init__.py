"""The live dashboard: a page that plots a run's metrics records as they arrive (SSE).

    dash = Dashboard(); dash.add_folder("runs/a"); app = create_app(dash.start())
    mount(existing_fastapi_app, dash, "/dashboard")   # as `tinyfed serve` does
"""

from tinyfed.dashboard.app import Dashboard, create_app, make_router, mount
from tinyfed.dashboard.serve import Handle, serve_in_thread

__all__ = ["Dashboard", "Handle", "create_app", "make_router", "mount", "serve_in_thread"]
