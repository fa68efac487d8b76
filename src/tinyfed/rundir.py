"""The run folder: config.toml, metrics.jsonl, partition.json, checkpoints/, model.safetensors,
result.png. Creating one never overwrites a run; resuming one checks the config still fits.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tinyfed.checkpoint import atomic_write, latest_checkpoint, load_checkpoint
from tinyfed.config import Config, build_config, read_toml
from tinyfed.errors import ConfigError

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
PARTITION = "partition.json"
MODEL = "model.safetensors"
PLOT = "result.png"
CHECKPOINTS = "checkpoints"

# Fields a resumed run may change: they do not alter what the finished rounds computed.
RESUMABLE = {
    "rounds",
    "threads",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "target_accuracy",
    "target_epsilon",
    "runtime",
    "workers",
    "respawn",
    "round_timeout",
    "round_retries",
    "out",
    "data_dir",
}


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def model(self) -> Path:
        return self.path / MODEL

    @property
    def plot(self) -> Path:
        return self.path / PLOT

    @classmethod
    def create(cls, config: Config) -> RunDir:
        """A new, empty run folder; an existing run is never touched."""
        label = "-".join(part.rpartition(":")[2] for part in (config.dataset, config.model))
        out = config.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{label}"
        path = Path(out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ConfigError(
                f"--out {str(path)!r} already exists and is not empty; choose another folder "
                f"or continue it with --resume {str(path)!r}"
            )
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        run.write_config(config.model_copy(update={"out": str(path)}))
        return run

    def write_config(self, config: Config) -> None:
        atomic_write(self.path / CONFIG, config.to_toml().encode())

    def write_partition(self, histogram: list[list[int]], classes: tuple[str, ...]) -> None:
        data = {
            "classes": list(classes),
            "clients": [
                {"client_id": i, "size": sum(h), "labels": h} for i, h in enumerate(histogram)
            ],
        }
        atomic_write(self.path / PARTITION, json.dumps(data, indent=1).encode())

    def saved_config(self) -> Config:
        path = self.path / CONFIG
        if not path.is_file():
            raise ConfigError(f"{str(self.path)!r} is not a tinyfed run folder (no {CONFIG})")
        return build_config(read_toml(path))

    def resume_config(self, overrides: dict) -> Config:
        """The saved config with only resumable fields changed; anything else is an error."""
        saved = self.saved_config()
        for key, value in overrides.items():
            if key in RESUMABLE or getattr(saved, key, object()) == value:
                continue
            raise ConfigError(
                f"cannot resume {str(self.path)!r} with {key}={value!r}: the run used "
                f"{key}={getattr(saved, key, None)!r}; "
                f"only {', '.join(sorted(RESUMABLE))} may change"
            )
        values = saved.model_dump()
        values.update(overrides)
        values["out"] = str(self.path)
        return build_config(values)

    def latest(self):
        """(weights, state) of the newest checkpoint, or None for a run that saved none."""
        path = latest_checkpoint(self.checkpoints)
        return load_checkpoint(path) if path else None
