"""Split a training set among clients: IID, the FedAvg paper's shards, Dirichlet, ranges, classes.

Every scheme is a pure function of (labels, arguments, seed): it draws from its own
`np.random.default_rng(seed)`, never from global state, so every runtime and every resumed run
sees the same split. Each client's indices come back sorted ascending and disjoint from the
others'. Schemes that split into equal parts (iid, ranges without range_size) drop the last
N mod num_clients examples of their order, so every client holds exactly N // num_clients, as in
the paper (100 clients × 600); shards refuses sizes that do not divide.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import numpy as np
import torch

from tinyfed.errors import DataError


def _as_labels(labels: torch.Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    """A 1-D int64 numpy array of non-negative class ids."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"labels must be a non-empty 1-D integer array (got dtype {arr.dtype}, "
                        f"shape {arr.shape})")
    if arr.min() < 0:
        raise DataError(f"labels must be class ids >= 0 (found {arr.min()})")
    return arr.astype(np.int64, copy=False)


def _positive(field: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"{field} must be a whole number >= 1 (got {value!r})")


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _iid(n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    size = n // k
    return _finish(np.split(rng.permutation(n)[: size * k], k))


def _shards(labels: np.ndarray, k: int, per_client: int, rng: np.random.Generator
            ) -> list[np.ndarray]:
    n, count = labels.size, k * per_client
    if n % count:
        raise DataError(
            f"shards: {n} examples do not divide into {count} shards (num_clients={k} × "
            f"shards_per_client={per_client}); choose values whose product divides {n}"
        )
    shards = np.argsort(labels, kind="stable").reshape(count, n // count)
    order = rng.permutation(count).reshape(k, per_client)
    return _finish([shards[row].ravel() for row in order])


def _dirichlet(labels: np.ndarray, k: int, alpha: float, min_size: int, max_retries: int,
               rng: np.random.Generator) -> list[np.ndarray]:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (
            math.isfinite(alpha) and alpha > 0):
        raise DataError(f"dirichlet alpha must be a finite number > 0 (got {alpha!r}); "
                        "small alpha (0.1) is very skewed, large alpha (100) is nearly IID")
    _positive("min_size", min_size)
    _positive("max_retries", max_retries)
    hint = (f"(alpha={alpha}, min_size={min_size}, num_clients={k}, {labels.size} examples); "
            "raise alpha, lower min_size or use fewer clients")
    if k * min_size > labels.size:
        raise DataError(f"dirichlet: {k} clients × min_size {min_size} exceed the data {hint}")
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(max_retries):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        for idx in by_class:
            share = rng.dirichlet(np.full(k, float(alpha)))
            cuts = (np.cumsum(share)[:-1] * idx.size).astype(np.int64)
            for client, piece in enumerate(np.split(rng.permutation(idx), cuts)):
                parts[client].append(piece)
        merged = [np.concatenate(p) for p in parts]
        if min(p.size for p in merged) >= min_size:
            return _finish(merged)
    raise DataError(f"dirichlet: no split gave every client >= min_size examples in "
                    f"max_retries={max_retries} tries {hint}")


def _ranges(n: int, k: int, range_size: int | None) -> list[np.ndarray]:
    if range_size is None:
        range_size = n // k
    else:
        _positive("range_size", range_size)
        if k * range_size > n:
            raise DataError(f"ranges: num_clients={k} × range_size={range_size} = "
                            f"{k * range_size} exceeds the {n} examples; lower either")
    return [np.arange(i * range_size, (i + 1) * range_size, dtype=np.int64) for i in range(k)]


def _classes(labels: np.ndarray, k: int, per_client: int, rng: np.random.Generator
             ) -> list[np.ndarray]:
    present = np.unique(labels)
    if isinstance(per_client, bool) or not isinstance(per_client, (int, np.integer)) \
            or not 1 <= per_client <= present.size:
        raise DataError(f"classes_per_client must be between 1 and {present.size} "
                        f"(the number of classes in the data) (got {per_client!r})")
    # Deal classes round-robin from a seeded order: client i takes k consecutive entries
    # (mod C), so its labels are distinct and each class goes to floor/ceil(K·k/C) clients.
    order = rng.permutation(present)
    holders: dict[int, list[int]] = {int(c): [] for c in present}
    for client in range(k):
        for j in range(per_client):
            holders[int(order[(client * per_client + j) % present.size])].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(k)]
    for c, clients in holders.items():
        if not clients:
            continue
        idx = rng.permutation(np.flatnonzero(labels == c))
        for client, piece in zip(clients, np.array_split(idx, len(clients)), strict=True):
            parts[client].append(piece)
    merged = [np.concatenate(p) for p in parts]
    empty = [i for i, p in enumerate(merged) if p.size == 0]
    if empty:
        raise DataError(f"classes: client {empty[0]} would get no examples; some class has "
                        "fewer examples than clients holding it: use fewer clients")
    return _finish(merged)


def partition(
    labels: torch.Tensor | np.ndarray,
    num_clients: int,
    scheme: str,
    *,
    seed: int,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    classes_per_client: int = 2,
    min_size: int = 10,
    range_size: int | None = None,
    max_retries: int = 100,
) -> list[np.ndarray]:
    """One sorted int64 index array per client, disjoint, by `scheme` (see PARTITIONS).

    - iid: a seeded permutation cut into equal parts (the N mod num_clients rest is dropped).
    - shards: sort by label (stable), cut into num_clients·shards_per_client equal shards,
      give each client shards_per_client random ones; N must divide evenly.
    - dirichlet: per class, shares ~ Dirichlet(alpha) over clients; redrawn (at most
      max_retries times) until every client holds >= min_size examples.
    - ranges: contiguous slices in the data's order; equal parts, or [i·r, (i+1)·r) with r =
      range_size.
    - classes: each client gets classes_per_client distinct labels, spread as evenly as
      possible; a class's examples are split evenly among the clients holding it.
    """
    if scheme not in PARTITIONS:
        raise DataError(f"unknown partition scheme {scheme!r}; choose one of "
                        f"{', '.join(PARTITIONS)}")
    y = _as_labels(labels)
    _positive("num_clients", num_clients)
    if num_clients > y.size:
        raise DataError(f"num_clients={num_clients} exceeds the {y.size} examples; "
                        f"use at most {y.size} clients")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise DataError(f"seed must be an integer (got {seed!r})")
    options = dict(alpha=alpha, shards_per_client=shards_per_client,
                   classes_per_client=classes_per_client, min_size=min_size,
                   range_size=range_size, max_retries=max_retries)
    return SCHEMES[scheme](y, int(num_clients), np.random.default_rng(seed), options)


def _shards_scheme(y, k, rng, o) -> list[np.ndarray]:
    _positive("shards_per_client", o["shards_per_client"])
    return _shards(y, k, int(o["shards_per_client"]), rng)


# The partition schemes by name: the one list the config, the CLI and `partition` read.
SCHEMES: dict[str, Callable[[np.ndarray, int, np.random.Generator, dict], list[np.ndarray]]] = {
    "iid": lambda y, k, rng, o: _iid(y.size, k, rng),
    "shards": _shards_scheme,
    "dirichlet": lambda y, k, rng, o: _dirichlet(y, k, o["alpha"], o["min_size"],
                                                 o["max_retries"], rng),
    "ranges": lambda y, k, rng, o: _ranges(y.size, k, o["range_size"]),
    "classes": lambda y, k, rng, o: _classes(y, k, o["classes_per_client"], rng),
}
PARTITIONS: tuple[str, ...] = tuple(SCHEMES)


def label_histogram(labels: torch.Tensor | np.ndarray, parts: list[np.ndarray],
                    num_classes: int) -> list[list[int]]:
    """For each client, how many of its examples carry each class id 0..num_classes-1."""
    y = _as_labels(labels)
    _positive("num_classes", num_classes)
    if int(y.max()) >= num_classes:
        raise DataError(f"labels hold class {int(y.max())} but num_classes={num_classes}")
    return [np.bincount(y[np.asarray(p, dtype=np.int64)], minlength=num_classes).tolist()
            for p in parts]
