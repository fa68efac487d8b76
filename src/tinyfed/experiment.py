"""An experiment made concrete: the data, each client's shard, and the initial global model.

Every runtime (and every child process or remote client that holds a copy of the config)
rebuilds the same shards from the same config, so data never travels over a transport.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from tinyfed import wire
from tinyfed.client import Shard
from tinyfed.config import Config
from tinyfed.data import Dataset, label_histogram, load_dataset, partition
from tinyfed.data.shared import SharedExamples, attach, client_order, client_rows, publish
from tinyfed.models import build_model, count_parameters, state_of
from tinyfed.wire import Tensors, TensorSpec


def load_data(config: Config) -> Dataset:
    return load_dataset(config.dataset, config.data_dir, synthetic_size=config.synthetic_size)


def split(config: Config, dataset: Dataset) -> list[np.ndarray]:
    """The partition of the training set among clients, seeded by the run seed."""
    return partition(
        dataset.train_y,
        config.clients,
        config.partition,
        seed=config.seed,
        alpha=config.alpha,
        shards_per_client=config.shards_per_client,
        classes_per_client=config.classes_per_client,
        min_size=config.min_partition_size,
        range_size=config.range_size,
    )


def shard_of(dataset: Dataset, parts: list[np.ndarray], client_id: int) -> Shard:
    idx = torch.as_tensor(parts[client_id], dtype=torch.int64)
    return Shard(dataset.train_x[idx], dataset.train_y[idx])


@dataclass
class Experiment:
    config: Config
    dataset: Dataset
    parts: list[np.ndarray]
    initial: Tensors
    spec: dict[str, TensorSpec]
    num_parameters: int
    _layout: tuple[torch.Tensor, torch.Tensor, list[int]] | None = field(default=None,
                                                                         repr=False)
    examples: SharedExamples | None = None  # the clients' examples in a shared memory file

    @classmethod
    def build(cls, config: Config) -> Experiment:
        dataset = load_data(config)
        parts = split(config, dataset)
        model = build_model(config.model, dataset.input_shape, dataset.num_classes, config.seed)
        initial = state_of(model)
        return cls(config, dataset, parts, initial, wire.spec_of(initial), count_parameters(model))

    @property
    def client_ids(self) -> list[int]:
        return list(range(self.config.clients))

    def shard(self, client_id: int) -> Shard:
        """A view into one contiguous copy of every client's examples, made on first use: no
        copy per client in a round (the same rows, in the same order, as indexing gives)."""
        if self._layout is None:
            order, starts = client_order(self.parts)
            self._layout = (self.dataset.train_x[order], self.dataset.train_y[order], starts)
        xs, ys, starts = self._layout
        rows = client_rows(starts, client_id)
        return Shard(xs[rows], ys[rows])

    def share_examples(self) -> SharedExamples:
        """Move the clients' examples into one anonymous memory file that child processes map
        read-only (`data.shared`). This process then holds that copy only: its training set
        becomes the file's layout (client after client) and the partition ranges into it, so
        shards, sizes and histograms are unchanged and the original copy is freed."""
        if self.examples is None:
            ds = self.dataset
            desc = publish(ds.train_x, ds.train_y, self.parts, ds.num_classes)
            x, y = attach(desc)
            self.dataset = dataclasses.replace(ds, train_x=x, train_y=y)
            self.parts = [np.arange(lo, hi, dtype=np.int64)
                          for lo, hi in zip(desc.starts, desc.starts[1:])]
            self._layout = (x, y, list(desc.starts))
            self.examples = desc
            weakref.finalize(self, os.close, desc.fd)  # the memory goes with the last map
        return self.examples

    def shard_size(self, client_id: int) -> int:
        return int(len(self.parts[client_id]))

    def histogram(self) -> list[list[int]]:
        return label_histogram(self.dataset.train_y, self.parts, self.dataset.num_classes)

    def new_model(self) -> torch.nn.Module:
        return build_model(self.config.model, self.dataset.input_shape, self.dataset.num_classes,
                           self.config.seed)
