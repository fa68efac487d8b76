"""A scripted client process for tests/test_http_async.py: no training, crafted updates.

It holds the open tasks of its client ids (long-polled from `/v1/task`) and, each time the
server has all `concurrency` tasks out (so the previous post has been merged and the model
republished), saves the served model and performs the plan's next action:

- ``{"pick": "new"|"old", "value": v, "n": n}``: answer the newest / oldest held task with an
  UPDATE frame whose every tensor is filled with ``v`` and ``num_examples = n``;
- ``{"pick": ..., "bad": "shape"|"examples"}``: answer it with a frame the server must refuse
  (one tensor of the wrong shape / more examples than the shard holds);
- ``{"bad": "dup"}``: post the previous action's frame again.

It writes ``log.json`` (what was posted, for which task, the HTTP status) and
``model-<i>.safetensors`` (the model served before action i) into the plan's ``out`` folder,
then polls every id until the server says the run is over (410). Usage: ``async_driver.py
PLAN.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file

from tinyfed import wire
from tinyfed.runtimes.http.auth import read_tokens
from tinyfed.runtimes.http.hub import peek_header
from tinyfed.wire import Kind

LIMIT = 120.0  # seconds: a safety net so a broken server cannot hang the test forever


class Driver:
    def __init__(self, plan: dict):
        self.plan = plan
        self.out = Path(plan["out"])
        self.tokens = read_tokens(plan["tokens"])
        self.ids: list[int] = plan["clients"]
        self.http = httpx.Client(base_url=plan["server"], timeout=30.0)
        self.held: dict[int, dict] = {}  # client id -> header of its open task
        self.template: dict[str, torch.Tensor] = {}
        self.over: set[int] = set()
        self.log: list[dict] = []
        self.last_frame: tuple[int, bytes] | None = None

    def auth(self, cid: int) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[cid]}"}

    def poll(self, cid: int) -> None:
        r = self.http.get("/v1/task", params={"client_id": cid, "wait": 0}, headers=self.auth(cid))
        if r.status_code == 410:
            self.over.add(cid)
        elif r.status_code == 200:
            _, header = peek_header(r.content, 1 << 30)
            if not self.template:
                self.template = wire.decode_frame(r.content, 1 << 30).tensors
            self.held[cid] = header
        elif r.status_code != 204:
            raise SystemExit(f"GET /v1/task for {cid}: {r.status_code} {r.text}")

    def fill(self, want: int) -> None:
        """Poll the ids without a held task until `want` tasks are held."""
        end = time.monotonic() + LIMIT
        while len(self.held) < want:
            if self.over or time.monotonic() > end:
                raise SystemExit(f"holding {len(self.held)} tasks of {want}; run over: {self.over}")
            for cid in self.ids:
                if cid not in self.held:
                    self.poll(cid)
            if len(self.held) < want:
                time.sleep(0.02)

    def save_model(self, i: int) -> int:
        r = self.http.get("/v1/model", headers=self.auth(self.ids[0]))
        r.raise_for_status()
        msg = wire.decode_frame(r.content, 1 << 30)
        save_file(msg.tensors, str(self.out / f"model-{i}.safetensors"))
        return int(msg.header["version"])

    def frame(self, task: dict, value: float, n: int, bad: str = "") -> bytes:
        tensors = {k: torch.full_like(t, value) for k, t in self.template.items()}
        if bad == "shape":
            name = sorted(tensors)[0]
            tensors[name] = torch.full((3, 3), value, dtype=tensors[name].dtype)
        header = {  # the fields ClientWorker.run writes
            "client_id": task["client_id"],
            "round": task["round"],
            "version": task["version"],
            "num_examples": 10**9 if bad == "examples" else n,
            "codec": task["codec"],
            "metrics": {"train_loss": 0.5},
        }
        return wire.encode_frame(Kind.UPDATE, header, wire.encode_tensors(tensors))

    def post(self, cid: int, body: bytes) -> httpx.Response:
        headers = {**self.auth(cid), "Content-Type": "application/octet-stream"}
        return self.http.post("/v1/update", params={"client_id": cid}, content=body,
                              headers=headers)

    def act(self, i: int, action: dict) -> None:
        self.fill(self.plan["concurrency"])
        entry = {"i": i, "action": action, "model_version": self.save_model(i),
                 "held": sorted([h["client_id"], h["round"], h["version"]]
                                for h in self.held.values())}
        if action.get("bad") == "dup":
            assert self.last_frame is not None, "dup needs an earlier post"
            cid, body = self.last_frame
            r = self.post(cid, body)
            _, header = peek_header(body, 1 << 30)
            entry.update(client_id=cid, round=header["round"], version=header["version"])
        else:
            order = sorted(self.held.values(), key=lambda h: h["round"])
            task = order[-1] if action["pick"] == "new" else order[0]
            cid = task["client_id"]
            body = self.frame(task, action.get("value", 0.0), action.get("n", 1),
                              action.get("bad", ""))
            r = self.post(cid, body)
            del self.held[cid]  # answered or refused: either way this task is closed
            self.last_frame = (cid, body)
            entry.update(client_id=cid, round=task["round"], version=task["version"])
        entry.update(status=r.status_code, response=r.json())
        self.log.append(entry)

    def run(self) -> None:
        try:
            for i, action in enumerate(self.plan["actions"]):
                self.act(i, action)
            end = time.monotonic() + LIMIT
            while set(self.ids) - self.over and time.monotonic() < end:
                for cid in set(self.ids) - self.over:
                    self.held.pop(cid, None)
                    self.poll(cid)
                time.sleep(0.05)
        finally:
            (self.out / "log.json").write_text(json.dumps(self.log, indent=1))
            self.http.close()


if __name__ == "__main__":
    Driver(json.loads(Path(sys.argv[1]).read_text())).run()
