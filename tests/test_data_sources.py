"""Finding, verifying, downloading and decoding data sets, on small files the tests write.

No test touches the network: downloads are served by a local http.server on 127.0.0.1, and the
user cache and the system data folder are redirected to tmp_path.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import socket
import struct
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyfed.data import checksums, cifar, download, find_dataset_files, load_dataset, sources
from tinyfed.errors import DataError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_BASES = list(sources.IDX_FILES.values())


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh cache, no system data, no mirror or data env, and no remembered verifications."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "SYSTEM_DATA_ROOT", tmp_path / "system")
    for var in (download.MIRROR_ENV, sources.DATA_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(checksums, "_VERIFIED", {})


def idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx_set(folder: Path, gz: bool, n_train: int = 40, n_test: int = 10, seed: int = 0
                  ) -> dict[str, np.ndarray]:
    """Four small MNIST-format files; returns the arrays by file base name."""
    rng = np.random.default_rng(seed)
    arrays = {
        IDX_BASES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        IDX_BASES[1]: (np.arange(n_train) % 10).astype(np.uint8),
        IDX_BASES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        IDX_BASES[3]: (np.arange(n_test) % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for base, arr in arrays.items():
        raw = idx_bytes(arr)
        if gz:
            (folder / f"{base}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / base).write_bytes(raw)
    return arrays


def sha256_of_set(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    return {b: hashlib.sha256(idx_bytes(a)).hexdigest() for b, a in arrays.items()}


def one_line_error(excinfo: pytest.ExceptionInfo[DataError]) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# --- IDX ---------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_load_and_normalize(tmp_path: Path, gz: bool) -> None:
    arrays = write_idx_set(tmp_path / "d", gz)
    ds = load_dataset("mnist", str(tmp_path / "d"), download=False)
    assert ds.train_x.shape == (40, 1, 28, 28) and ds.test_x.shape == (10, 1, 28, 28)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.train_y.tolist() == arrays[IDX_BASES[1]].tolist()
    expected = (torch.from_numpy(arrays[IDX_BASES[0]][3]).float() / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(ds.train_x[3, 0], expected)


def test_lookup_order_subfolder_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_idx_set(tmp_path / "mine" / "mnist", gz=True)
    assert find_dataset_files("mnist", str(tmp_path / "mine")) == tmp_path / "mine" / "mnist"
    monkeypatch.setenv(sources.DATA_ENV, str(tmp_path / "mine"))
    assert find_dataset_files("mnist") == tmp_path / "mine" / "mnist"
    write_idx_set(tmp_path / "cache" / "tinyfed" / "mnist", gz=True)
    assert find_dataset_files("mnist") == tmp_path / "mine" / "mnist"  # data dir first
    monkeypatch.delenv(sources.DATA_ENV)
    assert find_dataset_files("mnist") == tmp_path / "cache" / "tinyfed" / "mnist"
    write_idx_set(tmp_path / "system" / "fashion-mnist", gz=True)
    assert find_dataset_files("fmnist") == tmp_path / "system" / "fashion-mnist"


def test_missing_data_names_every_place_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("fmnist", str(tmp_path), download=False)
    msg = one_line_error(info)
    for place in (tmp_path, tmp_path / "fashion-mnist", tmp_path / "cache" / "tinyfed" / "fmnist",
                  tmp_path / "system" / "fashion-mnist"):
        assert str(place) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg
    with pytest.raises(DataError, match="not a folder"):
        load_dataset("mnist", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="choose one of fmnist, mnist, cifar10, synthetic or "
                                        "package.module:factory"):
        load_dataset("imagenet")


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_file_is_named(tmp_path: Path, gz: bool) -> None:
    write_idx_set(tmp_path, gz)
    name = IDX_BASES[0] + (".gz" if gz else "")
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated") as info:
        load_dataset("mnist", str(tmp_path), download=False)
    assert name in one_line_error(info)


def test_wrong_magic_and_mismatched_labels(tmp_path: Path) -> None:
    arrays = write_idx_set(tmp_path, gz=False)
    (tmp_path / IDX_BASES[0]).write_bytes(idx_bytes(arrays[IDX_BASES[1]]))  # labels as images
    with pytest.raises(DataError, match="magic") as info:
        load_dataset("mnist", str(tmp_path), download=False)
    assert IDX_BASES[0] in one_line_error(info)
    write_idx_set(tmp_path, gz=False)
    (tmp_path / IDX_BASES[1]).write_bytes(idx_bytes(np.zeros(39, np.uint8)))
    with pytest.raises(DataError, match="39 labels"):
        load_dataset("mnist", str(tmp_path), download=False)
    (tmp_path / IDX_BASES[1]).write_bytes(idx_bytes(np.full(40, 10, np.uint8)))
    with pytest.raises(DataError, match="label 10"):
        load_dataset("mnist", str(tmp_path), download=False)
    (tmp_path / IDX_BASES[1]).write_bytes(b"\x00\x00\x08")
    with pytest.raises(DataError, match="not an IDX file"):
        load_dataset("mnist", str(tmp_path), download=False)


def test_fmnist_checksum_mismatch_and_match(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    arrays = write_idx_set(tmp_path, gz=True)
    with pytest.raises(DataError, match="fails verification") as info:
        load_dataset("fmnist", str(tmp_path), download=False)
    assert "train-images-idx3-ubyte.gz" in one_line_error(info)
    digests = sha256_of_set(arrays)
    for base, digest in digests.items():
        monkeypatch.setitem(checksums.FMNIST_SHA256, base, digest)
    ds = load_dataset("fmnist", str(tmp_path), download=False)
    assert ds.classes[0] == "T-shirt/top" and ds.train_x.shape[0] == 40
    img = tmp_path / f"{IDX_BASES[2]}.gz"
    assert checksums.is_verified(img, "sha256", digests[IDX_BASES[2]])
    other = write_idx_set(tmp_path / "other", gz=True, seed=9)[IDX_BASES[2]]
    img.write_bytes(gzip.compress(idx_bytes(other)))  # replaced: the stamp must not vouch for it
    os.utime(img, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(DataError, match="fails verification"):
        load_dataset("fmnist", str(tmp_path), download=False)


@pytest.mark.realdata
@pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason=f"Fashion-MNIST not installed at {FMNIST_DIR} "
                    "(apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "SYSTEM_DATA_ROOT", FMNIST_DIR.parent)
    assert find_dataset_files("fmnist") == FMNIST_DIR
    ds = load_dataset("fmnist", download=False)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.train_y).tolist() == [6000] * 10
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10
    assert abs(ds.train_x.mean().item()) < 0.01 and abs(ds.train_x.std().item() - 1) < 0.01
    for base, digest in checksums.FMNIST_SHA256.items():
        path = next(FMNIST_DIR.glob(base + "*"))
        assert checksums.is_verified(path, "sha256", digest)


# --- download ----------------------------------------------------------------------------

@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, folder): a local HTTP server on 127.0.0.1 serving that folder."""
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", root
    finally:
        server.shutdown()
        server.server_close()


def test_download_verifies_into_cache(served: tuple[str, Path], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    url, root = served
    arrays = write_idx_set(root, gz=True)
    for base in arrays:
        gz = root / f"{base}.gz"
        monkeypatch.setitem(checksums.MNIST_GZ_MD5, gz.name,
                            hashlib.md5(gz.read_bytes()).hexdigest())
    monkeypatch.setenv(download.MIRROR_ENV, url)
    ds = load_dataset("mnist")
    assert ds.train_y.tolist() == arrays[IDX_BASES[1]].tolist()
    cached = tmp_path / "cache" / "tinyfed" / "mnist"
    assert sorted(p.name for p in cached.iterdir()) == sorted(f"{b}.gz" for b in arrays)
    monkeypatch.setenv(download.MIRROR_ENV, "http://127.0.0.1:9/")  # cache hit: no request
    assert load_dataset("mnist", download=False).train_x.shape == (40, 1, 28, 28)


def test_download_with_bad_checksum_leaves_nothing(served: tuple[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    url, root = served
    write_idx_set(root, gz=True)
    monkeypatch.setenv(download.MIRROR_ENV, url)
    with pytest.raises(DataError, match="rejected.*fails verification") as info:
        load_dataset("fmnist")
    assert url + "train-images-idx3-ubyte.gz" in one_line_error(info)
    cached = tmp_path / "cache" / "tinyfed" / "fmnist"
    assert list(cached.iterdir()) == []  # no partial or unverified file


def test_download_missing_file_is_http_error(served: tuple[str, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = served
    monkeypatch.setenv(download.MIRROR_ENV, url)
    with pytest.raises(DataError, match="HTTP 404"):
        load_dataset("mnist")


def test_unreachable_mirror_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(download.MIRROR_ENV, f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(DataError, match="Connection refused") as info:
        load_dataset("cifar10")
    assert time.monotonic() - start < download.TIMEOUT_S
    assert f"http://127.0.0.1:{port}/cifar-10-python.tar.gz" in one_line_error(info)


def test_file_url_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = write_idx_set(tmp_path / "mirror", gz=True)
    for base in arrays:
        monkeypatch.setitem(checksums.FMNIST_SHA256, base, sha256_of_set(arrays)[base])
    monkeypatch.setenv(download.MIRROR_ENV, (tmp_path / "mirror").as_uri())
    assert load_dataset("fmnist").test_x.shape == (10, 1, 28, 28)


# --- CIFAR-10 ----------------------------------------------------------------------------

def cifar_batch(n: int, seed: int, protocol: int) -> tuple[bytes, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    batch = {b"batch_label": b"training batch", b"labels": labels, b"data": data,
             b"filenames": [f"img{i}.png".encode() for i in range(n)]}
    return pickle.dumps(batch, protocol=protocol), data, labels


def write_cifar(folder: Path, protocol: int = 2) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    datas = []
    for i, name in enumerate((*cifar.TRAIN_BATCHES, cifar.TEST_BATCH)):
        raw, data, _ = cifar_batch(6, i, protocol)
        (folder / name).write_bytes(raw)
        datas.append(data)
    return datas


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_cifar_batches_load(tmp_path: Path, protocol: int) -> None:
    datas = write_cifar(tmp_path / cifar.FOLDER, protocol)
    ds = load_dataset("cifar10", str(tmp_path), download=False)
    assert ds.train_x.shape == (30, 3, 32, 32) and ds.test_x.shape == (6, 3, 32, 32)
    assert ds.input_shape == (3, 32, 32) and ds.classes[0] == "airplane"
    first = torch.from_numpy(datas[0][0]).float().view(3, 32, 32) / 255  # R, G then B planes
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    torch.testing.assert_close(ds.train_x[0], (first - mean) / std)


def test_cifar_tarball_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar(tmp_path / "src" / cifar.FOLDER)
    tarball = tmp_path / "data" / cifar.TARBALL
    tarball.parent.mkdir()
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "src" / cifar.FOLDER, arcname=cifar.FOLDER)
    with pytest.raises(DataError, match="fails verification"):
        load_dataset("cifar10", str(tmp_path / "data"), download=False)
    monkeypatch.setattr(checksums, "CIFAR10_TARBALL_MD5",
                        hashlib.md5(tarball.read_bytes()).hexdigest())
    assert load_dataset("cifar10", str(tmp_path / "data")).train_x.shape[0] == 30


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_cifar_refuses_malicious_pickle(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": Exploit(marker)}, protocol=2))
    with pytest.raises(DataError, match=r"refusing to unpickle (posix|os)\.system") as info:
        load_dataset("cifar10", str(tmp_path), download=False)
    assert "data_batch_3" in one_line_error(info)
    assert not marker.exists()


def test_cifar_restricted_unpickler_rejects_other_callables() -> None:
    raw = pickle.dumps({b"data": io.BytesIO(b"x")})
    with pytest.raises(DataError, match="refusing to unpickle _io.BytesIO"):
        cifar.load_batch(raw, "batch")
    raw, _, _ = cifar_batch(2, 0, 2)
    with pytest.raises(DataError, match="not a readable"):
        cifar.load_batch(raw[:-20], "batch")
