"""Figures from metrics records: accuracy and loss per round, accuracy against bytes moved."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from tinyfed.metrics import Record  # noqa: E402


def _series(records: list[Record], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["round"], r[key]) for r in records
           if r.get("kind", "round") == "round" and r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(runs: dict[str, list[Record]], out: str | Path,
              fp32_task_bytes: dict[str, int] | None = None) -> Path:
    """One figure, three panels; several runs overlay for comparison. With `fp32_task_bytes`
    (a compressed run's model payload), the traffic panel also draws the same rounds at fp32
    (that payload down and up for every task), the run's uncompressed baseline."""
    simulated = any(r.get("sim_hours") is not None for rs in runs.values() for r in rs)
    fig, axes = plt.subplots(1, 5 if simulated else 3, figsize=(25 if simulated else 15, 4.2))
    ax_acc, ax_loss, ax_bytes = axes[:3]
    for label, records in runs.items():
        x, acc = _series(records, "test_accuracy")
        ax_acc.plot(x, [100 * a for a in acc], marker="o", ms=3, label=label)
        x, loss = _series(records, "test_loss")
        ax_loss.plot(x, loss, marker="o", ms=3, label=f"{label} test")
        x, tl = _series(records, "train_loss")
        ax_loss.plot(x, tl, ls="--", label=f"{label} train")
        pts = [((r["cum_bytes_down"] + r["cum_bytes_up"]) / 1e6, 100 * r["test_accuracy"])
               for r in records if r.get("kind", "round") == "round"
               and r.get("test_accuracy") is not None]
        ax_bytes.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
        w = (fp32_task_bytes or {}).get(label)
        if w:
            tasks, base = 0, []
            for r in records:
                if r.get("kind", "round") != "round":
                    continue
                tasks += r.get("clients_selected", 0)
                if r.get("test_accuracy") is not None:
                    base.append((2 * w * tasks / 1e6, 100 * r["test_accuracy"]))
            ax_bytes.plot([p[0] for p in base], [p[1] for p in base], ls="--", color="grey",
                          label=f"{label}: same rounds at fp32")
            ax_bytes.set_xscale("log")
            ax_bytes.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax_bytes.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    if simulated:  # a simulated fleet: accuracy against device time and device energy
        for ax, key, scale, title, unit in ((axes[3], "sim_hours", 1.0, "Accuracy against "
                                             "simulated time", "simulated hours"),
                                            (axes[4], "cum_energy_j", 1e-3, "Accuracy against "
                                             "device energy", "energy, all devices (kJ)")):
            for label, records in runs.items():
                pts = [(scale * r[key], 100 * r["test_accuracy"]) for r in records
                       if r.get(key) is not None and r.get("test_accuracy") is not None]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
            ax.set(title=title, xlabel=unit, ylabel="accuracy (%)")
    ax_acc.set(title="Test accuracy", xlabel="round", ylabel="accuracy (%)")
    ax_loss.set(title="Loss", xlabel="round", ylabel="cross-entropy")
    ax_bytes.set(title="Accuracy against traffic", xlabel="cumulative bytes, down + up (MB)",
                 ylabel="accuracy (%)")
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
