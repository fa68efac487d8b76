"""Bearer tokens: one random secret per client id, read from `CLIENT_ID TOKEN` lines.

Tokens are looked up by their SHA-256 digest, so a lookup's timing does not depend on how much
of a guessed token is right.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from pathlib import Path

from tinyfed.errors import ConfigError

VIEWER = -1  # a read-only identity (metrics, events, model, config); never a client


def new_token() -> str:
    return secrets.token_urlsafe(24)


def new_tokens(client_ids: Iterable[int]) -> dict[int, str]:
    return {cid: new_token() for cid in client_ids}


def format_tokens(tokens: dict[int, str]) -> str:
    return "".join(f"{cid} {tok}\n" for cid, tok in sorted(tokens.items()))


def parse_tokens(text: str, source: str = "tokens") -> dict[int, str]:
    """`CLIENT_ID TOKEN` per line; blank lines and `#` comments are skipped."""
    out: dict[int, str] = {}
    seen: set[str] = set()
    for num, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise ConfigError(f"{source}:{num}: expected 'CLIENT_ID TOKEN' (a non-negative integer "
                              f"and a token), got {len(parts)} field(s)")
        cid, tok = int(parts[0]), parts[1]
        if len(tok) < 16:
            raise ConfigError(f"{source}:{num}: token of client {cid} is {len(tok)} characters; "
                              "at least 16 required")
        if cid in out:
            raise ConfigError(f"{source}:{num}: client {cid} appears twice")
        if tok in seen:
            raise ConfigError(f"{source}:{num}: token of client {cid} is already used by another")
        seen.add(tok)
        out[cid] = tok
    return out


def read_tokens(path: str | Path) -> dict[int, str]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--tokens {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--tokens {str(path)!r} cannot be read: {exc}") from None
    return parse_tokens(text, str(path))


def write_tokens(path: str | Path, tokens: dict[int, str]) -> None:
    """Write a tokens file readable by its owner only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(format_tokens(tokens), encoding="utf-8")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenBook:
    """Which identity a bearer token stands for."""

    def __init__(self, tokens: dict[int, str], viewer: str | None = None):
        self._by_digest = {_digest(t): cid for cid, t in tokens.items()}
        if viewer:
            self._by_digest[_digest(viewer)] = VIEWER

    def identify(self, authorization: str | None) -> int | None:
        """The client id of an `Authorization: Bearer ...` header, or None if not valid."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self._by_digest.get(_digest(token.strip()))
