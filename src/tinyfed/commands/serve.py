"""`tinyfed serve`: the experiment's server over HTTP; remote `tinyfed client`s do the training.

It owns the run folder exactly like `tinyfed run` (config, metrics, checkpoints, model) and
`--resume DIR` continues from the last checkpoint; clients reconnect on their own.
"""

from __future__ import annotations

import argparse
import sys

from tinyfed.commands.experiment_flags import add_experiment_flags, config_from, overrides_from
from tinyfed.errors import ConfigError

TOKENS_NAME = "tokens.txt"


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve an experiment to remote clients over HTTP",
                       description=__doc__.splitlines()[0])
    add_experiment_flags(p)
    net = p.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    net.add_argument("--port", type=int, default=8765, help="port; 0 picks a free one")
    net.add_argument("--tokens", metavar="FILE",
                     help="'CLIENT_ID TOKEN' lines (default: fresh ones in RUN_DIR/tokens.txt)")
    net.add_argument("--tls-cert", metavar="FILE", help="PEM certificate (serve https)")
    net.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    net.add_argument("--wait-clients", type=int, default=0, metavar="N",
                     help="start round 1 only once N client ids have registered")
    net.add_argument("--dashboard", action="store_true",
                     help="also serve the live dashboard at /dashboard (read-only, no token)")
    net.add_argument("--url-file", metavar="FILE", help="write the server's URL here once up")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    p.add_argument("--plain", action="store_true", help="plain lines instead of a live table")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from tinyfed.extras import require
    from tinyfed.metrics import EventBus
    from tinyfed.rundir import RunDir  # torch comes with it: not for --help
    from tinyfed.runner import execute, summary
    from tinyfed.runtimes.http.auth import new_tokens, read_tokens, write_tokens

    http = require("tinyfed.runtimes.http.runtime", "tinyfed serve")
    HttpOptions, HttpRuntime = http.HttpOptions, http.HttpRuntime  # noqa: N806

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: allowed 0..65535")
    overrides = {**overrides_from(args), "runtime": "http"}
    if args.resume:
        if args.config:
            raise ConfigError("--resume takes the config saved in the run folder; drop --config")
        run_dir = RunDir(args.resume)
        config = run_dir.resume_config(overrides)
    else:
        config = config_from(args).model_copy(update={"runtime": "http"})
    if args.print_config:
        sys.stdout.write(config.to_toml())
        return 0
    if args.resume:
        run_dir.write_config(config)
    else:
        run_dir = RunDir.create(config)
        config = run_dir.saved_config()
    own = run_dir.path / TOKENS_NAME
    if args.tokens:
        tokens = read_tokens(args.tokens)
    elif own.is_file():
        tokens = read_tokens(own)
    else:
        tokens = new_tokens(range(config.clients))
        write_tokens(own, tokens)
        print(f"tinyfed: client tokens written to {own}", file=sys.stderr)
    bus = EventBus()
    options = HttpOptions(tokens=tokens, host=args.host, port=args.port,
                          tls_cert=args.tls_cert, tls_key=args.tls_key, url_file=args.url_file,
                          wait_clients=args.wait_clients, dashboard=args.dashboard)
    runtime = HttpRuntime(config, options, bus)  # a transport: execute() dispatches over it
    result = execute(config, run_dir, resuming=bool(args.resume),
                     live=False if args.plain else None, bus=bus, runtime=runtime)
    print(summary(result))
    return 0
