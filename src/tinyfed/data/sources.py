"""Find a data set on disk (or fetch it into the cache), verify it, and decode it.

Lookup order for a real data set: `data_dir` (else $TINYFED_DATA), then the user cache
($XDG_CACHE_HOME/tinyfed/<name>, default ~/.cache/tinyfed/<name>), then the system's packaged
copy (/usr/share/datasets/<debian name>/). A folder may hold the files directly or in a
subfolder named after the set. Only then, if allowed, download into the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tinyfed.data import checksums, cifar, idx
from tinyfed.data import download as fetcher
from tinyfed.data.dataset import Dataset, Source, Split, build_dataset
from tinyfed.data.synthetic import make_synthetic
from tinyfed.errors import DataError

DATA_ENV = "TINYFED_DATA"
SYSTEM_DATA_ROOT = Path("/usr/share/datasets")

IDX_FILES: dict[str, str] = {  # role -> file name without .gz
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
SUBFOLDERS: dict[str, tuple[str, ...]] = {
    "fmnist": ("fmnist", "fashion-mnist"),
    "mnist": ("mnist",),
    "cifar10": ("cifar10", "cifar-10"),
}
SYSTEM_FOLDERS: dict[str, tuple[str, ...]] = {
    "fmnist": ("fashion-mnist",),
    "mnist": ("mnist",),
    "cifar10": ("cifar10", "cifar-10"),
}
UPSTREAM: dict[str, tuple[str, ...]] = {
    # S3 website endpoints serve plain HTTP only; the files are verified by digest either way.
    "fmnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
               "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/",),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",),
}
HOW_TO_GET: dict[str, str] = {
    "fmnist": "install it (apt-get install dataset-fashion-mnist), or pass --data-dir DIR "
              "holding the four IDX files",
    "mnist": "pass --data-dir DIR holding the four MNIST IDX files (.gz or not)",
    "cifar10": f"pass --data-dir DIR holding {cifar.TARBALL} or {cifar.FOLDER}/",
}


def cache_dir() -> Path:
    """The user cache root for tinyfed: $XDG_CACHE_HOME/tinyfed or ~/.cache/tinyfed."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "tinyfed"


def _check_name(name: str) -> None:
    if name == "synthetic":
        raise DataError("the synthetic data set is generated in memory and has no files")
    if name not in SUBFOLDERS:
        raise DataError(f"unknown data set {name!r}; the sets with files are "
                        f"{', '.join(SUBFOLDERS)}")


def _candidates(name: str, data_dir: str | os.PathLike[str] | None) -> list[Path]:
    """Every folder that may hold `name`, in lookup order, without duplicates."""
    user = data_dir if data_dir is not None else os.environ.get(DATA_ENV) or None
    found: list[Path] = []
    if user is not None:
        root = Path(user).expanduser()
        if not root.is_dir():
            origin = "data_dir" if data_dir is not None else f"${DATA_ENV}"
            raise DataError(f"{origin} {root} is not a folder; pass an existing folder that "
                            f"holds the {name} files, or leave it unset")
        found += [root, *(root / sub for sub in SUBFOLDERS[name])]
        if name == "cifar10":
            found.append(root / cifar.FOLDER)
    found.append(cache_dir() / name)
    found += [SYSTEM_DATA_ROOT / sub for sub in SYSTEM_FOLDERS[name]]
    return list(dict.fromkeys(found))


def _idx_files(folder: Path) -> dict[str, Path] | None:
    """Role -> path for the four IDX files in `folder` (uncompressed preferred), or None."""
    out = {}
    for role, base in IDX_FILES.items():
        for candidate in (folder / base, folder / f"{base}.gz"):
            if candidate.is_file():
                out[role] = candidate
                break
        else:
            return None
    return out


def _holds(name: str, folder: Path) -> Path | None:
    """The path the loader should read if `folder` holds `name`, else None."""
    if name != "cifar10":
        return folder if _idx_files(folder) else None
    if (folder / cifar.TARBALL).is_file():
        return folder / cifar.TARBALL
    for d in (folder / cifar.FOLDER, folder):
        if all((d / b).is_file() for b in (*cifar.TRAIN_BATCHES, cifar.TEST_BATCH)):
            return d
    return None


def _locate(name: str, data_dir: str | os.PathLike[str] | None) -> tuple[Path | None, list[Path]]:
    places = _candidates(name, data_dir)
    for folder in places:
        hit = _holds(name, folder)
        if hit is not None:
            return hit, places
    return None, places


def _not_found(name: str, places: list[Path], extra: str = "") -> DataError:
    return DataError(f"{name} not found in {', '.join(map(str, places))}{extra}; "
                     f"{HOW_TO_GET[name]}")


def find_dataset_files(name: str, data_dir: str | None = None) -> Path:
    """Where `name` is on disk: the IDX folder, or the CIFAR tarball / batch folder."""
    _check_name(name)
    hit, places = _locate(name, data_dir)
    if hit is None:
        raise _not_found(name, places)
    return hit


def _download(name: str) -> Path:
    """Fetch `name` from upstream (or $TINYFED_MIRROR) into the cache; return what to read."""
    dest = cache_dir() / name
    if name == "cifar10":
        files = [cifar.TARBALL]

        def check(_file: str, path: Path) -> None:
            checksums.verify(path, checksums.CIFAR10_TARBALL_MD5, "md5")
    else:
        files = [f"{base}.gz" for base in IDX_FILES.values()]

        def check(file: str, path: Path) -> None:
            if name == "fmnist":
                base = file.removesuffix(".gz")
                checksums.verify(path, checksums.FMNIST_SHA256[base], "sha256",
                                 content=idx.read_bytes(path), what="decompressed bytes")
            else:
                checksums.verify(path, checksums.MNIST_GZ_MD5[file], "md5")
    fetcher.fetch_all(files, UPSTREAM[name], dest, check)
    hit = _holds(name, dest)
    assert hit is not None  # every file was just fetched
    return hit


def _read_idx_set(name: str, folder: Path) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    files = _idx_files(folder)
    if files is None:
        raise DataError(f"{folder} lacks some of the four {name} IDX files")
    arrays = {}
    for role, path in files.items():
        raw = idx.read_bytes(path)
        if name == "fmnist":
            checksums.verify(path, checksums.FMNIST_SHA256[IDX_FILES[role]], "sha256",
                             content=raw, what="decompressed bytes")
        arrays[role] = idx.parse_idx(raw, path, ndim=3 if role.endswith("_x") else 1)
    for split in ("train", "test"):
        idx.check_pair(arrays[f"{split}_x"], arrays[f"{split}_y"],
                       files[f"{split}_x"], files[f"{split}_y"])
    return ((arrays["train_x"][:, None], arrays["train_y"]),
            (arrays["test_x"][:, None], arrays["test_y"]))


def _fetched(name: str, data_dir: str | None, download: bool) -> Path:
    """The path to read for a file-backed set: found in the lookup order, else downloaded."""
    path, places = _locate(name, data_dir)
    if path is not None:
        return path
    if not download:
        raise _not_found(name, places, " and downloading is off")
    try:
        return _download(name)
    except DataError as e:
        raise _not_found(name, places, f" and {e}") from None


def _load_idx(name: str, data_dir: str | None, download: bool, _size: int) -> tuple[Split, Split]:
    return _read_idx_set(name, _fetched(name, data_dir, download))


def _load_cifar(name: str, data_dir: str | None, download: bool,
                _size: int) -> tuple[Split, Split]:
    path = _fetched(name, data_dir, download)
    if path.is_file():
        checksums.verify(path, checksums.CIFAR10_TARBALL_MD5, "md5")
    return cifar.read_cifar10(path)


def _load_synthetic(name: str, _dir: str | None, _download: bool,
                    size: int) -> tuple[Split, Split]:
    if isinstance(size, bool) or not isinstance(size, int) or size < 10:
        raise DataError(f"synthetic_size must be a whole number >= 10 (got {size!r})")
    return make_synthetic(size)


# Built-in data sets by name: the one list the config, the CLI's help and loading read. A
# loader takes (name, data_dir, download, synthetic_size) and returns uint8 (train, test)
# splits; the entry's constants make them tensors (fixed per set, never computed per run).
SOURCES: dict[str, Source] = {
    "fmnist": Source(_load_idx, (0.2860,), (0.3530,), (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"), (1, 28, 28)),
    "mnist": Source(_load_idx, (0.1307,), (0.3081,), tuple(str(i) for i in range(10)),
                    (1, 28, 28)),
    "cifar10": Source(_load_cifar, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), (
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck"), (3, 32, 32)),
    "synthetic": Source(_load_synthetic, (0.2524,), (0.2043,),
                        tuple(f"pattern-{i}" for i in range(10)), (1, 28, 28)),
}


def load_dataset(name: str, data_dir: str | None = None, *, download: bool = True,
                 synthetic_size: int = 3000) -> Dataset:
    """Find, verify and decode `name` into normalized tensors (see SOURCES), or a user's
    data set by `package.module:factory` (see `data.user`)."""
    from tinyfed.data.user import is_user_name, load_user_dataset

    if is_user_name(name):
        return load_user_dataset(name)
    source = SOURCES.get(name)
    if source is None:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(SOURCES)} or "
                        f"package.module:factory")
    train, test = source.load(name, data_dir, download, synthetic_size)
    return build_dataset(name, train, test, source)
