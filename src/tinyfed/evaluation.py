"""Evaluation of a saved model (a run's final model or any checkpoint) with a report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinyfed.checkpoint import load_checkpoint
from tinyfed.client import evaluate
from tinyfed.errors import ConfigError, TinyfedError
from tinyfed.experiment import load_data
from tinyfed.models import build_model
from tinyfed.rundir import RunDir


def locate(target: Path) -> tuple[RunDir, Path]:
    """(run folder, weights file) for a run folder or a checkpoint inside one."""
    if target.is_dir():
        run = RunDir(target)
        if run.model.is_file():
            return run, run.model
        ckpts = sorted(run.checkpoints.glob("round-*.safetensors"))
        if not ckpts:
            raise ConfigError(f"{str(target)!r} has no model.safetensors and no checkpoints")
        return run, ckpts[-1]
    parent = target.parent.parent if target.parent.name == "checkpoints" else target.parent
    return RunDir(parent), target


def evaluate_target(target: Path, data_dir: str | None = None) -> dict[str, Any]:
    run, weights_path = locate(target)
    config = run.saved_config()
    if data_dir:
        config = config.model_copy(update={"data_dir": data_dir})
    weights, _ = load_checkpoint(weights_path)
    dataset = load_data(config)
    model = build_model(config.model, dataset.input_shape, dataset.num_classes, config.seed)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        msg = f"{str(weights_path)!r} does not fit model {config.model!r}: {first}"
        raise TinyfedError(msg) from None
    res = evaluate(model, dataset.test_x, dataset.test_y, dataset.num_classes)
    conf = res["confusion"]
    per_class = (conf.diag().double() / conf.sum(1).clamp(min=1).double()).tolist()
    return {
        "weights": str(weights_path),
        "dataset": config.dataset,
        "model": config.model,
        "examples": int(conf.sum()),
        "accuracy": res["accuracy"],
        "loss": res["loss"],
        "classes": list(dataset.classes),
        "per_class_accuracy": per_class,
        "confusion": conf.tolist(),
    }


def render_report(report: dict[str, Any]) -> str:
    classes = report["classes"]
    lines = [
        f"model     {report['model']} from {report['weights']}",
        f"test set  {report['dataset']}, {report['examples']} examples",
        f"accuracy  {100 * report['accuracy']:.2f}%",
        f"loss      {report['loss']:.4f}",
        "",
        "per-class accuracy:",
    ]
    width = max(len(c) for c in classes)
    for name, acc in zip(classes, report["per_class_accuracy"]):
        lines.append(f"  {name:<{width}}  {100 * acc:6.2f}%")
    lines += ["", "confusion matrix (rows: true class, columns: predicted):"]
    lines.append(" " * (width + 2) + "".join(f"{i:>6}" for i in range(len(classes))))
    for name, row in zip(classes, report["confusion"]):
        lines.append(f"  {name:<{width}}" + "".join(f"{v:>6}" for v in row))
    return "\n".join(lines)
