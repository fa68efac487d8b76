"""`tinyfed` command line: one subcommand per module in tinyfed.commands.

A user's mistake (TinyfedError) prints one line and exits 2; there is no traceback for it.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys
import threading

from tinyfed import __version__
from tinyfed.errors import TinyfedError

COMMANDS = ("run", "serve", "client", "tokens", "eval", "plot", "bandwidth", "fleet",
            "dashboard")


class Parser(argparse.ArgumentParser):
    """argparse with exit code 2 and a one-line error (it already exits 2; keep it short)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tinyfed", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tinyfed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"tinyfed.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"tinyfed.commands.{name}":
                continue  # a command not built into this install
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except TinyfedError as exc:
        print(f"tinyfed: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tinyfed: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The `tinyfed` command: `main`, then an exit that skips the interpreter's teardown once
    torch is loaded (0.7 s of freeing modules on this machine, for nothing: every output is
    written and closed by then). Threads still working and exit handlers run first."""
    code = main()
    if "torch" not in sys.modules:
        raise SystemExit(code)
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
