"""`tinyfed client`: a device that pulls tasks from a tinyfed server, trains, pushes updates.

It rebuilds its shard from the experiment config the server hands out (data never travels) and
acts for one client id (`--client-id` + `--token`) or several (`--tokens FILE` with
`--client-ids` or `--range`).
"""

from __future__ import annotations

import argparse

from tinyfed.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser("client", help="train for a remote tinyfed server",
                       description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True, metavar="URL", help="e.g. http://127.0.0.1:8765")
    who = p.add_argument_group("identity")
    who.add_argument("--client-id", type=int, help="the client id this device acts for")
    who.add_argument("--token", help="its bearer token (or use --tokens FILE)")
    who.add_argument("--tokens", metavar="FILE", help="'CLIENT_ID TOKEN' lines")
    who.add_argument("--client-ids", metavar="I,J,...", help="act for these ids (from --tokens)")
    who.add_argument("--range", nargs=2, type=int, metavar=("L", "R"),
                     help="act for ids L <= id < R (from --tokens)")
    data = p.add_argument_group("data (must match the server's experiment)")
    data.add_argument("--data-dir", help="folder holding this device's copy of the data set")
    data.add_argument("--dataset", help="refuse to run unless the server trains on this data set")
    data.add_argument("--partition", help="refuse to run unless the server uses this partition")
    net = p.add_argument_group("network")
    net.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    net.add_argument("--retries", type=int, default=5, help="retries per request")
    net.add_argument("--backoff", type=float, default=0.5,
                     help="first retry delay in seconds (doubles, with jitter, up to 10 s)")
    net.add_argument("--max-offline", type=float, default=300.0,
                     help="give up after this many seconds without reaching the server")
    net.add_argument("--ca-cert", metavar="FILE", help="CA bundle to verify an https server")
    net.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    p.add_argument("--delay", type=float, default=0.0,
                   help="simulate a slow device: wait this many seconds before each post")
    p.add_argument("--quiet", action="store_true", help="no per-task lines")
    p.set_defaults(handler=handle)


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--client-ids {text!r}: expected comma-separated integers") from None
    if not ids or min(ids) < 0:
        raise ConfigError(f"--client-ids {text!r}: expected non-negative integers")
    return ids


def tokens_from(args: argparse.Namespace) -> dict[int, str]:
    from tinyfed.runtimes.http.auth import read_tokens

    if args.token or args.client_id is not None:
        if args.token is None or args.client_id is None:
            raise ConfigError("--client-id and --token go together")
        return {args.client_id: args.token}
    if not args.tokens:
        raise ConfigError("give --client-id ID --token TOKEN, or --tokens FILE")
    book = read_tokens(args.tokens)
    if args.client_ids and args.range:
        raise ConfigError("give --client-ids or --range, not both")
    if args.client_ids:
        ids = parse_ids(args.client_ids)
    elif args.range:
        lo, hi = args.range
        if not 0 <= lo < hi:
            raise ConfigError(f"--range {lo} {hi}: need 0 <= L < R")
        ids = list(range(lo, hi))
    else:
        ids = sorted(book)
    missing = [i for i in ids if i not in book]
    if missing:
        raise ConfigError(f"--tokens {args.tokens!r} has no token for client(s) {missing[:10]}")
    return {i: book[i] for i in ids}


def handle(args: argparse.Namespace) -> int:
    from tinyfed.runtimes.http.remote import ClientOptions, RemoteClient

    if args.retries < 0 or args.backoff < 0 or args.timeout <= 0:
        raise ConfigError("--retries and --backoff must be >= 0 and --timeout > 0")
    verify: bool | str = args.ca_cert or not args.insecure
    expect = {k: v for k, v in (("dataset", args.dataset), ("partition", args.partition)) if v}
    opts = ClientOptions(server=args.server, tokens=tokens_from(args), data_dir=args.data_dir,
                         timeout=args.timeout, retries=args.retries, backoff=args.backoff,
                         max_offline=args.max_offline, delay=args.delay, verify=verify,
                         expect=expect, quiet=args.quiet)
    return RemoteClient(opts).run()
