"""The run core: the global model and everything around it that is not how clients are driven.

Synchronous rounds (`server.Server`) and asynchronous merging (`async_loop.AsyncServer`) are two
policies over one `RunCore`: it holds the run state, admits results (lossy-downlink rebase and
the norm guard), evaluates, builds and publishes records, writes checkpoints and restores them,
and says when to stop. A policy decides only which tasks leave when and how results fold in.

Durability: a record is written (the essential JSONL sink) before the round's checkpoint, and a
failure of either stops the run with a one-line error; the last good checkpoint stays
resumable. A checkpoint holds no records (its size does not grow with the run): on resume they
are rebuilt from metrics.jsonl, checked and cut at the checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinyfed.attacks import attackers
from tinyfed.broadcast import PREFIX as BROADCAST_PREFIX
from tinyfed.broadcast import make_downlink
from tinyfed.checkpoint import latest_checkpoint, save_checkpoint
from tinyfed.client import TrainSettings, evaluate
from tinyfed.compress import rebase
from tinyfed.config import Config
from tinyfed.errors import TinyfedError
from tinyfed.experiment import Experiment
from tinyfed.guard import NormGuard
from tinyfed.memory import PREFIX as MEMORY_PREFIX
from tinyfed.memory import DeviceMemory
from tinyfed.metrics import EventBus, Record, finite_or_none, rounds_to_target
from tinyfed.protocol import ClientResult, ClientTask, Expectation, TaskPayloads
from tinyfed.wire import Tensors

EXTRA_PREFIX = "policy::"  # checkpoint tensors that are a policy's state, not model weights


class RoundFailed(TinyfedError):
    """Too few clients succeeded in a round, even after its retries."""


class RunStopped(TinyfedError):
    """A record or checkpoint could not be written; the run stops rather than lose it."""


@dataclass
class RunState:
    """Everything a checkpoint must hold for an exact resume (records live in metrics.jsonl)."""

    round: int = 0
    weights: Tensors | None = None
    records: list[Record] = field(default_factory=list)  # round records, rebuilt on resume
    cum_bytes_down: int = 0
    cum_bytes_up: int = 0
    elapsed: float = 0.0
    strategy_state: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "cum_bytes_down": self.cum_bytes_down,
            "cum_bytes_up": self.cum_bytes_up,
            "elapsed": self.elapsed,
            "strategy_state": self.strategy_state,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, weights: Tensors, data: dict[str, Any]) -> RunState:
        return cls(
            round=int(data["round"]),
            weights=weights,
            cum_bytes_down=int(data.get("cum_bytes_down", 0)),
            cum_bytes_up=int(data.get("cum_bytes_up", 0)),
            elapsed=float(data.get("elapsed", 0.0)),
            strategy_state=dict(data.get("strategy_state", {})),
            extra=dict(data.get("extra", {})),
        )


@dataclass
class Tally:
    """What one round (or one async window) saw: successes, failures, examples, bytes."""

    start: float = field(default_factory=time.monotonic)
    ok: int = 0
    examples: int = 0
    steps: int = 0
    loss_sum: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)

    def count_bytes(self, result: ClientResult) -> None:
        self.bytes_down += result.bytes_down
        self.bytes_up += result.bytes_up

    def success(self, result: ClientResult) -> None:
        self.ok += 1
        self.examples += result.num_examples
        self.steps += int(result.metrics.get("steps", 0))
        self.loss_sum += result.metrics.get("train_loss", 0.0) * result.num_examples

    def failure(self, client_id: int, reason: str, **where: Any) -> None:
        self.failures.append({"client_id": client_id, **where, "reason": reason})


def eval_threads(cfg: Config) -> int:
    """Threads for the test-set evaluation: every core by default (clients wait on the new
    model meanwhile in sync rounds; the 2NN's evaluation was a quarter of a round on one)."""
    if cfg.deterministic:
        return 1
    return cfg.eval_threads or os.cpu_count() or 1


class RunCore:
    """Run state, admission, evaluation, records, checkpoints, resume and stop rules."""

    def __init__(self, experiment: Experiment, bus: EventBus,
                 checkpoint_dir: Path | None = None):
        self.exp = experiment
        self.cfg = experiment.config
        self.bus = bus
        self.checkpoint_dir = checkpoint_dir
        self.state = RunState(weights=dict(experiment.initial))
        self.guard = NormGuard(self.cfg.norm_ratio)
        self.memory = DeviceMemory(self.cfg.codec, experiment.spec)
        self.downlink = make_downlink(self.cfg.down_codec, self.cfg.down_history, self.cfg.seed)
        self.payloads = TaskPayloads()
        self.clock: Any = None  # a simulated device clock (its report() goes in every record)
        self.interrupted = False  # set by Ctrl-C (runner.interrupts); checked at every result
        self.eval_model = experiment.new_model()
        self.stop_reason = ""
        self.attackers = set(attackers(experiment.client_ids, self.cfg.byzantine, self.cfg.seed))

    # ---- tasks and results ---------------------------------------------------------------
    def settings(self, round_num: int) -> TrainSettings:
        cfg = self.cfg
        return TrainSettings(cfg.epochs, cfg.batch_size, cfg.optimizer,
                             cfg.lr * cfg.lr_decay ** (round_num - 1), cfg.momentum,
                             cfg.weight_decay)

    def hostile(self, client_id: int) -> tuple[str, dict[str, float]]:
        """The attack a simulated Byzantine client plays (and its strength), or ('', {})."""
        if client_id in self.attackers:
            return self.cfg.attack, {"attack_scale": self.cfg.attack_scale}
        return "", {}

    def note_attackers(self, record: Record, asked: list[int], tally: Tally) -> None:
        """A round's record names the attackers it asked (when the run simulates any)."""
        if self.attackers:
            record["byzantine"] = [c for c in asked if c in self.attackers]
            record["attack"] = self.cfg.attack

    def expectation(self, task: ClientTask, reference: Tensors) -> Expectation:
        """What the server accepts as the answer to `task` sent with `reference` weights."""
        return Expectation(task, reference, self.exp.spec, self.exp.shard_size(task.client_id),
                           self.cfg.max_frame, self.cfg.max_weight)

    def watch(self, runtime: Any) -> None:
        """Read the runtime's simulated clock into records and checkpoints, if it has one."""
        self.clock = runtime if callable(getattr(runtime, "report", None)) else None

    def submit(self, runtime: Any, task: ClientTask, expect: Expectation,
               payload: bytes | None = None, extras: Tensors | None = None) -> None:
        """Send one task: the downlink's payload for this client (unless the policy gives its
        own), a strategy's extra tensors, and the client's device memory."""
        held: Tensors = {}
        if payload is None:
            payload, base, codec, held = self.downlink.for_client(task.client_id)
            task = dataclasses.replace(task, down_codec=codec, base_version=base)
        payload = self.payloads.for_client(payload, extras or {})
        task, payload = self.memory.attach(task, payload, held)
        expect.task, expect.memory = task, self.memory.spec
        runtime.submit(task, payload, expect)

    def admit(self, result: ClientResult, seen: Tensors, exact: Tensors) -> ClientResult:
        """A validated update moved onto the exact model (when the downlink was lossy) and
        judged by the norm guard; a refused one comes back as a failure. An admitted one's
        device memory becomes the client's."""
        self.raise_if_interrupted()
        if not result.ok:
            return result
        if seen is not exact:
            result.weights = rebase(result.weights, seen, exact)
        reason = self.guard.check(result.weights, exact)
        if reason:
            return ClientResult(result.client_id, result.round, False, reason=reason,
                                bytes_down=result.bytes_down, bytes_up=result.bytes_up,
                                version=result.version)
        self.memory.commit(result)
        self.downlink.commit(result)
        return result

    # ---- evaluation and records ----------------------------------------------------------
    def evaluate(self, weights: Tensors) -> dict[str, Any]:
        self.eval_model.load_state_dict(weights)
        ds = self.exp.dataset
        return evaluate(self.eval_model, ds.test_x, ds.test_y, ds.num_classes,
                        eval_threads(self.cfg))

    def round_record(self, round_num: int, tally: Tally, selected: int) -> Record:
        """Evaluate (on the configured cadence) and build the round's record."""
        evaluate_now = round_num % self.cfg.eval_every == 0 or round_num == self.cfg.rounds
        test = self.evaluate(self.state.weights) if evaluate_now else None
        seconds = time.monotonic() - tally.start  # a round's wall time includes evaluation
        st = self.state
        st.cum_bytes_down += tally.bytes_down
        st.cum_bytes_up += tally.bytes_up
        st.elapsed += seconds
        return {
            "kind": "round",
            "round": round_num,
            "time": time.time(),
            "wall_seconds": seconds,
            "elapsed_seconds": st.elapsed,
            "test_accuracy": test["accuracy"] if test else None,
            "test_loss": finite_or_none(test["loss"]) if test else None,
            "train_loss": finite_or_none(tally.loss_sum / tally.examples)
            if tally.examples else None,
            "num_examples": tally.examples,
            "steps": tally.steps,  # local optimizer steps of the round's clients, summed
            "clients_selected": selected,
            "clients_succeeded": tally.ok,
            "clients_failed": len(tally.failures),
            "failures": tally.failures,
            "bytes_down": tally.bytes_down,
            "bytes_up": tally.bytes_up,
            "cum_bytes_down": st.cum_bytes_down,
            "cum_bytes_up": st.cum_bytes_up,
            "lr": self.settings(round_num).lr,
            **self.memory.report(),
            **self.downlink.report(),
            **(self.clock.report() if self.clock is not None else {}),
        }

    def progress(self, round_num: int, tally: Tally, planned: int) -> None:
        """A progress event inside a round: what the console and viewers show between records."""
        self.bus.notify({"kind": "progress", "round": round_num, "done": tally.ok + len(
            tally.failures), "planned": planned, "failed": len(tally.failures),
            "bytes": tally.bytes_down + tally.bytes_up, "seconds": time.monotonic() - tally.start,
            "rounds": self.cfg.rounds, "elapsed_seconds": self.state.elapsed})

    def publish(self, record: Record) -> None:
        """Write and fan out one record; a record that cannot be written stops the run."""
        try:
            self.bus.publish(record)
        except (OSError, ValueError) as exc:
            raise RunStopped(f"cannot write the metrics record of round {record.get('round')} "
                             f"({exc}); the run stopped, {self.resumable()}") from None

    def raise_if_interrupted(self) -> None:
        """Ctrl-C raises at once; if that KeyboardInterrupt was swallowed (Python drops one
        raised inside a finalizer or callback), the next result or round raises it again."""
        if self.interrupted:
            raise KeyboardInterrupt

    def finish_round(self, round_num: int, record: Record, policy_state: dict[str, Any],
                     tensors: Tensors | None = None) -> None:
        """The round is done: its record is written first, then (on cadence) a checkpoint."""
        self.raise_if_interrupted()
        self.state.round = round_num
        self.state.records.append(record)
        self.guard.end_round()
        self.publish(record)
        last = round_num == self.cfg.rounds or self.target_reached()
        if self.checkpoint_dir and (round_num % self.cfg.checkpoint_every == 0 or last):
            self.checkpoint(policy_state, tensors)

    # ---- checkpoints and resume ----------------------------------------------------------
    def checkpoint(self, policy_state: dict[str, Any], tensors: Tensors | None = None) -> None:
        """Weights + state (+ a policy's extra tensors, stored beside the weights)."""
        assert self.checkpoint_dir is not None
        st = self.state
        st.strategy_state = policy_state.get("strategy", {})
        st.extra = {k: v for k, v in policy_state.items() if k != "strategy"}
        st.extra["guard"] = self.guard.state_dict()
        weights = dict(st.weights)
        for key, value in (tensors or {}).items():
            weights[f"{EXTRA_PREFIX}{key}"] = value
        weights.update(self.memory.tensors())
        weights.update(self.downlink.tensors())
        st.extra["downlink"] = self.downlink.state_dict()
        if self.clock is not None:
            st.extra["clock"] = self.clock.state_dict()
        try:
            save_checkpoint(self.checkpoint_dir, st.round, weights, st.to_json(),
                            keep=self.cfg.keep_checkpoints)
        except (OSError, ValueError) as exc:
            raise RunStopped(f"cannot write the checkpoint of round {st.round} ({exc}); the run "
                             f"stopped, {self.resumable()}") from None

    def resumable(self) -> str:
        """Where `--resume` would continue from, for an error message."""
        found = latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir else None
        if found is None:
            return "no checkpoint was written yet"
        return f"--resume continues from {found.name}"

    def resume(self, weights: Tensors, data: dict[str, Any],
               records: list[Record]) -> tuple[RunState, Tensors]:
        """Restore a checkpoint's state; returns it and the policy's extra tensors."""
        tensors = {k.removeprefix(EXTRA_PREFIX): v for k, v in weights.items()
                   if k.startswith(EXTRA_PREFIX)}
        self.memory.load({k: v for k, v in weights.items() if k.startswith(MEMORY_PREFIX)})
        model = {k: v for k, v in weights.items()
                 if not k.startswith((EXTRA_PREFIX, MEMORY_PREFIX, BROADCAST_PREFIX))}
        state = RunState.from_json(model, data)
        state.records = [r for r in records if r.get("kind", "round") == "round"]
        self.state = state
        self.guard.load_state_dict(state.extra.get("guard", {}))
        if self.clock is not None:
            self.clock.load_state_dict(state.extra.get("clock", {}))
        self.downlink.load(state.extra.get("downlink", {}), {
            k: v for k, v in weights.items() if k.startswith(BROADCAST_PREFIX)})
        return state, tensors

    def target_reached(self) -> bool:
        target = self.cfg.target_accuracy
        return target is not None and rounds_to_target(self.state.records, target) is not None

