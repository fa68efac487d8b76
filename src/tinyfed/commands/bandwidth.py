"""`tinyfed bandwidth`: traffic, link airtime and device footprint of a run, before (or after) it.

Builds the model from the data set's known input shape, so no data set needs to be installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tinyfed.commands.experiment_flags import add_config_flag
from tinyfed.errors import ConfigError
from tinyfed.metrics import human_seconds

# The config keys this command reads (flags and help come from the config model).
KEYS = ("dataset", "model", "clients", "fraction", "rounds", "codec", "down_codec", "down_history",
        "batch_size", "optimizer", "momentum", "seed")


def register(sub) -> None:
    from tinyfed.links import LINKS

    p = sub.add_parser("bandwidth", help="traffic, airtime and device footprint of a run",
                       description="Per-tensor sizes, bytes per round and run (with codecs, "
                                   "measured by encoding a real update), airtime on small-device "
                                   "links, and training memory. Needs no data set.")
    for key in KEYS:
        add_config_flag(p, key)
    link = p.add_mutually_exclusive_group()
    link.add_argument("--link", choices=sorted(LINKS), help="one link profile (default: all)")
    link.add_argument("--link-kbps", type=float, metavar="N", help="a custom link of N kbit/s")
    p.add_argument("--duty-cycle", type=float, metavar="PCT",
                   help="percent of time a device may transmit (LoRa EU868 defaults to 1)")
    p.add_argument("--from-run", metavar="RUN_DIR", help="compare with what that run measured")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from tinyfed.bandwidth import compare_run, report
    from tinyfed.config import build_config
    from tinyfed.links import LINKS, Link
    from tinyfed.metrics import read_records
    from tinyfed.rundir import RunDir

    values = {key: getattr(args, key) for key in KEYS if getattr(args, key) is not None}
    records = None
    if args.from_run:
        run = RunDir(args.from_run)
        config = run.saved_config()
        if values:
            config = build_config({**config.model_dump(), **values})
        if not run.metrics.is_file():
            raise ConfigError(f"--from-run {args.from_run!r}: no metrics.jsonl in that folder")
        records, _ = read_records(run.metrics)
        records = [r for r in records if r.get("kind", "round") == "round"]
    else:
        config = build_config(values)
    if args.link_kbps is not None:
        if not args.link_kbps > 0:
            raise ConfigError(f"--link-kbps {args.link_kbps}: must be a positive rate in kbit/s")
        links = [Link("custom", args.link_kbps, args.link_kbps, "given with --link-kbps")]
    else:
        links = [LINKS[args.link]] if args.link else list(LINKS.values())
    if args.duty_cycle is not None and not 0 < args.duty_cycle <= 100:
        raise ConfigError(f"--duty-cycle {args.duty_cycle}: a percentage in (0, 100] is required")
    batch = config.batch_size or 600
    rounds = len(records) if records is not None else None
    out = report(config, links, args.duty_cycle, batch, rounds)
    if records is not None:
        out["from_run"] = {"run_dir": str(Path(args.from_run)), **compare_run(out, records)}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        render(out)
    return 0


def _b(n: float) -> str:
    from tinyfed.metrics import human_bytes

    return f"{human_bytes(n)} ({int(n):,} B)" if n >= 1000 else f"{int(n)} B"


def render(out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=None if sys.stdout.isatty() else 120)  # pipes: no narrow wrapping
    t = out["traffic"]
    shape = "×".join(map(str, out["input_shape"]))
    tab = Table(title=f"{out['model']} on {out['dataset']} ({shape} input): tensors at wire dtype")
    for col in ("name", "shape", "params", "dtype", "bytes"):
        tab.add_column(col, justify="left" if col in ("name", "dtype") else "right")
    for row in out["tensors"]:
        tab.add_row(row["name"], "×".join(map(str, row["shape"])) or "scalar",
                    f"{row['params']:,}", row["dtype"], f"{row['bytes']:,}")
    tab.add_row("W (total)", "", f"{sum(r['params'] for r in out['tensors']):,}", "",
                f"{t['W_raw_bytes']:,}", style="bold")
    con.print(tab)
    con.print(f"safetensors payload of the model: {t['W_payload_bytes']:,} B")

    codec = f"up {t['codec'] or 'none (fp32)'}, down {t['down_codec'] or 'none (fp32)'}"
    tab = Table(title=f"traffic: K={out['clients']}, C={out['fraction']} → "
                      f"{t['clients_per_round']} clients/round, R={t['rounds']}; {codec}")
    for col in ("", "down", "up", "total"):
        tab.add_column(col, justify="left" if not col else "right")
    for label, key in (("per client per round", "client"), ("per round", "round"),
                       ("per run", "run")):
        d, u = t[f"{key}_down_bytes"], t[f"{key}_up_bytes"]
        tab.add_row(label, _b(d), _b(u), _b(d + u))
    tab.add_row("codec effect vs fp32", f"×{t['down_reduction']:.2f} less",
                f"×{t['up_reduction']:.2f} less", "")
    w = t["wcr_bytes_each_way"]
    tab.add_row("estimate W·C·R (fp32 payload)", _b(w), _b(w), _b(2 * w))
    con.print(tab)
    con.print(f"frames {t['codec_size_source']}; top-k/int8/fp16/qsgd sizes do not depend on the "
              "values, zstd's do (a trained update compresses differently)")

    tab = Table(title="airtime per round, one device (payload bits / nominal rate, "
                      "no packet overhead)")
    for col in ("link", "kbit/s up/down", "down", "up", "total", "duty cycle (uplink)"):
        tab.add_column(col, justify="right" if col != "link" else "left")
    for a in out["airtime"]:
        if a["duty_cycle"] is None:
            duty = "—"
        else:
            fits = "fits" if a["fits_hour"] else "does NOT fit"
            duty = (f"{a['duty_cycle']:g}%: {fits} in an hour; a round every ≥ "
                    f"{human_seconds(a['min_round_period_seconds'])}")
        tab.add_row(a["name"], f"{a['up_kbps']:g} / {a['down_kbps']:g}",
                    human_seconds(a["down_seconds"]), human_seconds(a["up_seconds"]),
                    human_seconds(a["total_seconds"]), duty)
    con.print(tab)
    for a in out["airtime"]:
        con.print(f"  {a['name']}: {a['assumption']}")

    f = out["footprint"]
    tab = Table(title=f"device footprint (training batch {f['batch_size']}, {f['optimizer']})")
    tab.add_column("")
    tab.add_column("bytes", justify="right")
    tab.add_row("parameters", f"{f['params']:,}")
    for key, label in (("storage_fp32_bytes", "weights fp32"),
                       ("storage_fp16_bytes", "weights fp16"),
                       ("storage_int8_bytes", "weights int8 (+ scale, zero per tensor)"),
                       ("train_weights_bytes", "training: weights"),
                       ("train_grads_bytes", "training: gradients"),
                       ("train_optimizer_bytes", "training: optimizer state"),
                       ("train_activations_bytes", "training: activations of one batch"),
                       ("train_ram_bytes", "training RAM estimate")):
        tab.add_row(label, _b(f[key]))
    con.print(tab)
    con.print(f["train_ram_source"])

    if "from_run" in out:
        r = out["from_run"]
        tab = Table(title=f"{r['run_dir']}: measured vs estimate over {r['rounds']} rounds "
                          f"({r['tasks']} client tasks)")
        for col in ("", "estimate", "measured", "difference"):
            tab.add_column(col, justify="left" if not col else "right")
        for way in ("down", "up"):
            pct = r[f"diff_{way}_pct"]
            tab.add_row(way, _b(r[f"estimate_{way}_bytes"]), _b(r[f"measured_{way}_bytes"]),
                        f"{r[f'diff_{way}_bytes']:+,} B"
                        + (f" ({pct:+.3f}%)" if pct is not None else ""))
        con.print(tab)
