"""Known digests of the real data sets, and verification that is paid for once per process.

Debian recompresses the Fashion-MNIST .gz files, so their SHA-256 is taken over the
decompressed IDX bytes; the same digest then holds for upstream's files and Debian's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tinyfed.errors import DataError

# SHA-256 of the decompressed IDX files (zalandoresearch/fashion-mnist release).
FMNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

# MD5 of upstream's *compressed* MNIST files. No SHA-256 of the decompressed bytes is known
# here with certainty, so local MNIST files (which a distribution may recompress) are checked
# by their IDX headers only, and these digests guard downloads.
MNIST_GZ_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

# MD5 of cifar-10-python.tar.gz as published by its authors.
CIFAR10_TARBALL_MD5 = "c58f30108f718f92721af3b95e74349a"

# (resolved path, size, mtime_ns, algorithm) -> digest that matched: repeated loads skip hashing.
_VERIFIED: dict[tuple[str, int, int, str], str] = {}


def _key(path: Path, algorithm: str) -> tuple[str, int, int, str]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, algorithm)


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, expected: str, algorithm: str, *, content: bytes | None = None,
           what: str = "content") -> None:
    """Check `content` (or the file's bytes) against `expected`; DataError naming `path` if not.

    A success is remembered for this path, size and mtime, so the next load does not hash again.
    """
    key = _key(path, algorithm)
    if _VERIFIED.get(key) == expected:
        return
    if content is not None:
        actual = hashlib.new(algorithm, content).hexdigest()
    else:
        actual = file_digest(path, algorithm)
    if actual != expected:
        raise DataError(f"{path} fails verification: {algorithm} of its {what} is "
                        f"{actual[:16]}…, expected {expected[:16]}…; the file is corrupt or not "
                        "the published release: delete it and fetch it again")
    _VERIFIED[key] = expected


def is_verified(path: Path, algorithm: str, expected: str) -> bool:
    """True when `path` (unchanged since) already passed `verify` in this process."""
    try:
        return _VERIFIED.get(_key(path, algorithm)) == expected
    except OSError:
        return False
