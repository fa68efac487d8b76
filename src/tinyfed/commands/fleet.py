"""`tinyfed fleet`: describe a simulated device fleet (counts, rates, and what one task and one
round cost in time and energy for a model and codecs) without training."""

from __future__ import annotations

import argparse
import json
import sys

from tinyfed.commands.experiment_flags import add_config_flag
from tinyfed.errors import ConfigError

KEYS = ("fleet", "dataset", "model", "clients", "fraction", "epochs", "batch_size", "optimizer",
        "momentum", "codec", "down_codec", "seed")


def register(sub) -> None:
    p = sub.add_parser("fleet", help="a simulated device fleet: time and energy of a round",
                       description="Per device profile: how many clients, their rates, and the "
                                   "time and energy of one task (download, training, upload) "
                                   "for a model and codecs; needs no data set and trains "
                                   "nothing.")
    for key in KEYS:
        add_config_flag(p, key)
    p.add_argument("--examples", type=int, default=600, metavar="N",
                   help="examples a client trains on per epoch (default 600: FMNIST, K=100)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from tinyfed.config import build_config
    from tinyfed.fleet.describe import describe

    values = {key: getattr(args, key) for key in KEYS if getattr(args, key) is not None}
    if not values.get("fleet"):
        raise ConfigError("tinyfed fleet needs --fleet: a profile, a mix such as "
                          "phones-lte:0.7,lora-sensors:0.3, or a .csv/.json trace")
    if args.examples < 1:
        raise ConfigError(f"--examples {args.examples}: a positive number of examples is "
                          f"required")
    out = describe(build_config(values), args.examples)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        render(out)
    return 0


def render(out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from tinyfed.metrics import human_bytes, human_seconds

    con = Console(width=None if sys.stdout.isatty() else 200)
    codecs = f"up {out['codec'] or 'fp32'}, down {out['down_codec'] or 'fp32'}"
    tab = Table(title=f"fleet {out['fleet']}: {out['clients']} clients · {out['model']} on "
                      f"{out['dataset']} · {out['examples_per_task']} examples × "
                      f"{out['epochs']} epoch(s) a task · {codecs}")
    for col in ("profile", "clients", "GFLOP/s", "kbit/s ↓/↑", "latency", "duty %",
                "window", "drop-out", "memory", "↓", "train", "↑", "task", "energy J (radio + "
                "compute)"):
        tab.add_column(col, justify="left" if col in ("profile", "window") else "right")
    for r in out["profiles"]:
        oom = "" if r["fits_memory"] else " (too small)"
        tab.add_row(r["profile"], str(r["clients"]), f"{r['gflops']:g}",
                    f"{r['down_kbps']:g} / {r['up_kbps']:g}", human_seconds(r["latency_s"]),
                    f"{r['duty_cycle']:g}", r["window"] or "always", f"{r['dropout']:g}",
                    f"{r['memory_mb']:g} MB{oom}", human_seconds(r["download_s"]),
                    human_seconds(r["compute_s"]), human_seconds(r["upload_s"]),
                    human_seconds(r["task_s"]),
                    f"{r['task_j']:.3g} J ({r['radio_j']:.3g} + {r['compute_j']:.3g})")
    con.print(tab)
    con.print(f"a task moves {human_bytes(out['task_down_bytes'])} down and "
              f"{human_bytes(out['task_up_bytes'])} up; training costs "
              f"{out['gflop_per_example'] * 1e3:.3g} MFLOP an example and needs "
              f"{out['train_ram_bytes'] / 1e6:.2f} MB of RAM")
    slow = out["round_slowest_s"]
    longest = human_seconds(slow) if slow is not None else "— (no device can train)"
    con.print(f"a sync round of {out['round_clients']} clients lasts as long as its slowest "
              f"device: up to {longest}; "
              f"energy about {out['round_energy_j']:.3g} J a round (mean task × C·K)")
