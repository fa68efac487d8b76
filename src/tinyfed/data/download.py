"""Fetch files from a mirror into the cache: bounded time, verified before they land.

A download is written to a temporary file beside its destination, checked, then renamed into
place, so the cache never holds a partial or unverified file.
"""

from __future__ import annotations

import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from tinyfed.errors import DataError

TIMEOUT_S = 10.0
MIRROR_ENV = "TINYFED_MIRROR"  # one base URL that replaces every upstream (tests, air-gapped sites)


def base_urls(upstream: Sequence[str]) -> tuple[str, ...]:
    """The base URLs to try in order: $TINYFED_MIRROR alone if set, else upstream's."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    bases = (mirror,) if mirror else tuple(upstream)
    return tuple(b if b.endswith("/") else b + "/" for b in bases)


def _reason(e: BaseException) -> str:
    """A short, one-line cause: 'HTTP 404 Not Found', 'Connection refused', 'no answer …'."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        inner = e.reason
        return _reason(inner) if isinstance(inner, BaseException) else str(inner)
    if isinstance(e, TimeoutError):  # socket.timeout is TimeoutError
        return f"no answer within {TIMEOUT_S:g} s"
    text = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
    return " ".join(text.split())


def fetch(url: str, dest: Path, check: Callable[[Path], None]) -> None:
    """Download `url` to `dest`; `check(tmp_path)` raises DataError to reject the bytes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as r:
            shutil.copyfileobj(r, out, 1 << 20)
        try:
            check(tmp)
        except DataError as e:
            raise DataError(f"download of {url} rejected: {e}") from None
        os.replace(tmp, dest)
    except DataError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise DataError(f"download of {url} failed: {_reason(e)}") from e
    finally:
        tmp.unlink(missing_ok=True)


def fetch_all(files: Sequence[str], upstream: Sequence[str], dest_dir: Path,
              check: Callable[[str, Path], None]) -> None:
    """Fetch every missing file from the first base URL that serves them all."""
    errors = []
    for base in base_urls(upstream):
        try:
            for name in files:
                if not (dest_dir / name).is_file():
                    fetch(base + name, dest_dir / name, lambda p, n=name: check(n, p))
            return
        except DataError as e:
            errors.append(str(e))
    raise DataError("; ".join(errors))
