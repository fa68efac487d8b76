"""`tinyfed run --dashboard`: the run's EventBus feeds a dashboard served on a thread."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from tinyfed.config import Config
from tinyfed.dashboard.app import Dashboard, create_app
from tinyfed.dashboard.serve import Handle, serve_in_thread
from tinyfed.metrics import EventBus
from tinyfed.rundir import RunDir


@dataclass
class LiveDashboard:
    bus: EventBus
    dashboard: Dashboard
    handle: Handle

    @property
    def url(self) -> str:
        return self.handle.url

    def linger(self) -> None:
        """Keep the page up after the run until Ctrl+C, so its final numbers can be read."""
        print(f"dashboard: run finished; still serving {self.url} (Ctrl+C stops)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass

    def stop(self) -> None:
        self.dashboard.close()
        self.handle.stop()


def start_live(config: Config, run_dir: RunDir, host: str = "127.0.0.1",
               port: int = 0) -> LiveDashboard:
    """Pass the returned `.bus` to `runner.execute(bus=...)`."""
    bus = EventBus()
    dash = Dashboard()
    dash.add_bus(bus, config=config, folder=run_dir.path, name=run_dir.path.resolve().name)
    dash.start()
    handle = serve_in_thread(create_app(dash), host, port)
    print(f"dashboard: {handle.url}", flush=True)
    return LiveDashboard(bus, dash, handle)
