"""Synchronous rounds (McMahan et al. 2017), a policy over the run core.

Each round: select C·K clients, send each the global weights, fold every admitted update into
the strategy's running aggregate as it arrives, retry only the clients that failed while the
round is short of `min_clients`, then evaluate, record and checkpoint (the core's work). It
knows nothing of pipes, HTTP or Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinyfed.client import task_seed
from tinyfed.core import RoundFailed, RunCore, RunState, Tally
from tinyfed.experiment import Experiment
from tinyfed.metrics import EventBus, Record
from tinyfed.protocol import ClientResult, ClientTask
from tinyfed.runtimes.base import Runtime
from tinyfed.strategies import Strategy, select_clients

__all__ = ["OrderedFeed", "RoundFailed", "RunState", "Server"]


class OrderedFeed:
    """Feeds results to an aggregator in selection order when the run must be deterministic.

    Floating-point sums depend on order; holding early arrivals until their predecessors are in
    (or given up: `put(id, None)`) makes the aggregate identical whatever order a runtime
    delivers results in.
    """

    def __init__(self, order: list[int], add, ordered: bool):
        self.order, self.add, self.ordered = order, add, ordered
        self.pos = 0
        self.held: dict[int, ClientResult | None] = {}

    def put(self, client_id: int, result: ClientResult | None) -> None:
        if not self.ordered:
            if result is not None:
                self.add(result)
            return
        self.held[client_id] = result
        while self.pos < len(self.order) and self.order[self.pos] in self.held:
            res = self.held.pop(self.order[self.pos])
            if res is not None:
                self.add(res)
            self.pos += 1


class Server:
    """Runs synchronous rounds over any runtime."""

    def __init__(self, experiment: Experiment, runtime: Runtime, strategy: Strategy,
                 bus: EventBus, checkpoint_dir: Path | None = None):
        self.core = RunCore(experiment, bus, checkpoint_dir)
        self.core.watch(runtime)
        self.exp, self.cfg = experiment, experiment.config
        self.runtime = runtime
        self.strategy = strategy

    @property
    def state(self) -> RunState:
        return self.core.state

    @property
    def stop_reason(self) -> str:
        return self.core.stop_reason

    def run(self) -> RunState:
        """Rounds from the state's next round to the configured last, or to the target (of
        accuracy, or a strategy's budget such as ε)."""
        core = self.core
        while core.state.round < self.cfg.rounds:
            if core.target_reached():
                core.stop_reason = "target accuracy reached"
                break
            budget = self.strategy.stop_before(core.state.round + 1)
            if budget:
                core.stop_reason = budget
                break
            self.run_round(core.state.round + 1)
        else:
            core.stop_reason = core.stop_reason or "all rounds done"
        return core.state

    def run_round(self, round_num: int) -> Record:
        cfg, core = self.cfg, self.core
        weights = core.state.weights
        selected = select_clients(self.exp.client_ids, cfg.clients_asked, cfg.seed, round_num)
        seen = core.downlink.prepare(round_num - 1, weights)  # what clients will hold
        told = {cid: self.strategy.configure(round_num, cid, weights) for cid in selected}
        agg = self.strategy.begin_round(weights, round_num)
        feed = OrderedFeed(selected, agg.add, cfg.deterministic)
        tally, todo, attempt = Tally(), selected, 0
        while True:
            attempt += 1
            for cid in todo:
                attack, attack_params = core.hostile(cid)
                task = ClientTask(cid, round_num, task_seed(cfg.seed, round_num, cid),
                                  core.settings(round_num), cfg.codec, version=round_num - 1,
                                  algorithm=told[cid].algorithm,
                                  params={**told[cid].params, **attack_params}, attack=attack)
                expect = core.expectation(task, seen)
                expect.extras = told[cid].returns
                core.submit(self.runtime, task, expect, extras=told[cid].tensors)
            failed = []
            core.progress(round_num, tally, len(selected))
            for result in self.runtime.results(cfg.round_timeout):
                tally.count_bytes(result)
                result = core.admit(result, seen, weights)
                if result.ok:
                    tally.success(result)
                    feed.put(result.client_id, result)
                else:
                    tally.failure(result.client_id, result.reason, attempt=attempt)
                    failed.append(result.client_id)
                core.progress(round_num, tally, len(selected))
            if tally.ok >= min(cfg.min_clients, len(selected)):
                break
            if attempt > cfg.round_retries or not failed:
                raise RoundFailed(
                    f"round {round_num}: {tally.ok} of {len(selected)} clients succeeded, fewer "
                    f"than min_clients={cfg.min_clients}, after {attempt} attempts; "
                    f"rounds 1-{round_num - 1} are saved")
            todo = sorted(failed)  # only the clients that failed run again
        for cid in failed:  # given up: later results may now be fed in order
            feed.put(cid, None)
        core.state.weights = agg.result()
        record = core.round_record(round_num, tally, len(selected))
        record.update(self.strategy.report())
        core.note_attackers(record, selected, tally)
        core.finish_round(round_num, record, self.policy_state(), self.strategy.tensor_state())
        return record

    def policy_state(self) -> dict[str, Any]:
        return {"strategy": self.strategy.state_dict()}

    def checkpoint(self) -> None:
        self.core.checkpoint(self.policy_state(), self.strategy.tensor_state())

    def resume(self, weights, data: dict[str, Any], records: list[Record]) -> None:
        state, tensors = self.core.resume(weights, data, records)
        self.strategy.load_tensor_state(tensors)
        self.strategy.load_state_dict(state.strategy_state)

