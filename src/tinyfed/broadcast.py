"""What the server sends each client: the global model, or the steps from the model it holds.

Two downlinks, chosen by `down_codec`:

- `SharedModel` (``""``, ``fp16``, ``int8``, ``qsgd:B``, ``+zstd``): one payload a round, the
  same for every client, which needs no earlier model (a stateless client).
- `ModelSteps` (``delta+…``, e.g. ``delta+topk:0.01+int8+zstd``): the server keeps x̂_v, the
  model every client that holds version v has bit for bit, and the encoded steps of the last
  `down_history` versions: x̂_v = x̂_{v-1} + D(E(x_v − x̂_{v-1})), x being the server's exact
  model. What a lossy step leaves out is still in the next step's difference, so the
  downlink's error is fed back without a residual. A client that holds a version within the
  history (every client holds version 0, the seeded initial model) gets the steps since, when
  they are smaller than the model; any other the whole x̂_v, exact. Clients train from x̂_v
  and their updates are moved onto x (`compress.rebase`), so compression never accumulates
  in the global model.

Which version a client holds is known from its last admitted update. In a simulation the model
a client holds rides in its task's device-memory section (`memory.DeviceMemory`), never counted
as link traffic; the steps are.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from tinyfed.compress import HELD, HELD_VERSION, downlink, parse_pipeline
from tinyfed.protocol import ClientResult
from tinyfed.wire import Tensors, encode_tensors

PREFIX = "broadcast::"  # checkpoint tensors: broadcast::model/<v>/<name>, broadcast::step/<key>


class Downlink(Protocol):
    def prepare(self, version: int, exact: Tensors) -> Tensors:
        """Make version `version` of the global model ready to send; returns what clients
        will hold (the reference their updates are decoded against)."""

    def for_client(self, client_id: int) -> tuple[bytes, int, str, Tensors]:
        """(payload, base version or -1 for a whole model, its codec, memory to go with it)."""

    def commit(self, result: ClientResult) -> None: ...
    def report(self) -> dict[str, Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def tensors(self) -> Tensors: ...
    def load(self, state: dict[str, Any], tensors: Tensors) -> None: ...


def round_seed(seed: int, version: int) -> int:
    """Stochastic rounding's seed for one version of the model (every client gets the same)."""
    return (seed * 7_919 + version) % (2**63 - 1)


class SharedModel:
    """One payload a round for everyone (see the module docstring)."""

    def __init__(self, spec: str, seed: int):
        self.spec, self.seed = spec, seed
        self.payload = b""

    def prepare(self, version: int, exact: Tensors) -> Tensors:
        self.payload, seen = downlink(exact, self.spec, round_seed(self.seed, version))
        return seen

    def for_client(self, client_id: int) -> tuple[bytes, int, str, Tensors]:
        return self.payload, -1, self.spec, {}

    def commit(self, result: ClientResult) -> None:
        pass

    def report(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def tensors(self) -> Tensors:
        return {}

    def load(self, state: dict[str, Any], tensors: Tensors) -> None:
        pass


class ModelSteps:
    """Steps from the version a client holds (see the module docstring).

    Every client starts holding version 0, the seeded initial model, which a device builds
    itself from the config (model factory and seed): no bytes. The server keeps the encoded
    steps of the last `history` versions (small) and the models of the versions some client
    holds within them (at most history + 1 copies); a checkpoint stores the oldest of those
    models and the steps after it, and a resume replays them (the same float operations, so
    the same models bit for bit)."""

    def __init__(self, spec: str, history: int, seed: int):
        self.spec, self.history, self.seed = spec, history, seed
        self.pipeline = parse_pipeline(spec)
        self.models: dict[int, Tensors] = {}  # x̂_v for the current version and held ones
        self.steps: dict[int, Tensors] = {}  # encoded step v-1 → v, tensors named '<v>/<name>'
        self.step_bytes: dict[int, int] = {}
        self.held: dict[int, int] = {}  # client → version it holds (0 until an admitted update)
        self.version = -1
        self.full = b""
        self.sent = {"down_steps": 0, "down_full": 0}

    def prepare(self, version: int, exact: Tensors) -> Tensors:
        if version not in self.models:
            prev = self.models.get(version - 1)
            if prev is None:  # version 0: the initial model everyone holds
                model = {k: v.clone() for k, v in exact.items()}
            else:
                step = self.pipeline.encode(exact, prev, seed=round_seed(self.seed, version))
                model = self.pipeline.decode(step, prev)
                self.steps[version] = {f"{version}/{k}": t for k, t in step.items()}
                self.step_bytes[version] = len(encode_tensors(self.steps[version]))
            self.models[version] = model
        if version != self.version:
            self.version, self.full = version, encode_tensors(self.models[version])
            self.prune()
        return self.models[version]

    def prune(self) -> None:
        """Drop steps older than the history and models no client holds within it."""
        oldest = self.version - self.history
        for v in [v for v in self.steps if v <= oldest]:
            del self.steps[v], self.step_bytes[v]
        keep = {self.version} | {v for v in self.held_versions() if v >= oldest}
        for v in [v for v in self.models if v not in keep]:
            del self.models[v]

    def held_versions(self) -> set[int]:
        return set(self.held.values()) | {0}

    def for_client(self, client_id: int) -> tuple[bytes, int, str, Tensors]:
        held, now = self.held.get(client_id, 0), self.version
        if held in self.models and held <= now:
            span = range(held + 1, now + 1)
            if sum(self.step_bytes[v] for v in span) < len(self.full):
                self.sent["down_steps"] += 1
                chain = {k: t for v in span for k, t in self.steps[v].items()}
                memory = {f"{HELD}/{k}": t for k, t in self.models[held].items()}
                memory[f"{HELD_VERSION}/v"] = torch.tensor([held], dtype=torch.int64)
                return encode_tensors(chain), held, self.spec, memory
        self.sent["down_full"] += 1
        return self.full, -1, "", {}

    def commit(self, result: ClientResult) -> None:
        if result.ok:
            self.held[result.client_id] = result.version

    def report(self) -> dict[str, Any]:
        out, self.sent = self.sent, {"down_steps": 0, "down_full": 0}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"held": {str(c): v for c, v in self.held.items()}, "version": self.version,
                "base": min(self.models, default=-1)}

    def tensors(self) -> Tensors:
        """The oldest model kept and the steps after it (the rest is replayed on resume)."""
        if not self.models:
            return {}
        base = min(self.models)
        out = {f"{PREFIX}model/{base}/{k}": t for k, t in self.models[base].items()}
        out.update({f"{PREFIX}step/{k}": t for v, s in self.steps.items() if v > base
                    for k, t in s.items()})
        return out

    def load(self, state: dict[str, Any], tensors: Tensors) -> None:
        self.held = {int(c): int(v) for c, v in state.get("held", {}).items()}
        self.models, self.steps, self.version = {}, {}, -1
        base, now = int(state.get("base", -1)), int(state.get("version", -1))
        if base < 0:
            return
        model: Tensors = {}
        for key, value in tensors.items():
            kind, _, rest = key.removeprefix(PREFIX).partition("/")
            if kind == "model":
                model[rest.partition("/")[2]] = value
            elif kind == "step":
                self.steps.setdefault(int(rest.partition("/")[0]), {})[rest] = value
        self.step_bytes = {v: len(encode_tensors(s)) for v, s in self.steps.items()}
        self.models[base] = model
        for v in range(base + 1, now + 1):  # replay: the same decodes as when they were made
            step = {k.partition("/")[2]: t for k, t in self.steps[v].items()}
            self.models[v] = self.pipeline.decode(step, self.models[v - 1])
        self.prepare(now, self.models[now])


def make_downlink(spec: str, history: int, seed: int) -> Downlink:
    return ModelSteps(spec, history, seed) if spec.startswith("delta") else SharedModel(spec, seed)
