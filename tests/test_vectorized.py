"""Vectorized clients: a round's clients trained as one stacked computation give each client
the update training it alone gives (to float tolerance), keep its own data order, shard size
and step count, are bit-identical run to run, split into chunks by memory, and are chosen only
where stacking pays; one bad task among stacked ones fails alone."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_small, same_tensors, small_config
from tests.test_trainers import close, shard, two_nn
from tinyfed import vectorized, wire
from tinyfed.client import TrainSettings, task_seed
from tinyfed.errors import ConfigError
from tinyfed.fused import train_fused
from tinyfed.models import state_of
from tinyfed.protocol import ClientTask, ClientWorker, task_frame
from tinyfed.trainers import choose
from tinyfed.vectorized import chunk_size, footprint, train_stacked
from tinyfed.wire import Kind

SIZES = [23, 5, 40, 1, 23, 12]  # uneven shards: short ones stop stepping early

SETTINGS = {
    "B=10, E=2, uneven last batches": TrainSettings(epochs=2, batch_size=10, lr=0.1),
    "B larger than some shards": TrainSettings(epochs=1, batch_size=16, lr=0.05),
    "FedSGD (B=all), shards of different sizes": TrainSettings(epochs=2, batch_size=0, lr=0.3),
    "momentum + weight decay, E=3": TrainSettings(epochs=3, batch_size=6, lr=0.05,
                                                  momentum=0.9, weight_decay=1e-3),
}


def one_by_one(model, shards, settings, seeds):
    start = state_of(model)
    out = []
    for data, seed in zip(shards, seeds):
        model.load_state_dict(start)
        metrics = train_fused(model, data, settings, seed)
        out.append((state_of(model), metrics))
    model.load_state_dict(start)
    return out


@pytest.mark.parametrize("name", list(SETTINGS))
def test_stacked_clients_get_the_updates_they_get_alone(name):
    settings = SETTINGS[name]
    model = two_nn()
    before = state_of(model)
    shards = [shard(n, seed=i) for i, n in enumerate(SIZES)]
    seeds = [task_seed(0, 1, i) for i in range(len(SIZES))]
    alone = one_by_one(model, shards, settings, seeds)
    stacked = train_stacked(model, [before] * len(SIZES), shards, settings, seeds)
    assert same_tensors(state_of(model), before)  # the template is not trained
    for (w_alone, m_alone), (w_stack, m_stack) in zip(alone, stacked):
        close(w_alone, w_stack, tol=1e-5)
        assert m_stack["steps"] == m_alone["steps"]
        assert m_stack["train_loss"] == pytest.approx(m_alone["train_loss"], rel=1e-5)
    # each client really moved, and differently (its own data and order)
    assert not same_tensors(stacked[0][0], before)
    assert not same_tensors(stacked[0][0], stacked[4][0])  # same size, other data and seed


def test_each_client_starts_from_its_own_weights():
    model = two_nn()
    starts = [{k: v + 0.01 * i for k, v in state_of(model).items()} for i in range(3)]
    shards = [shard(9, seed=i) for i in range(3)]
    settings = TrainSettings(epochs=1, batch_size=4, lr=0.1)
    got = train_stacked(model, starts, shards, settings, [1, 2, 3])
    for start, data, seed, (weights, _) in zip(starts, shards, [1, 2, 3], got):
        model.load_state_dict(start)
        train_fused(model, data, settings, seed)
        close(state_of(model), weights, tol=1e-5)


def test_stacking_is_bit_identical_run_to_run_and_chunks_by_memory(monkeypatch):
    model = two_nn()
    shards = [shard(n, seed=i) for i, n in enumerate(SIZES)]
    settings = SETTINGS["momentum + weight decay, E=3"]
    seeds = list(range(len(SIZES)))
    start = [state_of(model)] * len(SIZES)
    a = train_stacked(model, start, shards, settings, seeds)
    b = train_stacked(model, start, shards, settings, seeds)
    assert all(same_tensors(x[0], y[0]) for x, y in zip(a, b))
    hot, data = footprint(model, shards, settings)
    # 2NN here: 36·16+16 + 16·12+12 + 12·5+5 = 861 parameters × 3 (weights, gradient,
    # momentum) and activations 3 × 6 rows × (16+12+5); one epoch: 7 steps × 6 rows (B=6, the
    # 40-example shard), each 36 features + 5 targets + 1 row weight
    assert (hot, data) == (4 * (861 * 3 + 3 * 6 * 33), 4 * 7 * 6 * 42)
    assert chunk_size(model, shards, settings) == vectorized.CACHE // hot  # all fit at once
    monkeypatch.setattr(vectorized, "MEMORY", 2 * (hot + data) + 1)
    assert chunk_size(model, shards, settings) == 2
    monkeypatch.setattr(vectorized, "CACHE", hot - 1)
    assert chunk_size(model, shards, settings) == 1  # never an empty chunk
    split = train_stacked(model, start, shards, settings, seeds, chunk=2)
    assert all(same_tensors(x[0], y[0]) for x, y in zip(
        split, train_stacked(model, start, shards, settings, seeds, chunk=2)))
    alone = train_stacked(model, start, shards, settings, seeds, chunk=1)  # one-client trainer
    for (w_all, _), (w_split, _), (w_alone, _), data, seed in zip(a, split, alone, shards, seeds):
        close(w_all, w_split, tol=1e-5)
        model.load_state_dict(start[0])
        train_fused(model, data, settings, seed)
        assert same_tensors(w_alone, state_of(model))


def test_stacking_is_chosen_only_where_it_pays():
    m = two_nn()
    where = dict(stacking=True, batch_size=10)
    assert choose(m, "auto", "sgd", threads=2, **where).name == "vectorized"
    assert choose(m, "auto", "sgd", threads=1, **where).name == "vectorized"
    assert choose(m, "auto", "sgd", threads=1, stacking=True, batch_size=50).name == "fused"
    assert choose(m, "auto", "sgd", threads=2, stacking=True, batch_size=50).name == "vectorized"
    assert choose(m, "auto", "sgd", threads=4, stacking=True, batch_size=60).name == "fused"
    assert choose(m, "auto", "sgd", threads=2, stacking=True, batch_size=0).name == "fused"
    assert choose(m, "auto", "sgd", threads=2, batch_size=10).name == "fused"  # one at a time
    forced = choose(m, "vectorized", "sgd", threads=1, **where)
    assert forced.name == "vectorized" and forced.stacks
    elsewhere = choose(m, "vectorized", "sgd", threads=2, batch_size=10)
    assert elsewhere.name == "fused" and "one client at a time" in elsewhere.reason
    with pytest.raises(ConfigError, match="trainer 'vectorized' cannot train this model: "
                                          "the optimizer is adam"):
        choose(m, "vectorized", "adam", **where)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten())
    with pytest.raises(ConfigError, match="Conv2d"):
        choose(cnn, "vectorized", "sgd", **where)


def worker_and_frames(trainer: str, algorithm: str = ""):
    from tinyfed.experiment import Experiment

    cfg = small_config(trainer=trainer)
    exp = Experiment.build(cfg)
    worker = ClientWorker(cfg.model, exp.dataset.input_shape, exp.dataset.num_classes,
                          exp.shard, trainer=trainer)
    payload = wire.encode_tensors(exp.initial)
    settings = TrainSettings(epochs=1, batch_size=10, lr=0.1)
    tasks = [ClientTask(cid, 1, task_seed(3, 1, cid), settings, "",
                        algorithm=algorithm if cid == 2 else "",
                        params={"mu": 0.5} if cid == 2 and algorithm else {})
             for cid in range(4)]
    return worker, [task_frame(t, payload) for t in tasks]


def test_a_workers_stacked_batch_answers_each_task_as_alone_and_a_bad_task_fails_alone():
    worker, frames = worker_and_frames("vectorized", algorithm="fedprox")
    frames.insert(1, b"not a frame at all")
    replies = worker.handle_many(frames)
    alone, _ = worker_and_frames("fused", algorithm="fedprox")
    assert wire.decode_frame(replies[1]).kind == Kind.FAILURE
    for reply, frame in zip(replies[:1] + replies[2:], frames[:1] + frames[2:]):
        got, want = wire.decode_frame(reply), wire.decode_frame(alone.handle(frame))
        assert got.kind == want.kind == Kind.UPDATE
        assert got.header["client_id"] == want.header["client_id"]
        close(want.tensors, got.tensors, tol=1e-5)
        if got.header["client_id"] == 2:  # FedProx corrects gradients: it trained alone
            assert same_tensors(want.tensors, got.tensors)


def test_in_process_runs_stacked_agree_with_one_by_one_and_the_report_says_which(tmp_path):
    from tinyfed.runner import summary

    stacked = run_small(tmp_path, "stacked", trainer="vectorized", momentum=0.5, batch_size=8)
    fused = run_small(tmp_path, "fused", trainer="fused", momentum=0.5, batch_size=8)
    close(fused.weights, stacked.weights, tol=1e-4)
    assert "client trainer   vectorized (chosen by the config" in summary(stacked)
    assert "; 8 of 8 tasks stacked)" in summary(stacked)  # 4 clients × 2 rounds
    prox = run_small(tmp_path, "prox", trainer="vectorized", strategy="fedprox", batch_size=8)
    assert "; 0 of 8 tasks stacked, the others alone" in summary(prox)
    again = run_small(tmp_path, "again", trainer="vectorized", momentum=0.5, batch_size=8,
                      deterministic=True)
    twice = run_small(tmp_path, "twice", trainer="vectorized", momentum=0.5, batch_size=8,
                      deterministic=True)
    assert same_tensors(again.weights, twice.weights)
    assert again.state.records[-1]["clients_succeeded"] == 4


def test_auto_stacks_in_process_on_two_threads_and_not_under_deterministic(tmp_path):
    from tinyfed.runner import summary

    two = run_small(tmp_path, "two", threads=2, batch_size=10)
    one = run_small(tmp_path, "one", deterministic=True, batch_size=10)
    assert "client trainer   vectorized (Linear/ReLU stack with SGD on 2 threads" in summary(two)
    assert "client trainer   fused" in summary(one)


def test_an_asynchronous_run_stacks_its_waiting_clients_and_merges_each(tmp_path):
    """Async in-process: the queued clients train stacked, their results are merged one by
    one, each counted."""
    from tinyfed.runner import summary

    done = run_small(tmp_path, "async", mode="async", concurrency=3, fraction=0.5, rounds=3,
                     trainer="vectorized", batch_size=10)
    records = list(done.state.records)
    assert len(records) == 3 and all(r["clients_succeeded"] == 2 for r in records)
    assert "client trainer   vectorized" in summary(done)
    assert records[-1]["test_accuracy"] > records[0]["test_accuracy"] - 0.05
