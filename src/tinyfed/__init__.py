"""tinyfed: federated learning in one process, over OS pipes, or over HTTP."""

__version__ = "0.1.0"
