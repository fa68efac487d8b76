"""`tinyfed run`: one experiment end to end, or the continuation of a killed one."""

from __future__ import annotations

import argparse
import sys

from tinyfed.commands.experiment_flags import add_experiment_flags, config_from, overrides_from
from tinyfed.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser("run", help="train a model with federated learning",
                       description="Train with FedAvg/FedSGD; writes a run folder.")
    add_experiment_flags(p)
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    p.add_argument("--plain", action="store_true", help="plain lines instead of a live table")
    p.add_argument("--dashboard", action="store_true",
                   help="serve a live page of the run at 127.0.0.1 (stays up until Ctrl+C)")
    p.add_argument("--dashboard-port", type=int, default=8050, metavar="P",
                   help="port of --dashboard (default 8050; 0 = any free port)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from tinyfed.rundir import RunDir  # torch comes with it: not for --help
    from tinyfed.runner import execute, open_run, summary

    if args.resume:
        if args.config:
            raise ConfigError("--resume takes the config saved in the run folder; drop --config")
        run_dir = RunDir(args.resume)
        config = run_dir.resume_config(overrides_from(args))
        if not args.print_config:
            run_dir.write_config(config)
    else:
        config = config_from(args)
    if args.print_config:
        sys.stdout.write(config.to_toml())
        return 0
    if not args.resume:
        run_dir, config = open_run(config, None, {})
    live_page = None
    if args.dashboard:
        from tinyfed.extras import require

        start_live = require("tinyfed.dashboard.live", "--dashboard").start_live
        live_page = start_live(config, run_dir, port=args.dashboard_port)
    try:
        result = execute(config, run_dir, resuming=bool(args.resume),
                         live=False if args.plain else None,
                         bus=live_page.bus if live_page else None)
        print(summary(result), flush=True)
        if live_page:
            live_page.linger()
    finally:
        if live_page:
            live_page.stop()
    return 0

