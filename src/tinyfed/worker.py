"""The client side of a run, set up from its config, the same way in every process that trains.

A child process, a Ray actor, a `tinyfed client` device and the in-process runtime all call
`build_worker`, so threads, deterministic kernels, data loading and sharding cannot drift apart
between runtimes (they once did: the copies disagreed on which codecs keep state).
"""

from __future__ import annotations

import os

import torch

from tinyfed.client import Shard, TrainSettings, make_optimizer
from tinyfed.config import Config
from tinyfed.data.shared import SharedExamples, attach, client_rows
from tinyfed.experiment import load_data, shard_of, split
from tinyfed.protocol import ClientWorker
from tinyfed.trainers import choose


def configure_torch(config: Config, threads: int | None = None) -> None:
    """One thread and deterministic kernels when results must be bit-identical across
    runtimes; else `threads` (the caller's share of the cores), or the config's `threads`
    (0: one per core)."""
    if config.deterministic:
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        return
    wanted = threads if threads is not None else config.threads
    torch.set_num_threads(max(1, int(wanted or os.cpu_count() or 1)))


def build_worker(config: Config, threads: int | None = None,
                 examples: SharedExamples | None = None) -> ClientWorker:
    """Torch set up, the shards (views into the examples a parent shares, or rebuilt from the
    config after loading the data set), a ClientWorker."""
    configure_torch(config, threads)
    if examples is not None:
        x, y = attach(examples)

        def shard(cid: int) -> Shard:  # a view into the parent's one copy
            rows = client_rows(examples.starts, cid)
            return Shard(x[rows], y[rows])

        worker = ClientWorker(config.model, examples.shape, examples.num_classes, shard,
                              max_frame=config.max_frame, trainer=config.trainer)
    else:
        dataset = load_data(config)
        parts = split(config, dataset)
        worker = ClientWorker(config.model, dataset.input_shape, dataset.num_classes,
                              lambda cid: shard_of(dataset, parts, cid),
                              max_frame=config.max_frame, trainer=config.trainer)
    # torch's first optimizer imports torch._dynamo (~800 modules, 1 s): pay it while
    # starting, not inside the first round's deadline; the fused trainer and plain SGD need none.
    if choose(worker.model, config.trainer, config.optimizer).name == "autograd":
        make_optimizer(worker.model.parameters(), TrainSettings(
            optimizer=config.optimizer, lr=config.lr, momentum=config.momentum,
            weight_decay=config.weight_decay))
    return worker
