"""A user's own data set, from Python or by import path, checked into the same `Dataset` the
built-in sets become, so it goes through the same partitioners, histograms and byte counts.

Accepted forms (from a `package.module:factory` that returns one, or given to `tinyfed.run`):

- a `Dataset`;
- a dict with `train_x`, `train_y`, `test_x`, `test_y` (and optionally `classes`);
- a 4-tuple `(train_x, train_y, test_x, test_y)`;
- a pair `(train, test)` of `torch.utils.data.Dataset`s whose items are `(x, label)`.

Images are float tensors N×C×H×W (N×H×W gets a channel; N×D is taken as 1×1×D), labels
integers in [0, number of classes). Anything else is a `DataError` naming what is wrong.
A data set given as a Python object lives in this process only (`register`): runtimes that
start other processes need the `module:factory` form, which every process can import.
"""

from __future__ import annotations

from typing import Any

import torch

from tinyfed.data.dataset import Dataset
from tinyfed.errors import DataError
from tinyfed.importpath import load_callable

REGISTERED: dict[str, Any] = {}  # name -> object, for data sets given from Python
MAX_CLASSES = 10_000
LOCAL_PREFIX = "python:"  # names of data sets that exist in this process only


def register(obj: Any, name: str | None = None) -> str:
    """Remember a data set object under a name a config can carry; returns that name."""
    name = name or f"{LOCAL_PREFIX}{type(obj).__name__}-{id(obj):x}"
    REGISTERED[name] = obj
    return name


def is_user_name(name: str) -> bool:
    return name in REGISTERED or (":" in name and all(name.split(":", 1)))


def load_user_dataset(name: str) -> Dataset:
    """The data set a registered name or `package.module:factory` stands for, checked."""
    obj = REGISTERED.get(name)
    if obj is None:
        if name.startswith(LOCAL_PREFIX):
            raise DataError(f"dataset {name!r} was given as a Python object in another process; "
                            "use a 'package.module:factory' name for runtimes that start "
                            "processes")
        factory = load_callable(name, "dataset", DataError)
        try:
            obj = factory()
        except Exception as exc:  # noqa: BLE001 - the user's code: report it in one line
            raise DataError(f"dataset {name!r}: the factory raised {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}"[:300]) from None
    return as_dataset(obj, name)


def as_dataset(obj: Any, name: str) -> Dataset:
    """`obj` in one of the accepted forms as a checked Dataset."""
    if isinstance(obj, Dataset):
        parts, classes = (obj.train_x, obj.train_y, obj.test_x, obj.test_y), obj.classes
    elif isinstance(obj, dict):
        missing = [k for k in ("train_x", "train_y", "test_x", "test_y") if k not in obj]
        if missing:
            raise DataError(f"dataset {name!r}: the dict lacks {', '.join(missing)}")
        parts = (obj["train_x"], obj["train_y"], obj["test_x"], obj["test_y"])
        classes = obj.get("classes")
    elif isinstance(obj, (tuple, list)) and len(obj) == 4:
        parts, classes = tuple(obj), None
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        parts = (*_materialize(obj[0], name, "train"), *_materialize(obj[1], name, "test"))
        classes = getattr(obj[0], "classes", None)
    else:
        raise DataError(f"dataset {name!r}: got {type(obj).__name__}; expected a dict of "
                        "train_x/train_y/test_x/test_y, a 4-tuple of tensors, or a pair of "
                        "torch Datasets (train, test)")
    train_x, test_x = (_images(x, name, split) for x, split in ((parts[0], "train"),
                                                                 (parts[2], "test")))
    train_y, test_y = (_labels(y, name, split) for y, split in ((parts[1], "train"),
                                                                 (parts[3], "test")))
    for x, y, split in ((train_x, train_y, "train"), (test_x, test_y, "test")):
        if len(x) != len(y):
            raise DataError(f"dataset {name!r}: {split} has {len(x)} images but {len(y)} labels")
        if len(y) == 0:
            raise DataError(f"dataset {name!r}: the {split} split is empty")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(f"dataset {name!r}: train images are {tuple(train_x.shape[1:])} but "
                        f"test images are {tuple(test_x.shape[1:])}")
    count = int(max(train_y.max(), test_y.max())) + 1
    if classes is None and count > MAX_CLASSES:
        raise DataError(f"dataset {name!r}: label {count - 1} implies {count} classes; at most "
                        f"{MAX_CLASSES} are allowed")
    if classes is None:
        classes = tuple(str(i) for i in range(count))
    classes = tuple(str(c) for c in classes)
    for y, split in ((train_y, "train"), (test_y, "test")):
        bad = (y < 0) | (y >= len(classes))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise DataError(f"dataset {name!r}: {split} label {int(y[i])} at index {i} is "
                            f"outside [0, {len(classes)}) (the number of classes)")
    return Dataset(name, train_x, train_y, test_x, test_y, classes)


def _images(x: Any, name: str, split: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        raise DataError(f"dataset {name!r}: {split} images are {x.dtype}; float tensors "
                        "(normalized as you want them trained) are required")
    if x.dim() == 2:
        x = x.reshape(x.shape[0], 1, 1, x.shape[1])
    elif x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise DataError(f"dataset {name!r}: {split} images have shape {tuple(x.shape)}; "
                        "N×C×H×W, N×H×W or N×D is required")
    x = x.to(torch.float32).contiguous()
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise DataError(f"dataset {name!r}: {split} images hold NaN or infinite values")
    return x


def _labels(y: Any, name: str, split: str) -> torch.Tensor:
    y = torch.as_tensor(y)
    if y.is_floating_point() or y.dtype == torch.bool or y.dim() != 1:
        raise DataError(f"dataset {name!r}: {split} labels must be a 1-D integer tensor, got "
                        f"{y.dtype} of shape {tuple(y.shape)}")
    return y.to(torch.int64).contiguous()


def _materialize(ds: Any, name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A torch Dataset's items stacked into (images, labels)."""
    try:
        n = len(ds)
        items = [ds[i] for i in range(n)]
        xs = torch.stack([torch.as_tensor(item[0]) for item in items])
        ys = torch.tensor([int(item[1]) for item in items])
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's Dataset: report it in one line
        raise DataError(f"dataset {name!r}: cannot read the {split} Dataset's (x, label) items "
                        f"({type(exc).__name__}: {exc})"[:300]) from None
    return xs, ys
