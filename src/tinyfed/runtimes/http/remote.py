"""The device side: pull a task, train it with `ClientWorker`, push the update; repeat.

One thread per client id this process acts for (each with its own token), one shared worker
(training is serialised by a lock). Every request has a timeout; failed requests are retried
with exponential backoff and jitter, up to `retries` times; while the server is unreachable a
trained update is kept and pushed once it is back (the server answers 409 if it is stale).
A server restart is noticed by its boot id, and the client registers again.
"""

from __future__ import annotations

import random
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

from tinyfed.config import build_config
from tinyfed.errors import ConfigError, TinyfedError
from tinyfed.memtune import keep_freed_memory
from tinyfed.protocol import ClientWorker
from tinyfed.runtimes.http.hub import BOOT_HEADER, peek_header
from tinyfed.worker import build_worker


class Unreachable(TinyfedError):
    """The server did not answer after every retry."""


class RunOver(Exception):
    """The server said the run is finished (410)."""


@dataclass
class ClientOptions:
    server: str
    tokens: dict[int, str]
    data_dir: str | None = None
    timeout: float = 30.0  # seconds per request (a long-poll adds its wait on top)
    wait: float = 20.0  # long-poll length asked of the server
    retries: int = 5
    backoff: float = 0.5  # first retry delay; doubles each retry, capped at backoff_max
    backoff_max: float = 10.0
    max_offline: float = 300.0  # give up after this long without reaching the server
    delay: float = 0.0  # simulated slow device: seconds to wait before posting each update
    verify: bool | str = True  # TLS: True = system CAs, a path = that CA bundle, False = none
    expect: dict[str, object] = field(default_factory=dict)  # config values the client insists on
    quiet: bool = False


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, base·2^attempt)]."""
    return rng.uniform(0, min(cap, base * (2**attempt)))


class RemoteClient:
    def __init__(self, options: ClientOptions):
        self.opts = options
        self.stop = threading.Event()
        self.train_lock = threading.Lock()
        self.boot_id = ""
        self.rng = random.Random()
        verify = options.verify
        if isinstance(verify, str):
            verify = ssl.create_default_context(cafile=verify)
        self.http = httpx.Client(base_url=options.server.rstrip("/"), verify=verify,
                                 timeout=httpx.Timeout(options.timeout + options.wait))
        self.worker: ClientWorker | None = None
        self.errors: list[str] = []
        self.posted = 0

    def log(self, message: str) -> None:
        if not self.opts.quiet:
            print(f"tinyfed client: {message}", flush=True)

    # ---- requests -----------------------------------------------------------------------
    def auth(self, client_id: int) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.opts.tokens[client_id]}"}

    def request(self, method: str, path: str, client_id: int, **kw) -> httpx.Response:
        """One request with retries on transport errors and 5xx; raise Unreachable after."""
        headers = {**self.auth(client_id), **kw.pop("headers", {})}
        last = ""
        for attempt in range(self.opts.retries + 1):
            if self.stop.is_set():
                raise RunOver()
            try:
                resp = self.http.request(method, path, headers=headers, **kw)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code < 500:
                    self.notice_boot(resp, client_id)
                    return resp
                last = f"HTTP {resp.status_code}"
            if attempt < self.opts.retries:
                self.stop.wait(backoff_delay(attempt, self.opts.backoff, self.opts.backoff_max,
                                             self.rng))
        raise Unreachable(f"{method} {path}: {last}")

    def notice_boot(self, resp: httpx.Response, client_id: int) -> None:
        boot = resp.headers.get(BOOT_HEADER, "")
        if boot and boot != self.boot_id:
            if self.boot_id:
                self.log(f"server restarted ({self.boot_id} -> {boot}); registering again")
            self.boot_id = boot
            if self.worker is not None:  # before that, setup() registers once it is ready
                for cid in self.opts.tokens:
                    self.register(cid)

    def register(self, client_id: int) -> None:
        try:
            resp = self.http.post("/v1/register", params={"client_id": client_id},
                                  headers=self.auth(client_id))
        except httpx.TransportError:
            return
        self.check_auth(resp, client_id)

    def check_auth(self, resp: httpx.Response, client_id: int) -> None:
        if resp.status_code in (401, 403):
            raise ConfigError(f"server refused client {client_id}'s token "
                              f"(HTTP {resp.status_code}: {error_text(resp)})")

    # ---- setup --------------------------------------------------------------------------
    def setup(self) -> None:
        """Fetch the experiment config and rebuild this process's shards from it."""
        cid = next(iter(self.opts.tokens))
        since = time.monotonic()
        while True:  # a server that is not up yet is waited for, up to max_offline
            try:
                resp = self.request("GET", "/v1/config", cid)
                break
            except Unreachable as exc:
                if time.monotonic() - since > self.opts.max_offline:
                    raise
                self.log(f"server unreachable, retrying ({exc})")
                self.stop.wait(self.opts.backoff_max * self.rng.uniform(0.5, 1))
        self.check_auth(resp, cid)
        if resp.status_code != 200:
            raise ConfigError(f"server gave HTTP {resp.status_code} for the config")
        values = resp.json()
        for key, want in self.opts.expect.items():
            if values.get(key) != want:
                raise ConfigError(f"--{key.replace('_', '-')} {want!r} does not match the "
                                  f"server's experiment ({key} = {values.get(key)!r})")
        if self.opts.data_dir:
            values["data_dir"] = self.opts.data_dir
        config = build_config(values)
        bad = sorted(c for c in self.opts.tokens if c >= config.clients)
        if bad:
            raise ConfigError(f"client id(s) {bad} out of range; the run has clients "
                              f"0..{config.clients - 1}")
        keep_freed_memory()
        self.worker = build_worker(config)
        for client_id in self.opts.tokens:  # ready to train: a server holding round 1 for
            self.register(client_id)  # its clients starts the deadline clock only now

    # ---- the loop -----------------------------------------------------------------------
    def run(self) -> int:
        """Serve every client id until the run is over (0), or the server is gone (1)."""
        self.setup()
        threads = [threading.Thread(target=self.serve_one, args=(cid,), daemon=True,
                                    name=f"client-{cid}") for cid in self.opts.tokens]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(0.2)
        finally:
            self.stop.set()
            self.http.close()
        if self.errors:
            for err in self.errors:
                print(f"tinyfed client: error: {err}", file=sys.stderr)
            return 1
        return 0

    def serve_one(self, client_id: int) -> None:
        held: bytes | None = None  # a trained update not yet delivered
        offline_since: float | None = None
        try:
            while not self.stop.is_set():
                try:
                    if held is not None:
                        self.push(client_id, held)
                        held = None
                    frame = self.poll(client_id)
                    offline_since = None
                    if frame is None:
                        continue
                    held = self.train(client_id, frame)
                    if self.opts.delay:
                        self.stop.wait(self.opts.delay)
                except Unreachable as exc:
                    now = time.monotonic()
                    offline_since = offline_since or now
                    if now - offline_since > self.opts.max_offline:
                        raise Unreachable(f"server unreachable for {now - offline_since:.0f} s "
                                          f"({exc})") from None
                    self.log(f"client {client_id}: server unreachable, retrying ({exc})")
                    self.stop.wait(self.opts.backoff_max * self.rng.uniform(0.5, 1))
        except RunOver:
            self.stop.set()
        except TinyfedError as exc:
            self.errors.append(str(exc))
            self.stop.set()

    def poll(self, client_id: int) -> bytes | None:
        resp = self.request("GET", "/v1/task", client_id,
                            params={"client_id": client_id, "wait": self.opts.wait})
        self.check_auth(resp, client_id)
        if resp.status_code == 410:
            raise RunOver()
        if resp.status_code == 200:
            return resp.content
        if resp.status_code != 204:
            self.log(f"client {client_id}: unexpected HTTP {resp.status_code} for a task")
            self.stop.wait(1.0)
        return None

    def train(self, client_id: int, frame: bytes) -> bytes:
        assert self.worker is not None
        with self.train_lock:
            update = self.worker.handle(frame)
        try:
            rnd = peek_header(frame, len(frame))[1]["round"]
            self.log(f"client {client_id}: trained round {rnd}")
        except (TinyfedError, KeyError):
            pass
        return update

    def push(self, client_id: int, frame: bytes) -> None:
        resp = self.request("POST", "/v1/update", client_id, params={"client_id": client_id},
                            content=frame, headers={"Content-Type": "application/octet-stream"})
        self.check_auth(resp, client_id)
        if resp.status_code == 200:
            self.posted += 1
            self.log(f"client {client_id}: update accepted")
        else:  # 409 stale/duplicate, 413/422 rejected: the update is dropped either way
            self.log(f"client {client_id}: update refused (HTTP {resp.status_code}: "
                     f"{error_text(resp)})")


def error_text(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("error", ""))[:200]
    except ValueError:
        return resp.text[:200]
