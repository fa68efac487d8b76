"""The messages of one client task: task frames out, update frames back, and their checks.

`ClientWorker` is the client side every runtime runs (in the server process, in a child
process, on a remote device); `read_update` is the server side that admits an update only
after every check passes.
"""

from __future__ import annotations

import math
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tinyfed import wire
from tinyfed.algorithms import client_algorithm
from tinyfed.attacks import attack_of
from tinyfed.client import Shard, TrainSettings
from tinyfed.compress import (
    HELD,
    HELD_VERSION,
    apply_steps,
    memory_state,
    memory_tensors,
    parse_pipeline,
)
from tinyfed.errors import WireError
from tinyfed.faults import injected
from tinyfed.models import build_model, state_of
from tinyfed.trainers import choose
from tinyfed.vectorized import train_stacked
from tinyfed.wire import Kind, Tensors, TensorSpec

MAX_ID = 2**31 - 1


EXTRA = "extra/"  # name prefix of a frame's tensors that are not the model (SCAFFOLD's c, c_i)
MAX_PARAMS = 16  # numbers a task may carry for its client algorithm


def with_extras(tensors: Tensors, extras: Tensors) -> Tensors:
    """One tensor set for a frame: the (encoded) model, and the extras under their prefix. A
    model's own tensor names never hold '/', so the two cannot collide."""
    return {**tensors, **{EXTRA + k: v for k, v in extras.items()}}


def split_extras(tensors: Tensors) -> tuple[Tensors, Tensors]:
    """A frame's tensors as (model part, extras without their prefix)."""
    model = {k: v for k, v in tensors.items() if not k.startswith(EXTRA)}
    extras = {k[len(EXTRA):]: v for k, v in tensors.items() if k.startswith(EXTRA)}
    return model, extras


class TaskPayloads:
    """Task payloads: the round's shared one as it is, or, for a client with tensors of its own
    (SCAFFOLD's variates), the model and those together in one safetensors payload (the shared
    payload is decoded once a round, not once per client)."""

    def __init__(self) -> None:
        self._payload: bytes | None = None
        self._tensors: Tensors = {}

    def for_client(self, payload: bytes, extras: Tensors) -> bytes:
        if not extras:
            return payload
        if self._payload is not payload:
            self._payload, self._tensors = payload, wire.decode_tensors(payload)
        return wire.encode_tensors(with_extras(self._tensors, extras))


MAX_NAME = 200  # characters of an algorithm's or attack's name (a module path fits)


def bounded_name(header: dict[str, Any], key: str) -> str:
    value = header.get(key, "")
    if not isinstance(value, str) or len(value) > MAX_NAME:
        raise WireError(f"task field {key!r} must be a name of at most {MAX_NAME} characters")
    return value


def check_params(raw: Any) -> dict[str, float]:
    """A task's algorithm parameters: at most MAX_PARAMS finite numbers by short names."""
    if not isinstance(raw, dict) or len(raw) > MAX_PARAMS:
        raise WireError(f"task field 'params' must be an object of at most {MAX_PARAMS} numbers")
    out = {}
    for key, value in raw.items():
        if len(str(key)) > 40 or not isinstance(value, (int, float)) or isinstance(value, bool) \
                or not math.isfinite(value):
            raise WireError(f"task parameter {str(key)[:40]!r} must be a finite number")
        out[str(key)] = float(value)
    return out


@dataclass(frozen=True)
class ClientTask:
    """One client, one job: which round, which seed, which settings, which codecs, and which
    client algorithm (FedProx's proximal term, SCAFFOLD's control variates, DP clipping) with
    its parameters; in a simulated attack, which attack this client plays."""

    client_id: int
    round: int
    seed: int
    settings: TrainSettings
    codec: str = ""
    version: int = 0  # version of the global weights the task carries (async staleness)
    down_codec: str = ""  # how the global weights in this task's frame are encoded
    algorithm: str = ""  # client algorithm (tinyfed.algorithms.CLIENT_ALGORITHMS); '' = plain
    params: dict[str, float] = field(default_factory=dict, hash=False)
    attack: str = ""  # a simulated Byzantine client's attack (tinyfed.attacks.ATTACKS)
    memory_bytes: int = 0  # size of the device-memory section at the payload's end (wire)
    base_version: int = -1  # the payload holds steps from this version (-1: a whole model)

    def header(self) -> dict[str, Any]:
        h = {
            "client_id": self.client_id,
            "round": self.round,
            "seed": self.seed,
            "settings": self.settings.to_dict(),
            "codec": self.codec,
            "version": self.version,
            "down_codec": self.down_codec,
        }
        # only when set, so a plain FedAvg task's frame (and its byte count) is what it was
        for key in ("algorithm", "params", "attack", wire.MEMORY_FIELD):
            if getattr(self, key):
                h[key] = getattr(self, key)
        if self.base_version >= 0:
            h["base_version"] = self.base_version
        return h

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> ClientTask:
        try:
            return cls(
                client_id=wire.header_int(h, "client_id", 0, MAX_ID),
                round=wire.header_int(h, "round", 0, 2**62),
                seed=wire.header_int(h, "seed", 0, 2**63),
                settings=TrainSettings(**h["settings"]),
                codec=str(h.get("codec", "")),
                version=wire.header_int(h, "version", 0, 2**62),
                down_codec=str(h.get("down_codec", "")),
                algorithm=bounded_name(h, "algorithm"),
                params=check_params(h.get("params", {})),
                attack=bounded_name(h, "attack"),
                memory_bytes=wire.header_int(h, wire.MEMORY_FIELD, 0, 2**62)
                if wire.MEMORY_FIELD in h else 0,
                base_version=wire.header_int(h, "base_version", 0, 2**62)
                if "base_version" in h else -1,
            )
        except (KeyError, TypeError) as exc:
            raise WireError(f"task header is malformed: {exc}") from None


@dataclass
class ClientResult:
    """An update (decoded, validated) or a failure with its reason; always with bytes moved."""

    client_id: int
    round: int
    ok: bool
    weights: Tensors | None = None
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    bytes_down: int = 0
    bytes_up: int = 0
    version: int = 0
    extras: Tensors = field(default_factory=dict)  # what the client algorithm sent back
    memory: Tensors = field(default_factory=dict)  # the device's memory after this task

    @classmethod
    def failure(cls, task: ClientTask, reason: str, bytes_down: int = 0, bytes_up: int = 0):
        return cls(
            task.client_id,
            task.round,
            False,
            reason=reason,
            bytes_down=bytes_down,
            bytes_up=bytes_up,
            version=task.version,
        )


def task_frame(task: ClientTask, weights_payload: bytes, crc: int | None = None) -> bytes:
    """One client's TASK frame; `crc` is the shared payload's `wire.payload_crc`, if known."""
    return wire.encode_frame(Kind.TASK, task.header(), weights_payload, crc)


ShardSource = Callable[[int], Shard]


class ClientWorker:
    """Client side of a task: load global weights, train, encode the update as a frame.

    Holds one model (reused across tasks) and nothing of any client's: a client's own memory
    (its error-feedback residual) comes with its task and goes back with its update, so the
    same object serves one client id or many, and a respawned worker loses nothing.
    """

    def __init__(
        self,
        model_name: str,
        input_shape,
        num_classes: int,
        shards: ShardSource,
        max_frame: int = wire.DEFAULT_MAX_FRAME,
        trainer: str = "auto",
    ):
        self.model = build_model(model_name, tuple(input_shape), num_classes, seed=0)
        self.trainer = trainer  # the config's: trainers.choose picks per optimizer
        self.num_classes = num_classes
        self.spec = wire.spec_of(state_of(self.model))
        self.shards = shards
        self.max_frame = max_frame
        self._shard_cache: dict[int, Shard] = {}
        self.tally: Counter[str] = Counter()  # tasks trained "stacked" and "alone", for reports

    def shard(self, client_id: int) -> Shard:
        if client_id not in self._shard_cache:
            self._shard_cache[client_id] = self.shards(client_id)
        return self._shard_cache[client_id]

    def handle(self, frame: bytes) -> bytes:
        """Task frame in, update (or failure) frame out. Never raises for a bad task."""
        return self.handle_many([frame])[0]

    def handle_many(self, frames: list[bytes]) -> list[bytes]:
        """Task frames in, update (or failure) frames out, in order. Clients that share their
        settings train as one stacked computation where `trainers.choose` says stacking pays
        (`tinyfed.vectorized`); the rest (one client alone, a client algorithm that corrects
        gradients) one by one. One bad task fails alone; this never raises for a bad task."""
        out: list[bytes | None] = [None] * len(frames)
        groups: dict[TrainSettings, list[tuple[int, _Prepared]]] = {}
        memo = wire.PayloadMemo()  # the batch's shared weights: CRC'd and checked once
        for i, frame in enumerate(frames):
            try:
                msg = wire.decode_frame(frame, self.max_frame, memo)
                if msg.kind != Kind.TASK:
                    raise WireError(f"expected a task frame, got {msg.kind.name}")
                task = ClientTask.from_header(msg.header)
            except WireError as exc:
                out[i] = wire.encode_frame(Kind.FAILURE, {"reason": f"bad task: {exc}"})
                continue
            out[i] = injected(task.client_id, task.round)  # the test hook: None in normal use
            if out[i] is not None:
                continue
            try:
                job = self.prepare(task, msg.tensors, msg.memory, memo.checked)
                if self._stacks(job):
                    groups.setdefault(task.settings, []).append((i, job))
                else:
                    self.tally["alone"] += 1
                    out[i] = self.complete(job, *self.train_one(job))
            except Exception as exc:  # a client's crash is its round's failure, not the server's
                out[i] = _failed(task, exc)
        for settings, members in groups.items():
            self.tally["alone" if len(members) == 1 else "stacked"] += len(members)
            try:
                if len(members) == 1:  # alone, the one-client trainer is the faster
                    self.model.load_state_dict(members[0][1].start)  # later tasks loaded theirs
                    trained = [self.train_one(members[0][1])]
                else:
                    trained = train_stacked(self.model, [job.start for _, job in members],
                                            [job.shard for _, job in members], settings,
                                            [job.task.seed for _, job in members])
            except Exception as exc:
                for i, job in members:
                    out[i] = _failed(job.task, exc)
                continue
            for (i, job), (local, metrics) in zip(members, trained):
                try:
                    out[i] = self.complete(job, local, metrics)
                except Exception as exc:
                    out[i] = _failed(job.task, exc)
        return out  # type: ignore[return-value]

    def _stacks(self, job: _Prepared) -> bool:
        """Whether this client may join a stacked computation: the trainer choice for its
        settings says stacking pays, and nothing corrects its gradients step by step."""
        settings = job.task.settings
        choice = choose(self.model, self.trainer, settings.optimizer,
                        threads=torch.get_num_threads(), batch_size=settings.batch_size,
                        stacking=True)
        return choice.stacks and job.correct is None and len(job.shard) > 0

    def prepare(self, task: ClientTask, payload: Tensors, memory: Tensors | None = None,
                checked: set[str] | None = None) -> _Prepared:
        """The task's global weights decoded, checked and loaded into the model; its shard
        (poisoned, for an attack); its client algorithm's gradient correction. `checked`: the
        down codecs whose decoding of this very payload (same bytes) already passed the check
        (`wire.PayloadMemo`); decoding is a function of the bytes, so it is not repeated."""
        algorithm = client_algorithm(task.algorithm)
        attack = attack_of(task.attack)
        payload, extras = split_extras(payload)
        state = memory_state(memory or {})
        held, held_version = state.pop(HELD, None), state.pop(HELD_VERSION, {}).get("v")
        if task.base_version >= 0:
            if held is None or held_version is None or held_version.tolist() != [
                    task.base_version]:
                raise WireError(f"the task's steps start at model version {task.base_version}; "
                                f"this device holds "
                                f"{'none' if held_version is None else held_version.tolist()}")
            global_weights = apply_steps(payload, held, task.base_version, task.version,
                                         task.down_codec, self.max_frame)
            wire.validate_tensors(global_weights, self.spec, "global model")  # held: not memoized
        else:
            if task.down_codec.startswith("delta"):
                raise WireError(f"down_codec {task.down_codec!r} sends steps, but the task names "
                                f"no base_version to start from")
            down = parse_pipeline(task.down_codec, WireError, downlink=True)
            global_weights = down.decode(payload, self.model.state_dict(), self.max_frame)
            if checked is None or task.down_codec not in checked:
                wire.validate_tensors(global_weights, self.spec, "global model")
                if checked is not None:
                    checked.add(task.down_codec)
        self.model.load_state_dict(global_weights)
        shard = self.shard(task.client_id)
        if attack is not None:
            shard = attack.poison(shard, self.num_classes)
        correct = algorithm.prepare(self.model, global_weights, extras, task)
        return _Prepared(task, algorithm, attack, global_weights, extras, state, shard, correct)

    def train_one(self, job: _Prepared) -> tuple[Tensors, dict[str, float]]:
        """One client trained alone, on the model as `prepare` left it (its start weights)."""
        trainer = choose(self.model, self.trainer, job.task.settings.optimizer)
        metrics = trainer.train(self.model, job.shard, job.task.settings, job.task.seed,
                                job.correct)
        return state_of(self.model), metrics

    def complete(self, job: _Prepared, local: Tensors, metrics: dict[str, float]) -> bytes:
        """The trained weights through the client algorithm, an attack's forgery and the
        update codec, as an update frame."""
        task = job.task
        local, extras_out = job.algorithm.finish(local, job.start, job.extras, task, metrics)
        if job.attack is not None:
            local = job.attack.forge(local, job.start, task.seed,
                                     task.params.get("attack_scale", 1.0))
        encoded = parse_pipeline(task.codec, WireError).encode(local, job.start, job.state,
                                                               seed=task.seed)
        body, memory_bytes = wire.join_memory(
            wire.encode_tensors(with_extras(encoded, extras_out)), memory_tensors(job.state))
        header = {
            "client_id": task.client_id,
            "round": task.round,
            "version": task.version,
            "num_examples": len(job.shard),
            "codec": task.codec,
            # wall-clock time stays local: it would make frame sizes differ run to run
            "metrics": {k: v for k, v in metrics.items() if k != "train_seconds"},
        }
        if memory_bytes:
            header[wire.MEMORY_FIELD] = memory_bytes
        return wire.encode_frame(Kind.UPDATE, header, body)


@dataclass
class _Prepared:
    """A task between decoding and training: what training and the update frame need."""

    task: ClientTask
    algorithm: Any
    attack: Any
    start: Tensors  # the global weights this client starts from (checked)
    extras: Tensors
    state: Tensors  # the device memory the task brought (codec state)
    shard: Shard
    correct: Callable[[], None] | None


def _failed(task: ClientTask, exc: Exception) -> bytes:
    """A client's crash as its failure frame."""
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return wire.encode_frame(Kind.FAILURE, {"client_id": task.client_id, "round": task.round,
                                            "reason": f"client error: {last}"})


@dataclass
class Expectation:
    """What the server will accept as the answer to one task."""

    task: ClientTask
    reference: Tensors
    spec: dict[str, TensorSpec]
    max_examples: int
    max_frame: int = wire.DEFAULT_MAX_FRAME
    max_abs: float = wire.DEFAULT_MAX_ABS  # largest |value| a decoded float tensor may hold
    extras: dict[str, TensorSpec] = field(default_factory=dict)  # what the algorithm returns
    memory: dict[str, TensorSpec] = field(default_factory=dict)  # the device memory returned


# Metrics a client reports, with the range each must fall in; any other name is refused.
METRICS: dict[str, tuple[float, float]] = {
    "train_loss": (0.0, 1e9),
    "steps": (0.0, 1e12),
    "within_clip": (0.0, 1.0),  # DP clients: was the update within the clipping bound
}


def check_metrics(raw: Any) -> dict[str, float]:
    """A client's metrics as finite floats within their declared ranges, or WireError naming
    the field: a NaN or huge loss would otherwise poison the round's record and checkpoint."""
    if not isinstance(raw, dict):
        raise WireError(f"header field 'metrics' must be an object, got {type(raw).__name__}")
    out: dict[str, float] = {}
    for key, value in raw.items():
        bounds = METRICS.get(key)
        if bounds is None:
            raise WireError(f"metric {str(key)[:40]!r} is not known; allowed: "
                            f"{', '.join(sorted(METRICS))}")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise WireError(f"metric {key!r} must be a number, got {type(value).__name__}")
        lo, hi = bounds
        number = float(value) if abs(value) <= hi else math.inf  # float(10**400) would raise
        if not lo <= number <= hi:
            raise WireError(f"metric {key!r} = {str(value)[:24]} is outside [{lo:g}, {hi:g}]")
        out[key] = number
    return out


def check_update(frame: bytes, exp: Expectation) -> ClientResult:
    """Decode and validate an update frame; raise WireError for anything not admissible.

    The one boundary every client byte crosses: whatever a decoder below raises (a tensor op
    on hostile shapes, a library's own error type) comes out as WireError, so no runtime's
    reader thread or request handler ever dies of a client's frame."""
    try:
        return _check_update(frame, exp)
    except WireError:
        raise
    except (Exception, RecursionError) as exc:  # noqa: BLE001
        raise WireError(f"update cannot be decoded: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from None


def _check_update(frame: bytes, exp: Expectation) -> ClientResult:
    msg = wire.decode_frame(frame, exp.max_frame)
    if msg.kind == Kind.FAILURE:
        reason = str(msg.header.get("reason", "client reported failure"))[:500]
        return ClientResult.failure(exp.task, reason, bytes_up=len(frame))
    if msg.kind != Kind.UPDATE:
        raise WireError(f"expected an update frame, got {msg.kind.name}")
    h = msg.header
    cid = wire.header_int(h, "client_id", 0, MAX_ID)
    if cid != exp.task.client_id:
        raise WireError(f"update is for client {cid}; expected client {exp.task.client_id}")
    rnd = wire.header_int(h, "round", 0, 2**62)
    if rnd != exp.task.round:
        raise WireError(f"update is for round {rnd}; expected round {exp.task.round}")
    n = wire.header_int(h, "num_examples", 1, exp.max_examples)
    codec = h.get("codec", "")
    if codec != exp.task.codec:
        raise WireError(f"update codec {str(codec)[:40]!r} differs from its task's "
                        f"{exp.task.codec!r}")
    version = h.get("version", exp.task.version)
    if version != exp.task.version:
        raise WireError(f"update is for model version {str(version)[:20]}; the task sent "
                        f"version {exp.task.version}")
    metrics = check_metrics(h.get("metrics", {}))
    tensors, extras = split_extras(msg.tensors)
    # e.g. a SCAFFOLD result without its variate: refused, never merged
    wire.validate_tensors(extras, exp.extras, f"{exp.task.algorithm or 'update'} extras",
                          max_abs=exp.max_abs)
    # an error-feedback residual of the wrong shape would poison this client's next tasks
    wire.validate_tensors(msg.memory, exp.memory, "device memory", max_abs=exp.max_abs)
    decoded = parse_pipeline(codec, WireError).decode(tensors, exp.reference, exp.max_frame)
    wire.validate_tensors(decoded, exp.spec, max_abs=exp.max_abs)
    return ClientResult(
        cid, rnd, True, decoded, n, metrics, bytes_up=msg.radio_bytes, version=exp.task.version,
        extras=extras, memory=msg.memory,
    )


def read_update(frame: bytes, exp: Expectation) -> ClientResult:
    """`check_update`, with a rejection turned into a failure result (the run goes on)."""
    try:
        return check_update(frame, exp)
    except WireError as exc:
        return ClientResult.failure(exp.task, f"rejected update: {exc}", bytes_up=len(frame))
