"""`tinyfed dashboard`: a live page for run folders, finished or still being written."""

from __future__ import annotations

import argparse
import threading


def register(sub) -> None:
    p = sub.add_parser("dashboard", help="serve a live page plotting one or more runs",
                       description="Serve a page that plots the runs in RUN_DIR... and follows "
                                   "their metrics.jsonl as they grow. Ctrl+C stops it.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8050,
                   help="port to listen on (default 8050; 0 = any free port)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from tinyfed.extras import require

    dashboard = require("tinyfed.dashboard", "tinyfed dashboard")
    Dashboard, create_app, serve_in_thread = (  # noqa: N806
        dashboard.Dashboard, dashboard.create_app, dashboard.serve_in_thread)

    dash = Dashboard()
    for folder in args.runs:
        dash.add_folder(folder)
    dash.start()
    handle = serve_in_thread(create_app(dash), args.host, args.port)
    print(f"tinyfed dashboard: {handle.url}  ({len(args.runs)} run(s); Ctrl+C stops)",
          flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        print("tinyfed dashboard: stopped", flush=True)
    finally:
        dash.close()
        handle.stop()
    return 0
