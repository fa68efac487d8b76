"""Each simulated device's memory between its tasks: the codec's error-feedback residual.

A device that sends top-k updates keeps what it has not sent yet (Stich et al. 2018). In a
simulation one worker serves many clients and may die and be replaced, so the server keeps each
client's memory: it goes out with the client's task in the frame's device-memory section (not
counted as link traffic: on a real device it never leaves the device) and comes back with the
update. It is replaced only when the server admits that update, so a task that fails, times out
or is retried leaves it as it was (a task run twice encodes the same update); it is saved in
every checkpoint, so a resumed run continues bit for bit with every codec and every runtime.
A client with no stored memory (its first task, or memory lost) starts from zero, and the
round's record counts those tasks (`memory_fresh`).
"""

from __future__ import annotations

import dataclasses

from tinyfed import wire
from tinyfed.compress import parse_pipeline
from tinyfed.protocol import ClientResult, ClientTask
from tinyfed.wire import Tensors, TensorSpec

PREFIX = "device::"  # checkpoint tensors that are a device's memory: device::<id>/<name>


class DeviceMemory:
    def __init__(self, codec: str, model: dict[str, TensorSpec]):
        self.spec = parse_pipeline(codec).memory_spec(model)
        self.store: dict[int, Tensors] = {}
        self.fresh: set[int] = set()  # clients sent a task without memory since the last record

    def attach(self, task: ClientTask, payload: bytes,
               held: Tensors | None = None) -> tuple[ClientTask, bytes]:
        """The task and payload with the client's memory section: its residual (for a codec
        that keeps one) and `held`, the model it holds when the downlink sends steps."""
        memory = dict(held or {})
        if self.spec:
            residual = self.store.get(task.client_id, {})
            if not residual:
                self.fresh.add(task.client_id)
            memory.update(residual)
        if not memory:
            return task, payload
        payload, size = wire.join_memory(payload, memory)
        return dataclasses.replace(task, memory_bytes=size), payload

    def commit(self, result: ClientResult) -> None:
        """The server admitted this update: the device's memory is what it sent back."""
        if self.spec and result.ok:
            self.store[result.client_id] = result.memory

    def report(self) -> dict[str, int]:
        """Record fields: tasks that went out with no memory to start from, then reset."""
        if not self.spec:
            return {}
        fresh, self.fresh = len(self.fresh), set()
        return {"memory_fresh": fresh, "memory_clients": len(self.store)}

    def tensors(self) -> Tensors:
        return {f"{PREFIX}{cid}/{name}": t for cid, mem in self.store.items()
                for name, t in mem.items()}

    def load(self, tensors: Tensors) -> None:
        """Restore from a checkpoint's `device::` tensors (ignoring ones this codec lacks)."""
        self.store = {}
        for key, value in tensors.items():
            cid, _, name = key.removeprefix(PREFIX).partition("/")
            if name in self.spec:
                self.store.setdefault(int(cid), {})[name] = value
