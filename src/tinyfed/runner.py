"""Wires one run together: run folder, experiment, runtime, strategy, sinks, server loop, outputs.

`tinyfed run` and `tinyfed serve` both go through here, so a run folder looks the same
whichever transport produced it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TextIO

from tinyfed.checkpoint import save_weights
from tinyfed.config import Config
from tinyfed.core import RunState
from tinyfed.experiment import Experiment
from tinyfed.extras import missing_extra
from tinyfed.memtune import keep_freed_memory
from tinyfed.metrics import (
    EventBus,
    JsonlSink,
    Record,
    human_bytes,
    read_records,
    records_at,
    rounds_to_target,
)
from tinyfed.policies import MODES
from tinyfed.progress import Progress
from tinyfed.rundir import RunDir
from tinyfed.runtimes import make_runtime
from tinyfed.runtimes.base import Runtime
from tinyfed.runtimes.dispatch import as_runtime
from tinyfed.trainers import Choice, choose
from tinyfed.wire import encode_tensors
from tinyfed.worker import configure_torch


@dataclass
class RunResult:
    """What a finished run leaves: its folder, final state (weights, round records) and why
    it stopped; `history` reads every record back from metrics.jsonl."""

    run_dir: RunDir
    state: RunState
    experiment: Experiment
    stop_reason: str
    trainer: Choice | None = None  # the local trainer the clients run, and why
    startup_seconds: float | None = None  # from execute() to the first round's dispatch

    @property
    def weights(self) -> dict:
        return self.state.weights

    @property
    def history(self) -> list[Record]:
        """Every record of the run (async runs: per update too), from its metrics file."""
        return read_records(self.run_dir.metrics)[0]


def open_run(
    config: Config, resume: str | None, overrides: dict[str, Any]
) -> tuple[RunDir, Config]:
    if resume:
        run_dir = RunDir(resume)
        return run_dir, run_dir.resume_config(overrides)
    run_dir = RunDir.create(config)
    return run_dir, run_dir.saved_config()


def restore(server, run_dir: RunDir, sink: JsonlSink, bus: EventBus) -> None:
    """Continue from the newest checkpoint: records are rebuilt from metrics.jsonl and cut at
    the checkpoint (rounds after it are redone, not duplicated)."""
    found = run_dir.latest()
    if found is None:
        sink.rewrite([])
        return
    weights, data = found
    records = records_at(run_dir.metrics, data)
    server.resume(weights, data, records)
    sink.rewrite(records)
    bus.preload(records)


def make_server(
    config: Config, experiment: Experiment, runtime, bus: EventBus, run_dir: RunDir,
    strategy=None,
):
    """The config's mode (policies.MODES) over the runtime. `strategy` is a strategy object
    given from Python (else the config's name is looked up)."""
    return MODES[config.mode](experiment, runtime, bus, run_dir.checkpoints, strategy)


def execute(
    config: Config,
    run_dir: RunDir,
    resuming: bool = False,
    stream: TextIO | None = None,
    live: bool | None = None,
    subscribers: list[Callable[[Record], None]] = (),
    bus: EventBus | None = None,
    runtime: Runtime | None = None,
    strategy=None,
) -> RunResult:
    """Run (or continue) the experiment in `run_dir` to its end and write every output.
    `runtime` replaces the one named by the config (`tinyfed serve` passes its HTTP server): a
    Runtime, or a transport, which is put under the dispatcher."""
    began = time.monotonic()
    configure_torch(config)
    keep_freed_memory()
    runtime = as_runtime(runtime, config.round_timeout) if runtime else make_runtime(
        config.runtime, config)
    try:
        if hasattr(runtime, "warm"):
            runtime.warm()  # workers import torch while the data loads
        preload_plot()  # after warm(): a fork needs this process to have one thread
        experiment = Experiment.build(config)
        stacking = getattr(runtime, "stacking", None)  # a runtime that stacks clients says so
        trainer = choose(experiment.new_model(), config.trainer, config.optimizer,
                         **(stacking(config) if stacking else {}))
    except BaseException:
        runtime.close()
        raise
    run_dir.write_partition(experiment.histogram(), experiment.dataset.classes)
    bus = bus or EventBus()
    sink = JsonlSink(run_dir.metrics)
    server = make_server(config, experiment, runtime, bus, run_dir, strategy)
    if resuming:
        restore(server, run_dir, sink, bus)
    else:
        sink.rewrite([])
    bus.subscribe(sink, essential=True)
    for sub in subscribers:
        bus.subscribe(sub)
    title = (
        f"tinyfed · {config.dataset} · {config.model} · K={config.clients} "
        f"C={config.fraction} E={config.epochs} B={config.batch_size} · {config.runtime}"
    )
    progress = Progress(title, stream, live)
    bus.subscribe(progress)
    bus.watch(progress.on_progress)
    try:
        with progress, interrupts(server.core):
            runtime.start(experiment)
            startup = time.monotonic() - began
            server.run()
    finally:
        runtime.close()
    tally = getattr(runtime, "tally", None)  # a runtime that stacks clients counts them
    if trainer.stacks and tally:
        alone = (", the others alone (by themselves in a batch, or with a client algorithm "
                 "that corrects gradients)" if tally["alone"] else "")
        trainer = replace(trainer, reason=f"{trainer.reason}; {tally['stacked']} of "
                          f"{tally['stacked'] + tally['alone']} tasks stacked{alone}")
    lanes = getattr(runtime, "side_by_side", 1)  # in-process clients side by side
    if lanes > 1:
        trainer = replace(trainer, reason=f"{trainer.reason}; {lanes} clients at a time in "
                          f"this process, one torch thread each")
    save_weights(run_dir.model, server.state.weights)
    codecs = config.codec or config.down_codec  # then the plot shows the fp32 baseline too
    write_plot(run_dir, server.state.records,
               len(encode_tensors(experiment.initial)) if codecs else 0)
    return RunResult(run_dir, server.state, experiment, server.stop_reason, trainer, startup)


@contextlib.contextmanager
def interrupts(core):
    """Ctrl-C during a run: KeyboardInterrupt now, as ever, and a flag the run core checks at
    every result and round, so an interrupt Python swallowed cannot leave the run going."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        core.interrupted = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def preload_plot() -> None:
    """Import the plotting module on a spare core while the data loads: matplotlib's 0.4 s
    was otherwise paid after the last round. A failure is left for `write_plot` to report."""
    def load() -> None:
        with contextlib.suppress(Exception):
            import tinyfed.plot  # noqa: F401

    threading.Thread(target=load, daemon=True, name="tinyfed-preload-plot").start()


def write_plot(run_dir: RunDir, records: list[Record], fp32_task_bytes: int = 0) -> bool:
    """result.png, unless this install has no plotting extra (a device's core install)."""
    try:
        from tinyfed.plot import plot_runs
    except ModuleNotFoundError as exc:
        if missing_extra(exc) != "plot":
            raise
        return False
    plot_runs({run_dir.path.name: records}, run_dir.plot,
              {run_dir.path.name: fp32_task_bytes} if fp32_task_bytes else None)
    return True


def codec_lines(cfg: Config, records: list[Record], w: int, down: float, up: float) -> list[str]:
    """Each direction's codec and what it saved a task against the fp32 model payload."""
    lines = []
    for label, spec, mean in (("codec up        ", cfg.codec, up),
                              ("codec down      ", cfg.down_codec, down)):
        if spec:
            lines.append(f"{label} {spec}: {human_bytes(mean)} a task against "
                         f"{human_bytes(w)} at fp32, ×{w / max(mean, 1):.1f} less")
    if cfg.down_codec.startswith("delta"):
        steps = sum(r.get("down_steps", 0) for r in records)
        full = sum(r.get("down_full", 0) for r in records)
        lines[-1] += f" ({steps} tasks got steps, {full} the whole model)"
    return lines


def fleet_lines(cfg: Config, records: list[Record]) -> list[str]:
    """A simulated fleet's time, energy and failures by kind (see tinyfed.runtimes.simulated)."""
    timed = [r for r in records if r.get("sim_hours") is not None]
    if not timed:
        return []
    last = timed[-1]
    radio = sum(r["radio_j"] for r in timed)
    compute = sum(r["compute_j"] for r in timed)
    kinds = ("unavailable", "dropped_out", "out_of_memory", "missed_deadline", "over_selected")
    lost = ", ".join(f"{sum(r.get(k, 0) for r in timed)} {k.replace('_', ' ')}" for k in kinds)
    return [f"fleet            {cfg.fleet}: simulated {last['sim_hours']:.2f} h "
            f"({last['sim_hours'] * 3600 / len(timed):.1f} s a round on average), energy "
            f"{last['cum_energy_j'] / 1e3:.2f} kJ (radio {radio / 1e3:.2f}, compute "
            f"{compute / 1e3:.2f})",
            f"fleet tasks      {lost}"]


def summary(result: RunResult) -> str:
    """A readable report: accuracy, rounds, measured traffic beside the W·C·R estimate."""
    cfg = result.experiment.config
    st = result.state
    records = [r for r in st.records if r.get("kind", "round") == "round"]
    evaluated = [r for r in records if r.get("test_accuracy") is not None]
    last = evaluated[-1] if evaluated else None
    w = len(encode_tensors(result.experiment.initial))
    rounds = len(records)
    estimate = w * cfg.clients_per_round * rounds
    measured_total = st.cum_bytes_down + st.cum_bytes_up
    lines = [
        f"run folder       {result.run_dir.path}",
        f"stopped          {result.stop_reason} after round {st.round} of {cfg.rounds}",
    ]
    if last:
        lines.append(
            f"test accuracy    {100 * last['test_accuracy']:.2f}%  "
            f"(loss {last['test_loss']:.4f}, round {last['round']})"
        )
    if cfg.target_accuracy is not None:
        rt = rounds_to_target(records, cfg.target_accuracy)
        reached = f"{rt:.1f}" if rt is not None else "not reached"
        lines.append(f"rounds to {100 * cfg.target_accuracy:.1f}%   {reached}")
    spent = [r for r in records if r.get("epsilon") is not None]
    if spent:
        last_dp = spent[-1]
        lines.append(f"privacy spent    ε = {last_dp['epsilon']:.3f} at δ = {last_dp['delta']:g} "
                     f"(noise multiplier {last_dp['noise_multiplier']:g}, RDP accountant)")
    failed = sum(r["clients_failed"] for r in records)
    tasks = max(1, sum(r.get("clients_selected", 0) for r in records))
    lines += [
        f"clients          {sum(r['clients_succeeded'] for r in records)} updates merged, "
        f"{failed} failed",
        f"traffic measured down {human_bytes(st.cum_bytes_down)}, "
        f"up {human_bytes(st.cum_bytes_up)}, "
        f"total {human_bytes(measured_total)}",
        f"traffic mean     per client per round: down {human_bytes(st.cum_bytes_down / tasks)}, "
        f"up {human_bytes(st.cum_bytes_up / tasks)} ({tasks} client tasks)",
        f"traffic estimate W·C·R = {human_bytes(w)} × {cfg.clients_per_round} × {rounds} = "
        f"{human_bytes(estimate)} each way, {human_bytes(2 * estimate)} total (fp32, no codec)",
        *codec_lines(cfg, records, w, st.cum_bytes_down / tasks, st.cum_bytes_up / tasks),
        *fleet_lines(cfg, records),
        *([f"client trainer   {result.trainer.name} ({result.trainer.reason})"]
          if result.trainer else []),
        f"wall time        {st.elapsed:.1f} s in rounds"
        + (f", {result.startup_seconds:.1f} s start-up before round 1 (data, model, clients)"
           if result.startup_seconds is not None else ""),
        f"outputs          {result.run_dir.metrics.name}, "
        + (f"{result.run_dir.plot.name}, " if result.run_dir.plot.exists()
           else 'no plot (pip install "tinyfed[plot]"), ')
        + f"{result.run_dir.model.name}, checkpoints/",
    ]
    return "\n".join(lines)
