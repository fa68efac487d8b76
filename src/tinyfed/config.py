"""One validated experiment config: defaults < TOML file < --set overrides < CLI flags.

Flat on purpose: every key is also a `--flag` and a `--set key=value`, and the TOML written to a
run folder reads back into the same object.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tinyfed.errors import ConfigError
from tinyfed.staleness import parse_staleness

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Config fields whose allowed values are the keys of a registry: adding an entry there is all
# it takes for the config, the CLI's flags and their help to accept it.
REGISTRIES = {
    "dataset": "tinyfed.data.sources:SOURCES",
    "model": "tinyfed.models:BUILTIN",
    "partition": "tinyfed.data.partition:SCHEMES",
    "optimizer": "tinyfed.client:OPTIMIZERS",
    "mode": "tinyfed.policies:MODES",
    "strategy": "tinyfed.strategies:STRATEGIES",
    "async_rule": "tinyfed.strategies:ASYNC_RULES",
    "attack": "tinyfed.attacks:ATTACKS",
    "runtime": "tinyfed.runtimes:RUNTIMES",
}
# ... of which these also take a user's own as 'package.module:attr'.
IMPORTABLE = {"dataset": "factory", "model": "factory", "strategy": "Class"}


def registry_names(field: str, load: bool = True) -> tuple[str, ...]:
    """The names registered for a config field (imported on first use). With `load=False`
    (help text) a registry module not imported yet is read, not imported: most import torch,
    which `tinyfed run --help` should not wait for."""
    import importlib

    module, _, attr = REGISTRIES[field].partition(":")
    if not load and module not in sys.modules:
        names = declared_names(module, attr)
        if names is not None:
            return names
    return tuple(getattr(importlib.import_module(module), attr))


def declared_names(module: str, attr: str) -> tuple[str, ...] | None:
    """The string keys of the dict literal assigned to `attr` in a tinyfed module's source, or
    None if it is not one (`tests/test_cli_light.py` checks they equal the imported keys)."""
    import ast

    parts = module.split(".")[1:]
    base = Path(__file__).resolve().parent.joinpath(*parts)
    path = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        if isinstance(node, ast.AnnAssign):
            target = node.target
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        else:
            continue
        if isinstance(target, ast.Name) and target.id == attr and isinstance(node.value,
                                                                             ast.Dict):
            keys = [k.value for k in node.value.keys
                    if isinstance(k, ast.Constant) and isinstance(k.value, str)]
            return tuple(keys) if len(keys) == len(node.value.keys) else None
    return None


class Config(BaseModel):
    """Everything that defines a run. Unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # data
    dataset: str = Field("fmnist", description="data set")
    data_dir: str | None = Field(None, description="folder holding the data set files (or "
                                 "TINYFED_DATA)")
    synthetic_size: int = Field(3000, ge=100, le=1_000_000,
                                description="examples of the synthetic data set")
    partition: str = Field("iid", description="how the training set is split among clients")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (dirichlet partition)")
    shards_per_client: int = Field(2, ge=1, description="shards per client (shards partition)")
    classes_per_client: int = Field(2, ge=1,
                                    description="labels per client (classes partition)")
    min_partition_size: int = Field(10, ge=1, description="fewest examples a client may hold")
    range_size: int | None = Field(None, ge=1,
                                   description="examples per client (ranges partition)")
    # model and local training
    model: str = Field("mlp", description="model")
    clients: int = Field(10, ge=1, description="number of clients K")
    fraction: float = Field(1.0, gt=0, le=1, description="fraction C of clients per round")
    epochs: int = Field(1, ge=1, description="local epochs E")
    batch_size: int = Field(10, ge=0, description="local batch size B; 0 = the whole shard "
                            "(FedSGD)")
    optimizer: str = Field("sgd", description="client optimizer")
    trainer: Literal["auto", "vectorized", "fused", "autograd"] = Field(
        "auto", description="local training: fused (Linear/ReLU models with SGD, no autograd), "
        "vectorized (fused, a round's clients stacked into one computation; in-process "
        "and processes), "
        "autograd (any model), or auto (the fastest that can)")
    lr: float = Field(0.05, gt=0, description="client learning rate")
    momentum: float = Field(0.0, ge=0, lt=1, description="client SGD momentum")
    weight_decay: float = Field(0.0, ge=0, description="client weight decay")
    lr_decay: float = Field(1.0, gt=0, le=1, description="lr multiplier per round")
    # server
    strategy: str = Field("fedavg", description="aggregation rule (sync mode)")
    mu: float = Field(0.01, ge=0, description="fedprox: proximal term μ")
    server_momentum: float = Field(0.9, ge=0, lt=1, description="fedavgm: server momentum β")
    beta1: float = Field(0.9, ge=0, lt=1, description="fedadam/fedyogi/fedadagrad: β₁")
    beta2: float = Field(0.99, ge=0, lt=1, description="fedadam/fedyogi: β₂")
    tau: float = Field(1e-3, gt=0, description="fedadam/fedyogi/fedadagrad: adaptivity τ")
    trim_fraction: float = Field(0.1, ge=0, lt=0.5, description="trimmed-mean: fraction β cut "
                                 "from each end, in [0, 0.5)")
    krum_f: int = Field(1, ge=0, description="krum/multi-krum: Byzantine clients tolerated f "
                        "(needs C·K ≥ 2f+3)")
    krum_m: int | None = Field(None, ge=1, description="multi-krum: updates averaged (default "
                               "C·K − f)")
    dp_clip: float = Field(1.0, gt=0, description="dp-fedavg: L2 clipping bound S of an update "
                           "(the initial one with dp_adaptive)")
    dp_noise: float = Field(1.0, ge=0, description="dp-fedavg: noise multiplier z")
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="dp-fedavg: δ of the (ε, δ) reported")
    dp_adaptive: bool = Field(False, description="dp-fedavg: adaptive clipping (Andrew et al.)")
    dp_quantile: float = Field(0.5, gt=0, lt=1, description="dp-fedavg adaptive: target "
                               "quantile γ of update norms")
    dp_clip_lr: float = Field(0.2, gt=0, description="dp-fedavg adaptive: clip learning rate")
    target_epsilon: float | None = Field(None, gt=0, description="dp-fedavg: stop before ε "
                                         "would exceed this")
    byzantine: int = Field(0, ge=0, description="simulated malicious clients (seeded)")
    attack: str = Field("sign-flip", description="what the byzantine clients do")
    attack_scale: float = Field(10.0, gt=0, description="malicious update's size relative to "
                                "the attacker's honest one")
    rounds: int = Field(5, ge=1, description="number of rounds R")
    target_accuracy: float | None = Field(None, gt=0, le=1,
                                          description="stop when test accuracy reaches this")
    eval_every: int = Field(1, ge=1, description="evaluate the global model every N rounds")
    checkpoint_every: int = Field(1, ge=1, description="checkpoint every N rounds")
    keep_checkpoints: int = Field(3, ge=1, description="newest checkpoints kept")
    seed: int = Field(0, ge=0, lt=2**63, description="run seed")
    deterministic: bool = Field(False, description="one thread per client: bit-identical "
                                "results across runtimes")
    threads: int = Field(
        0, ge=0, description="torch threads for in-process training; 0 = torch's default "
        "(one per core)")
    lanes: int = Field(
        0, ge=0, description="in-process, with the autograd trainer: clients trained side by "
        "side, one torch thread each; 0 = one per training thread, 1 = one client at a time")
    eval_threads: int = Field(
        0, ge=0, description="torch threads for the server's test-set evaluation; 0 = one per "
        "core (1 with deterministic)")
    min_clients: int = Field(1, ge=1,
                             description="fewest successful clients for a round to count")
    round_timeout: float = Field(
        600.0, gt=0, description="seconds before a round's stragglers are dropped"
    )
    round_retries: int = Field(
        2, ge=0, description="retries (of the failed clients) of a round short of min_clients"
    )
    # asynchronous mode: every accepted update is merged at once; a "round" is clients_per_round
    # merged updates (the cadence of evaluation, records and checkpoints)
    mode: str = Field(
        "sync", description="sync rounds, or async (merge each update as it arrives)")
    async_rule: str = Field("fedasync", description="async merge rule")
    concurrency: int | None = Field(None, ge=1, description="async: clients busy at once "
                                    "(default C·K)")
    async_alpha: float = Field(0.5, gt=0, le=1, description="FedAsync mixing weight α")
    staleness: str = Field("constant", description="async staleness: constant | polynomial:A | "
                           "hinge:A,B")
    buffer_size: int | None = Field(None, ge=1, description="FedBuff: updates per server step "
                                    "(default C·K)")
    server_lr: float | None = Field(None, gt=0, description="server learning rate η (default "
                                    "the rule's: 1 fedbuff/fedavgm/scaffold, 0.01 "
                                    "fedadam/fedyogi, 0.03 fedadagrad)")
    # simulated fleet (tinyfed.fleet): real training, simulated device time and energy
    fleet: str = Field("", description="device fleet: a profile (lora-sensors, nbiot-meters, "
                       "ble-wearables, phones-lte, raspberry-pi-wifi), a mix such as "
                       "phones-lte:0.7,lora-sensors:0.3, or a .csv/.json trace; '' = real clock")
    sim_deadline: float | None = Field(None, gt=0, description="simulated seconds a sync round "
                                       "(an async task) may take; later arrivals fail")
    over_select: float = Field(1.0, ge=1.0, le=10.0, description="sync rounds ask this many "
                               "times C·K clients and keep the first C·K to arrive (needs a fleet)")
    sim_start_hour: float = Field(0.0, ge=0, lt=24, description="simulated time of day the run "
                                  "starts (for daily availability windows)")
    # transport
    runtime: str = Field("inprocess", description="where clients run")
    workers: int | None = Field(None, ge=1, description="client processes / actors")
    respawn: bool = Field(True, description="restart a failed client process")
    ray_address: str | None = Field(None, description="ray runtime: cluster to attach to, "
                                    "auto | HOST:PORT")
    cpus_per_client: float = Field(1.0, gt=0, description="ray runtime: CPUs reserved per actor")
    codec: str = Field("", description="uplink codec pipeline, e.g. delta+topk:0.01+int8")
    down_codec: str = Field("", description="downlink codec pipeline: a whole model (fp16, "
                            "int8, qsgd:B, +zstd) or steps from the model a client holds "
                            "(delta+…, e.g. delta+topk:0.01+int8+zstd)")
    down_history: int = Field(20, ge=1, le=10_000, description="model versions the server "
                              "keeps for step downlinks (a client further behind gets the model)")
    max_frame_mb: float = Field(256.0, gt=0, description="largest frame any reader accepts, MB")
    max_weight: float = Field(1e6, gt=0, description="largest |value| an update's tensor may hold")
    norm_ratio: float = Field(
        100.0, ge=0, description="refuse an update moving the model further than this × the "
        "recent median (0 = off)")
    # output
    out: str | None = Field(None, description="run folder (default "
                            "runs/<time>-<dataset>-<model>)")

    @field_validator(*REGISTRIES)
    @classmethod
    def _registered(cls, value: str, info) -> str:
        names = registry_names(info.field_name)
        if value in names:
            return value
        kind = IMPORTABLE.get(info.field_name)
        if kind and ":" in value and all(value.split(":", 1)):
            return value
        also = f" or 'package.module:{kind}'" if kind else ""
        raise ValueError(f"must be one of {', '.join(names)}{also}")

    @field_validator("ray_address")
    @classmethod
    def _ray_address(cls, value: str | None) -> str | None:
        if value is None or value == "auto":
            return value
        host, _, port = value.rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return value
        raise ValueError("must be 'auto' or HOST:PORT, e.g. 10.0.0.5:6379")

    @field_validator("codec", "down_codec")
    @classmethod
    def _codec_spec(cls, value: str, info) -> str:
        from tinyfed.compress import parse_pipeline  # lazy: torch only when a codec is set

        if not value.strip():
            return ""
        return parse_pipeline(value, ValueError, downlink=info.field_name == "down_codec").spec

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.min_clients > self.clients:
            raise ValueError(f"min_clients ({self.min_clients}) exceeds clients ({self.clients})")
        if self.concurrency is not None and self.concurrency > self.clients:
            raise ValueError(f"concurrency ({self.concurrency}) exceeds clients ({self.clients})")
        parse_staleness(self.staleness)  # raises ConfigError naming the allowed forms
        if self.byzantine > self.clients:
            raise ValueError(f"byzantine ({self.byzantine}) exceeds clients ({self.clients})")
        if self.strategy in ("krum", "multi-krum") and \
                self.clients_per_round < 2 * self.krum_f + 3:
            raise ValueError(f"krum_f = {self.krum_f} is too large for {self.clients_per_round} "
                             f"clients a round: Krum needs C·K ≥ 2f+3, so f ≤ "
                             f"{max(0, (self.clients_per_round - 3) // 2)} here")
        if self.strategy == "multi-krum" and self.krum_m is not None and \
                self.krum_m > self.clients_per_round:
            raise ValueError(f"krum_m = {self.krum_m} exceeds the {self.clients_per_round} "
                             f"clients a round")
        if self.fleet and not self.fleet.endswith((".csv", ".json")):
            from tinyfed.fleet.profiles import parse_mix  # torch-free

            try:
                parse_mix(self.fleet)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        if (self.over_select > 1 or self.sim_deadline) and not self.fleet:
            raise ValueError("over_select and sim_deadline work on the simulated clock; name a "
                             "fleet (e.g. --fleet phones-lte)")
        if self.over_select > 1 and self.mode != "sync":
            raise ValueError("over_select applies to sync rounds; async merges every arrival")
        if self.mode != "sync" and self.down_codec.startswith("delta"):
            raise ValueError(f"down_codec {self.down_codec!r} sends steps between rounds' models,"
                             f" which mode {self.mode!r} does not have; use a whole-model codec "
                             f"(fp16, int8, qsgd:B, +zstd)")
        if self.mode != "sync" and self.strategy != "fedavg":
            raise ValueError(f"strategy {self.strategy!r} is a synchronous rule; mode "
                             f"{self.mode!r} merges by async_rule (leave strategy = fedavg)")
        if self.model == "cifar_cnn" and self.dataset not in ("cifar10",):
            raise ValueError("model cifar_cnn needs dataset cifar10 (3×32×32 images)")
        if self.dataset == "cifar10" and self.model in ("mlp", "mlp128", "cnn"):
            raise ValueError(f"model {self.model} takes 1×28×28 images; use cifar_cnn for cifar10")
        return self

    @property
    def max_frame(self) -> int:
        """`max_frame_mb` in bytes: the largest frame any reader accepts."""
        return int(self.max_frame_mb * (1 << 20))

    @property
    def clients_per_round(self) -> int:
        """max(1, round(C·K)): a join ratio that rounds to zero still trains one client."""
        return max(1, round(self.fraction * self.clients))

    @property
    def clients_asked(self) -> int:
        """Clients a sync round selects: C·K, or ⌈over_select·C·K⌉ when it over-selects."""
        return min(self.clients, math.ceil(self.over_select * self.clients_per_round - 1e-9))

    def to_toml(self) -> str:
        return tomli_w.dumps({k: v for k, v in self.model_dump().items() if v is not None})


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "config"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(sorted(Config.model_fields))
        return f"unknown config key {field!r}; allowed keys: {allowed}"
    if err["loc"]:
        return f"config field {field!r} = {err.get('input')!r}: {msg}"
    return f"config: {msg}"


def build_config(values: dict[str, Any]) -> Config:
    """Validate a dict into a Config, turning pydantic's report into one clear line."""
    try:
        return Config.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_first_error(exc)) from None


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    return data


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs; the value is read as TOML (3, 0.1, true, "text"), else a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    values: dict[str, Any] = read_toml(path) if path else {}
    values.update(overrides or {})
    return build_config(values)
