"""What `tinyfed fleet` shows: each profile's count and rates, and one task's time and energy
for a given model, codecs and shard size, without training."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from tinyfed.bandwidth import model_for, traffic
from tinyfed.config import Config
from tinyfed.data.sources import SOURCES
from tinyfed.fleet.clock import Work, task_cost
from tinyfed.fleet.profiles import build_fleet
from tinyfed.models import state_of


def describe(config: Config, examples: int) -> dict[str, Any]:
    """Per profile: count, rates, and a task of `examples` examples × epochs with the run's
    real frame sizes (as `tinyfed bandwidth` measures them); then a round's time and energy."""
    model = model_for(config)
    work = Work.of(model, SOURCES[config.dataset].shape, config.batch_size, config.optimizer,
                   config.momentum)
    t = traffic(config, state_of(model), 1)
    down, up = t["client_down_bytes"], t["client_up_bytes"]
    gflop = work.gflop_per_example * examples * config.epochs
    fleet = build_fleet(config.fleet, config.clients, config.seed)
    counts = Counter(p.name for p in fleet)
    rows = []
    for name, count in counts.items():
        p = next(q for q in fleet if q.name == name)
        cost = task_cost(p, down, up, gflop)
        fits = work.ram_bytes <= p.memory_mb * 1e6
        rows.append({"profile": name, "clients": count, **dataclasses.asdict(p),
                     "download_s": cost.download_s, "compute_s": cost.compute_s,
                     "upload_s": cost.upload_s, "task_s": cost.seconds,
                     "radio_j": cost.radio_j, "compute_j": cost.compute_j,
                     "task_j": cost.energy_j, "fits_memory": fits})
    able = [r for r in rows if r["fits_memory"]]
    per_round = config.clients_per_round
    mean_j = sum(r["task_j"] * r["clients"] for r in able) / max(1, sum(r["clients"]
                                                                        for r in able))
    return {
        "fleet": config.fleet, "clients": config.clients, "dataset": config.dataset,
        "model": config.model, "codec": config.codec, "down_codec": config.down_codec,
        "examples_per_task": examples, "epochs": config.epochs,
        "gflop_per_example": work.gflop_per_example, "train_ram_bytes": work.ram_bytes,
        "task_down_bytes": down, "task_up_bytes": up, "profiles": rows,
        "round_clients": per_round,
        "round_slowest_s": max((r["task_s"] for r in able), default=None),
        "round_energy_j": mean_j * per_round,
    }
