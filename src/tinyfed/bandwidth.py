"""What federated training costs a small device: bytes per round and run, link airtime, memory.

The estimate builds the real model from the data set's known input shape (no data needed) and
measures encoded sizes by running the codec pipelines and the wire module on a real update (the
initial model plus a seeded small random delta), so frame headers, safetensors headers and codec
side data (indices, scales) are counted, not guessed. Top-k, int8, fp16 and QSGD sizes do not
depend on the values, so the measured size is the size of every round's update; zstd's does.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from tinyfed import wire
from tinyfed.client import TrainSettings, optimizer_slots, task_seed
from tinyfed.compress import downlink, parse_pipeline
from tinyfed.config import Config
from tinyfed.data.sources import SOURCES
from tinyfed.errors import ConfigError
from tinyfed.links import Link
from tinyfed.models import build_model, state_of
from tinyfed.protocol import ClientTask
from tinyfed.wire import Kind, Tensors

PERTURBATION = 1e-3  # std of the seeded random delta standing in for a trained update


def model_for(config: Config) -> nn.Module:
    """The model for the data set's image shape and classes (from the data registry; a user's
    data set would have to be loaded to know them)."""
    source = SOURCES.get(config.dataset)
    if source is None:
        raise ConfigError(f"tinyfed bandwidth knows the built-in data sets "
                          f"({', '.join(SOURCES)}); {config.dataset!r} would have to be loaded")
    return build_model(config.model, source.shape, len(source.classes), seed=config.seed)


def tensor_table(tensors: Tensors) -> list[dict[str, Any]]:
    """One row per tensor: name, shape, parameter count, dtype and bytes at that dtype."""
    return [{"name": k, "shape": list(v.shape), "params": v.numel(),
             "dtype": str(v.dtype).removeprefix("torch."), "bytes": v.numel() * v.element_size()}
            for k, v in tensors.items()]


def raw_bytes(tensors: Tensors) -> int:
    return sum(v.numel() * v.element_size() for v in tensors.values())


def perturbed(weights: Tensors, seed: int = 0) -> Tensors:
    """The weights plus a seeded small random delta: a stand-in for one client's trained model."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + PERTURBATION * torch.randn(v.shape, generator=gen, dtype=v.dtype)
            if v.is_floating_point() else v for k, v in weights.items()}


def steps_per_task(config: Config) -> int:
    """Steps a client is sent under a step downlink: it last took part about 1/C rounds ago."""
    return min(config.down_history, max(1, math.ceil(1 / config.fraction)))


def step_payload(config: Config, weights: Tensors) -> bytes:
    """A step downlink's payload in the steady state: `steps_per_task` encoded steps (each the
    seeded random delta), or the whole model when that is smaller, as the server chooses."""
    pipeline = parse_pipeline(config.down_codec)
    step = wire.encode_tensors(pipeline.encode(perturbed(weights, config.seed + 1), weights))
    whole = wire.encode_tensors(weights)
    n = steps_per_task(config)
    return b"\0" * (n * len(step)) if n * len(step) < len(whole) else whole


def task_frame_bytes(config: Config, weights: Tensors, rounds: int) -> tuple[int, int]:
    """(frame bytes, payload bytes) of one task frame as the server sends it."""
    if config.down_codec.startswith("delta"):
        payload = step_payload(config, weights)
    else:
        payload, _ = downlink(weights, config.down_codec)
    cid = config.clients - 1
    task = ClientTask(cid, rounds, task_seed(config.seed, rounds, cid),
                      TrainSettings(config.epochs, config.batch_size, config.optimizer, config.lr,
                                    config.momentum, config.weight_decay),
                      config.codec, version=rounds - 1, down_codec=config.down_codec)
    return len(wire.encode_frame(Kind.TASK, task.header(), payload)), len(payload)


def update_frame_bytes(config: Config, weights: Tensors, rounds: int,
                       num_examples: int = 600) -> tuple[int, int]:
    """(frame bytes, payload bytes) of one update frame, encoding a perturbed model for real."""
    _, seen = downlink(weights, config.down_codec)
    local = perturbed(seen, config.seed)
    encoded = parse_pipeline(config.codec).encode(local, seen, {})
    payload = wire.encode_tensors(encoded)
    header = {"client_id": config.clients - 1, "round": rounds, "version": rounds - 1,
              "num_examples": num_examples, "codec": config.codec,
              "metrics": {"train_loss": 0.4321098765432109,
                          "steps": 60}}
    return len(wire.encode_frame(Kind.UPDATE, header, payload)), len(payload)


def traffic(config: Config, weights: Tensors, rounds: int | None = None) -> dict[str, Any]:
    """Bytes per client, per round and per run, each way, with the codec and at plain fp32."""
    rounds = rounds if rounds is not None else config.rounds
    per_round = config.clients_per_round
    down, down_payload = task_frame_bytes(config, weights, rounds)
    up, up_payload = update_frame_bytes(config, weights, rounds)
    plain = config.model_copy(update={"codec": "", "down_codec": ""})
    down_fp32, _ = task_frame_bytes(plain, weights, rounds)
    up_fp32, _ = update_frame_bytes(plain, weights, rounds)
    w_payload = len(wire.encode_tensors(weights))
    return {
        "W_raw_bytes": raw_bytes(weights),
        "W_payload_bytes": w_payload,
        "clients_per_round": per_round,
        "rounds": rounds,
        "codec": config.codec,
        "down_codec": config.down_codec,
        "codec_size_source": "measured: encoded the initial model plus a seeded random delta"
        + (f"; down: {steps_per_task(config)} such steps a task (a client takes part every "
           f"1/C rounds), or the model when smaller" if config.down_codec.startswith("delta")
           else ""),
        "client_down_bytes": down,
        "client_up_bytes": up,
        "client_down_payload_bytes": down_payload,
        "client_up_payload_bytes": up_payload,
        "round_down_bytes": down * per_round,
        "round_up_bytes": up * per_round,
        "run_down_bytes": down * per_round * rounds,
        "run_up_bytes": up * per_round * rounds,
        "wcr_bytes_each_way": w_payload * per_round * rounds,
        "fp32_client_down_bytes": down_fp32,
        "fp32_client_up_bytes": up_fp32,
        "down_reduction": down_fp32 / down,
        "up_reduction": up_fp32 / up,
    }


def airtime(link: Link, down_bytes: int, up_bytes: int,
            duty_cycle: float | None = None) -> dict[str, Any]:
    """Seconds on air for one device and one round; under a duty cycle (percent of time the
    device may transmit), the shortest round period and the rounds allowed per hour."""
    down_s = down_bytes * 8 / (link.down_kbps * 1000)
    up_s = up_bytes * 8 / (link.up_kbps * 1000)
    duty = duty_cycle if duty_cycle is not None else link.duty_cycle
    out: dict[str, Any] = {**asdict(link), "duty_cycle": duty, "down_seconds": down_s,
                           "up_seconds": up_s, "total_seconds": down_s + up_s}
    if duty is not None:
        budget = 3600 * duty / 100  # transmit seconds per hour
        out.update(min_round_period_seconds=up_s / (duty / 100),
                   rounds_per_hour=math.floor(budget / up_s) if up_s else None,
                   fits_hour=up_s <= budget)
    return out


def activation_bytes(model: nn.Module, input_shape: tuple[int, int, int], batch: int) -> int:
    """Input batch plus every leaf module's output that owns new memory (views are free),
    measured by a forward pass with hooks: what backward keeps around, roughly."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if not isinstance(output, torch.Tensor):
            return
        shares = any(isinstance(i, torch.Tensor) and i.untyped_storage().data_ptr()
                     == output.untyped_storage().data_ptr() for i in inputs)
        if not shares:
            total += output.numel() * output.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    x = torch.zeros((batch, *input_shape))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total + x.numel() * x.element_size()


def training_ram(model: nn.Module, input_shape: tuple[int, int, int], batch: int,
                 optimizer: str, momentum: float) -> dict[str, int]:
    """What training one batch holds in RAM, by part (the one estimate `tinyfed bandwidth`,
    `tinyfed fleet` and the simulator's out-of-memory check share)."""
    params = sum(p.numel() for p in model.parameters())
    return {"weights": raw_bytes(state_of(model)), "grads": params * 4,
            "optimizer": optimizer_slots(optimizer, momentum) * params * 4,
            "activations": activation_bytes(model, input_shape, batch)}


def footprint(model: nn.Module, config: Config, batch: int) -> dict[str, Any]:
    """Parameters, weight storage at fp32/fp16/int8 and an estimate of training RAM."""
    state = state_of(model)
    params = sum(p.numel() for p in model.parameters())
    numel = sum(v.numel() for v in state.values() if v.is_floating_point())
    tensors = sum(1 for v in state.values() if v.is_floating_point())
    slots = optimizer_slots(config.optimizer, config.momentum)
    ram = training_ram(model, SOURCES[config.dataset].shape, batch, config.optimizer,
                       config.momentum)
    weights = ram["weights"]
    return {
        "params": params,
        "storage_fp32_bytes": weights,
        "storage_fp16_bytes": numel * 2 + (weights - numel * 4),
        "storage_int8_bytes": numel + 8 * tensors + (weights - numel * 4),
        "batch_size": batch,
        "optimizer": config.optimizer + (f" (momentum {config.momentum})" if slots == 1 else ""),
        "train_weights_bytes": weights,
        "train_grads_bytes": ram["grads"],
        "train_optimizer_bytes": ram["optimizer"],
        "train_activations_bytes": ram["activations"],
        "train_ram_bytes": sum(ram.values()),
        "train_ram_source": "weights + grads + optimizer state + activations of one batch "
                            "(forward hooks on the real model); excludes the runtime itself",
    }


def report(config: Config, links: list[Link], duty_cycle: float | None, batch: int,
           rounds: int | None = None) -> dict[str, Any]:
    """Everything `tinyfed bandwidth` shows, as plain data."""
    model = model_for(config)
    weights = state_of(model)
    t = traffic(config, weights, rounds)
    return {
        "dataset": config.dataset,
        "model": config.model,
        "input_shape": list(SOURCES[config.dataset].shape),
        "clients": config.clients,
        "fraction": config.fraction,
        "tensors": tensor_table(weights),
        "traffic": t,
        "airtime": [airtime(link, t["client_down_bytes"], t["client_up_bytes"], duty_cycle)
                    for link in links],
        "footprint": footprint(model, config, batch),
    }


def compare_run(estimate: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's measured bytes beside the estimate for the same number of rounds."""
    rounds = [r for r in records if r.get("kind", "round") == "round"]
    down = sum(int(r.get("bytes_down", 0)) for r in rounds)
    up = sum(int(r.get("bytes_up", 0)) for r in rounds)
    t = estimate["traffic"]
    tasks = sum(int(r.get("clients_selected", 0)) for r in rounds)
    return {
        "rounds": len(rounds),
        "tasks": tasks,
        "measured_down_bytes": down,
        "measured_up_bytes": up,
        "estimate_down_bytes": t["run_down_bytes"],
        "estimate_up_bytes": t["run_up_bytes"],
        "diff_down_bytes": down - t["run_down_bytes"],
        "diff_up_bytes": up - t["run_up_bytes"],
        "diff_down_pct": _pct(down, t["run_down_bytes"]),
        "diff_up_pct": _pct(up, t["run_up_bytes"]),
    }


def _pct(measured: int, estimate: int) -> float | None:
    return 100 * (measured - estimate) / estimate if estimate else None
