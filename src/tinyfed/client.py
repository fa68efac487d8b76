"""Local training and evaluation: the same pure function in every runtime.

A client's result depends only on (global weights, its shard, the round's settings, its seed),
so the in-process, pipe and HTTP runtimes produce bit-identical updates.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from tinyfed.layout import channels_last, channels_last_safe

Tensors = dict[str, torch.Tensor]
EVAL_BATCH = 1000


@dataclass(frozen=True)
class TrainSettings:
    """What the server asks a client to do this round."""

    epochs: int = 1
    batch_size: int = 10  # 0 = the whole shard, one step per epoch (FedSGD)
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def plain_sgd(self) -> bool:
        """The optimizer step is w -= lr·g and nothing else."""
        return self.optimizer == "sgd" and self.momentum == 0 and self.weight_decay == 0

    def batch_for(self, n: int) -> int:
        """The minibatch for a shard of n examples: B, or the whole shard (B=0, or B > n)."""
        return n if self.batch_size <= 0 else min(self.batch_size, n)


@dataclass
class Shard:
    """One client's private examples."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


def task_seed(run_seed: int, round_num: int, client_id: int) -> int:
    """A seed for one client in one round, stable across processes and machines."""
    digest = hashlib.sha256(f"tinyfed:{run_seed}:{round_num}:{client_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# Client optimizers by name: the one list the config, the CLI and training read.
OPTIMIZERS = {
    "sgd": lambda params, s: torch.optim.SGD(params, lr=s.lr, momentum=s.momentum,
                                             weight_decay=s.weight_decay),
    "adam": lambda params, s: torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay),
}


class PlainSGD:
    """w -= lr·g for every parameter with a gradient: `torch.optim.SGD`'s step without momentum
    or weight decay, bit for bit (tested). Written out because torch.optim's first use in a
    process imports torch._dynamo (about 1 s here, 800 modules), paid by every child and actor,
    and its per-step Python holds the GIL that in-process lanes share."""

    def __init__(self, params, lr: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr = lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        stepped = [p for p in self.params if p.grad is not None]
        if stepped:
            torch._foreach_add_(stepped, [p.grad for p in stepped], alpha=-self.lr)


def make_optimizer(params, settings: TrainSettings) -> torch.optim.Optimizer | PlainSGD:
    """A fresh optimizer every round: no optimizer state crosses rounds."""
    if settings.plain_sgd:
        return PlainSGD(params, settings.lr)
    make = OPTIMIZERS.get(settings.optimizer)
    if make is None:
        raise ValueError(f"unknown optimizer {settings.optimizer!r}; allowed: "
                         f"{', '.join(OPTIMIZERS)}")
    return make(params, settings)


def optimizer_slots(optimizer: str, momentum: float) -> int:
    """Model-sized buffers the optimizer keeps (Adam's two moments, SGD's momentum), for
    memory estimates."""
    return 2 if optimizer == "adam" else (1 if momentum > 0 else 0)


def train(model: nn.Module, shard: Shard, settings: TrainSettings, seed: int,
          correct: Callable[[], None] | None = None) -> dict[str, float]:
    """Run E epochs of minibatch training in place; return local metrics of the last epoch.
    `correct` (a client algorithm's, e.g. FedProx's proximal term) adjusts the gradients
    before each optimizer step."""
    start = time.perf_counter()
    n = len(shard)
    batch = settings.batch_for(n)
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model.parameters(), settings)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    steps = 0
    loss_sum = torch.zeros(())
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=gen)
        loss_sum.zero_()
        for lo in range(0, n, batch):
            idx = order[lo : lo + batch]
            xb, yb = shard.x[idx], shard.y[idx]
            opt.zero_grad(set_to_none=True)
            out = model(xb)
            loss = loss_fn(out, yb)
            loss.backward()
            if correct is not None:
                correct()
            opt.step()
            loss_sum.add_(loss.detach(), alpha=len(idx))  # one op, no Python float per step
            steps += 1
    return {
        "train_loss": float(loss_sum) / max(n, 1),
        "steps": steps,
        "train_seconds": time.perf_counter() - start,
    }


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Torch's thread count set for a block, then restored (None: left as it is)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
             threads: int | None = None) -> dict:
    """Accuracy, mean loss and the confusion matrix (rows: true class, columns: predicted).
    `threads`: torch threads for this call only (training's setting is restored after)."""
    with torch_threads(threads), channels_last(model, channels_last_safe(model)):
        return _evaluate(model, x, y, num_classes)


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict:
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss = 0.0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for lo in range(0, len(y), EVAL_BATCH):
        xb, yb = x[lo : lo + EVAL_BATCH], y[lo : lo + EVAL_BATCH]
        out = model(xb)
        total_loss += float(loss_fn(out, yb))
        pred = out.argmax(1)
        confusion += torch.bincount(yb * num_classes + pred, minlength=num_classes**2).view(
            num_classes, num_classes
        )
    n = max(len(y), 1)
    return {
        "accuracy": float(confusion.diag().sum()) / n,
        "loss": total_loss / n,
        "confusion": confusion,
    }
