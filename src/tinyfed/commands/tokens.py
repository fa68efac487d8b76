"""`tinyfed tokens`: fresh random bearer tokens, one `CLIENT_ID TOKEN` line per client."""

from __future__ import annotations

import argparse
import sys

from tinyfed.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser("tokens", help="print random client tokens for `tinyfed serve --tokens`",
                       description="Print one 'CLIENT_ID TOKEN' line per client (ids 0..K-1).")
    p.add_argument("--clients", type=int, required=True, metavar="K", help="number of clients")
    p.add_argument("--out", metavar="FILE", help="write them to FILE (mode 0600) instead")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from tinyfed.runtimes.http.auth import format_tokens, new_tokens, write_tokens

    if args.clients < 1:
        raise ConfigError(f"--clients {args.clients}: at least 1 required")
    tokens = new_tokens(range(args.clients))
    if args.out:
        write_tokens(args.out, tokens)
        print(f"wrote {args.clients} tokens to {args.out}")
    else:
        sys.stdout.write(format_tokens(tokens))
    return 0
