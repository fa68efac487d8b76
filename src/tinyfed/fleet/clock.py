"""The simulated clock and energy meter of one task, from a device profile and real sizes.

A task takes: a round trip and the download of its real task frame; training for its real
number of examples × epochs at the profile's FLOP rate (the model's forward + backward FLOPs per
example, counted by torch); a round trip and the upload of its real update frame, stretched by
the uplink's duty cycle (at 1 % a second on air costs a hundred). Energy is the radio's per
byte each way plus the compute's per GFLOP. Nothing here is measured on this machine: only the
frame sizes and the example counts are real.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tinyfed.bandwidth import training_ram
from tinyfed.fleet.profiles import Profile


@dataclass(frozen=True)
class Work:
    """What training one example costs on any device: FLOPs (forward + backward) and the RAM
    a task needs (weights, gradients, optimizer state, one batch's activations)."""

    gflop_per_example: float
    ram_bytes: int

    @classmethod
    def of(cls, model: nn.Module, input_shape: tuple[int, ...], batch: int, optimizer: str,
           momentum: float) -> Work:
        x = torch.zeros((1, *input_shape))
        with FlopCounterMode(display=False) as counter:
            model(x).sum().backward()
        model.zero_grad(set_to_none=True)
        ram = training_ram(model, input_shape, batch, optimizer, momentum)
        return cls(counter.get_total_flops() / 1e9, sum(ram.values()))


@dataclass(frozen=True)
class TaskCost:
    download_s: float
    compute_s: float
    upload_s: float
    radio_j: float
    compute_j: float

    @property
    def seconds(self) -> float:
        return self.download_s + self.compute_s + self.upload_s

    @property
    def energy_j(self) -> float:
        return self.radio_j + self.compute_j


def task_cost(p: Profile, bytes_down: int, bytes_up: int, gflop: float) -> TaskCost:
    """Times and energy of one task (bytes as the frames' link bytes; see the module doc)."""
    download = p.latency_s + bytes_down * 8 / (p.down_kbps * 1000)
    upload = p.latency_s + bytes_up * 8 / (p.up_kbps * 1000) * 100 / p.duty_cycle
    radio = (bytes_down * p.rx_mj_per_kb + bytes_up * p.tx_mj_per_kb) / 1e6
    return TaskCost(download, gflop / p.gflops, upload, radio, gflop * p.mj_per_gflop / 1e3)
