"""The round loop: owns the global model and the round counter, and nothing about transports.

Each round: select clients, hand their tasks to the runtime, fold results into the strategy's
running aggregate as they arrive, evaluate, publish a record, checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinyfed.checkpoint import save_checkpoint
from tinyfed.client import TrainSettings, evaluate, task_seed
from tinyfed.compress import downlink, rebase
from tinyfed.errors import TinyfedError
from tinyfed.experiment import Experiment
from tinyfed.metrics import EventBus, Record, rounds_to_target
from tinyfed.protocol import ClientResult, ClientTask, Expectation
from tinyfed.runtimes.base import Runtime
from tinyfed.strategies import Strategy, select_clients
from tinyfed.wire import Tensors


class RoundFailed(TinyfedError):
    """Too few clients succeeded in a round, even after its retries."""


@dataclass
class RunState:
    """Everything a checkpoint must hold for an exact resume."""

    round: int = 0
    weights: Tensors | None = None
    records: list[Record] = field(default_factory=list)
    cum_bytes_down: int = 0
    cum_bytes_up: int = 0
    elapsed: float = 0.0
    strategy_state: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "records": self.records,
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
            records=list(data.get("records", [])),
            cum_bytes_down=int(data.get("cum_bytes_down", 0)),
            cum_bytes_up=int(data.get("cum_bytes_up", 0)),
            elapsed=float(data.get("elapsed", 0.0)),
            strategy_state=dict(data.get("strategy_state", {})),
            extra=dict(data.get("extra", {})),
        )


class OrderedFeed:
    """Feeds results to an aggregator in selection order when the run must be deterministic.

    Floating-point sums depend on order; holding early arrivals until their predecessors are in
    makes the aggregate identical whatever order a runtime delivers results in.
    """

    def __init__(self, order: list[int], add, ordered: bool):
        self.order, self.add, self.ordered = order, add, ordered
        self.pos = 0
        self.held: dict[int, ClientResult | None] = {}

    def put(self, client_id: int, result: ClientResult | None) -> None:
        if not self.ordered:
            if result is not None:
                self.add(result.weights, result.num_examples)
            return
        self.held[client_id] = result
        while self.pos < len(self.order) and self.order[self.pos] in self.held:
            res = self.held.pop(self.order[self.pos])
            if res is not None:
                self.add(res.weights, res.num_examples)
            self.pos += 1


class Server:
    """Runs synchronous rounds over any runtime."""

    def __init__(self, experiment: Experiment, runtime: Runtime, strategy: Strategy,
                 bus: EventBus, checkpoint_dir: Path | None = None):
        self.exp = experiment
        self.cfg = experiment.config
        self.runtime = runtime
        self.strategy = strategy
        self.bus = bus
        self.checkpoint_dir = checkpoint_dir
        self.state = RunState(weights=dict(experiment.initial))
        self.eval_model = experiment.new_model()
        self.stop_reason = ""

    def resume_from(self, state: RunState) -> None:
        self.state = state
        self.strategy.load_state_dict(state.strategy_state)

    def settings(self, round_num: int) -> TrainSettings:
        cfg = self.cfg
        return TrainSettings(cfg.epochs, cfg.batch_size, cfg.optimizer,
                             cfg.lr * cfg.lr_decay ** (round_num - 1), cfg.momentum,
                             cfg.weight_decay)

    def evaluate(self, weights: Tensors) -> dict[str, Any]:
        self.eval_model.load_state_dict(weights)
        ds = self.exp.dataset
        return evaluate(self.eval_model, ds.test_x, ds.test_y, ds.num_classes)

    def run(self) -> RunState:
        """Rounds from the state's next round to the configured last, or to the target."""
        while self.state.round < self.cfg.rounds:
            if self.target_reached():
                self.stop_reason = "target accuracy reached"
                break
            self.run_round(self.state.round + 1)
        else:
            self.stop_reason = self.stop_reason or "all rounds done"
        return self.state

    def target_reached(self) -> bool:
        target = self.cfg.target_accuracy
        return target is not None and rounds_to_target(self.state.records, target) is not None

    def run_round(self, round_num: int) -> Record:
        start = time.monotonic()
        selected = select_clients(self.exp.client_ids, self.cfg.clients_per_round, self.cfg.seed,
                                  round_num)
        # `seen` is what clients decode from the payload: uplink deltas are relative to it.
        payload, seen = downlink(self.state.weights, self.cfg.down_codec)
        attempts, failures = 0, []
        bytes_down = bytes_up = 0
        while True:
            attempts += 1
            agg = self.strategy.begin_round(self.state.weights, round_num)
            feed = OrderedFeed(selected, agg.add, self.cfg.deterministic)
            ok, loss_sum, examples = 0, 0.0, 0
            for cid in selected:
                task = ClientTask(cid, round_num, task_seed(self.cfg.seed, round_num, cid),
                                  self.settings(round_num), self.cfg.codec, version=round_num - 1,
                                  down_codec=self.cfg.down_codec)
                expect = Expectation(task, seen, self.exp.spec,
                                     self.exp.shard_size(cid),
                                     int(self.cfg.max_frame_mb * (1 << 20)))
                self.runtime.submit(task, payload, expect)
            for result in self.runtime.results(self.cfg.round_timeout):
                bytes_down += result.bytes_down
                bytes_up += result.bytes_up
                if result.ok:
                    if seen is not self.state.weights:  # lossy downlink: keep the exact model
                        result.weights = rebase(result.weights, seen, self.state.weights)
                    ok += 1
                    examples += result.num_examples
                    loss_sum += result.metrics.get("train_loss", 0.0) * result.num_examples
                    feed.put(result.client_id, result)
                else:
                    failures.append({"client_id": result.client_id, "attempt": attempts,
                                     "reason": result.reason})
                    feed.put(result.client_id, None)
            if ok >= min(self.cfg.min_clients, len(selected)):
                break
            if attempts > self.cfg.round_retries:
                raise RoundFailed(
                    f"round {round_num}: {ok} of {len(selected)} clients succeeded, fewer than "
                    f"min_clients={self.cfg.min_clients}, after {attempts} attempts; "
                    f"rounds 1-{round_num - 1} are saved"
                )
        new_weights = agg.result()
        self.state.weights = new_weights
        record = self.make_record(round_num, selected, ok, failures, examples, loss_sum,
                                  bytes_down, bytes_up, time.monotonic() - start)
        self.finish_round(round_num, record)
        return record

    def make_record(self, round_num, selected, ok, failures, examples, loss_sum, bytes_down,
                    bytes_up, seconds) -> Record:
        evaluate_now = round_num % self.cfg.eval_every == 0 or round_num == self.cfg.rounds
        eval_start = time.monotonic()
        test = self.evaluate(self.state.weights) if evaluate_now else None
        seconds += time.monotonic() - eval_start  # a round's wall time includes its evaluation
        st = self.state
        st.cum_bytes_down += bytes_down
        st.cum_bytes_up += bytes_up
        st.elapsed += seconds
        return {
            "kind": "round",
            "round": round_num,
            "time": time.time(),
            "wall_seconds": seconds,
            "elapsed_seconds": st.elapsed,
            "test_accuracy": test["accuracy"] if test else None,
            "test_loss": test["loss"] if test else None,
            "train_loss": loss_sum / examples if examples else None,
            "num_examples": examples,
            "clients_selected": len(selected),
            "clients_succeeded": ok,
            "clients_failed": len(failures),
            "failures": failures,
            "bytes_down": bytes_down,
            "bytes_up": bytes_up,
            "cum_bytes_down": st.cum_bytes_down,
            "cum_bytes_up": st.cum_bytes_up,
            "lr": self.settings(round_num).lr,
        }

    def finish_round(self, round_num: int, record: Record) -> None:
        self.state.round = round_num
        self.state.records.append(record)
        self.state.strategy_state = self.strategy.state_dict()
        self.bus.publish(record)
        last = round_num == self.cfg.rounds or self.target_reached()
        if self.checkpoint_dir and (round_num % self.cfg.checkpoint_every == 0 or last):
            self.checkpoint()

    def checkpoint(self) -> None:
        assert self.checkpoint_dir is not None
        save_checkpoint(self.checkpoint_dir, self.state.round, self.state.weights,
                        self.state.to_json(), keep=self.cfg.keep_checkpoints)
