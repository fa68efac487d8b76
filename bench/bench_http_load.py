"""Load on the HTTP update path: N concurrent light clients (no training) fetch their task and
post a pre-made 2NN-size update frame, against a server process that keeps every client's next
task published as soon as its update is admitted (what the async loop does, minus the merge).

Prints accepted updates/s, p50/p99 POST latency, the server's peak RSS, and checks that every
accepted update reached the server loop exactly once.

    PYTHONPATH=src python bench/bench_http_load.py --clients 10 100 1000 --updates 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
sys.path.insert(0, SRC)


def model_2nn():
    import torch

    g = torch.Generator().manual_seed(0)
    shapes = {"0.weight": (200, 784), "0.bias": (200,), "2.weight": (200, 200), "2.bias": (200,),
              "4.weight": (10, 200), "4.bias": (10,)}
    return {k: torch.randn(*s, generator=g) * 0.01 for k, s in shapes.items()}


def serve(clients: int) -> None:
    """Server process: HttpRuntime + a loop that republishes each client's task at once."""
    from tinyfed import wire
    from tinyfed.client import TrainSettings
    from tinyfed.config import build_config
    from tinyfed.protocol import ClientTask, Expectation
    from tinyfed.runtimes.http import HttpOptions, HttpRuntime

    weights = model_2nn()
    spec = wire.spec_of(weights)
    payload = wire.encode_tensors(weights)
    cfg = build_config({"dataset": "synthetic", "clients": clients, "round_timeout": 600})
    tokens = {c: f"bench-token-{c:06d}-xxxxxxxx" for c in range(clients)}
    rt = HttpRuntime(cfg, HttpOptions(tokens=tokens, announce=False, linger=0.5))

    class Exp:  # just what HttpRuntime.start reads
        client_ids = list(range(clients))
        config = cfg
        initial = weights

    rt.start(Exp())  # type: ignore[arg-type]
    seen: set[tuple[int, int]] = set()
    stats = {"merged": 0, "double": 0, "failed": 0}
    settings = TrainSettings()

    def submit(cid: int, rnd: int) -> None:
        task = ClientTask(cid, rnd, 0, settings)
        rt.submit(task, payload, Expectation(task, weights, spec, 600))

    for c in range(clients):
        submit(c, 1)
    print(rt.url, flush=True)
    def report() -> None:  # on stdin EOF: print what the server loop saw, then exit
        sys.stdin.read()
        rss = 0
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) * 1024
        stats["peak_rss_mb"] = round(rss / 2**20, 1)
        stats["counters"] = dict(rt.hub.counters)
        print(json.dumps(stats), flush=True)
        os._exit(0)

    threading.Thread(target=report, daemon=True).start()
    for res in rt.results(3600):  # one long call; submit() while iterating, as the async loop
        if res.ok:
            key = (res.client_id, res.round)
            stats["double"] += key in seen
            seen.add(key)
            stats["merged"] += 1
        else:
            stats["failed"] += 1
        submit(res.client_id, res.round + 1)


async def load(url: str, clients: int, updates: int, limit: float) -> dict:
    import httpx

    from tinyfed import wire
    from tinyfed.runtimes.http.hub import peek_header
    from tinyfed.wire import Kind

    payload = wire.encode_tensors(model_2nn())
    latencies: list[float] = []
    accepted = refused = 0
    errors: set[str] = set()
    budget = [updates]
    end = time.monotonic() + limit
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:

        async def one(cid: int) -> None:
            nonlocal accepted, refused
            auth = {"Authorization": f"Bearer bench-token-{cid:06d}-xxxxxxxx"}
            while budget[0] > 0 and time.monotonic() < end:
                budget[0] -= 1
                try:
                    await cycle(cid, auth)
                except httpx.TransportError as exc:  # e.g. an idle keep-alive closed
                    errors.add(f"{type(exc).__name__}")
                    budget[0] += 1

        async def cycle(cid: int, auth: dict) -> None:
                nonlocal accepted, refused
                r = await http.get("/v1/task", params={"client_id": cid, "wait": 10},
                                   headers=auth)
                if r.status_code != 200:
                    return
                rnd = peek_header(r.content, len(r.content))[1]["round"]
                frame = wire.encode_frame(Kind.UPDATE, {"client_id": cid, "round": rnd,
                                                        "num_examples": 600, "codec": "",
                                                        "metrics": {}}, payload)
                t0 = time.perf_counter()
                p = await http.post("/v1/update", params={"client_id": cid}, content=frame,
                                    headers={**auth, "Content-Type": "application/octet-stream"})
                latencies.append(time.perf_counter() - t0)
                if p.status_code == 200:
                    accepted += 1
                else:
                    refused += 1
                    errors.add(f"{p.status_code} {p.text[:120]}")

        t0 = time.perf_counter()
        await asyncio.gather(*(one(c) for c in range(clients)))
        seconds = time.perf_counter() - t0
    latencies.sort()

    def pct(q):
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return {"accepted": accepted, "refused": refused, "seconds": round(seconds, 2),
            "updates_per_s": round(accepted / seconds, 1), "p50_ms": round(pct(0.5), 1),
            "p99_ms": round(pct(0.99), 1), "errors": sorted(errors)[:3]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--updates", type=int, default=2000, help="updates per level (bound)")
    ap.add_argument("--seconds", type=float, default=60, help="time bound per level")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return
    for n in args.clients:
        proc = subprocess.Popen([sys.executable, __file__, "--serve", str(n)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            url = proc.stdout.readline().strip()
            out = asyncio.run(load(url, n, max(args.updates, n), args.seconds))
            proc.stdin.close()
            stats = json.loads(proc.stdout.readline())
        finally:
            if proc.poll() is None:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        lost = out["accepted"] - stats["merged"]
        print(f"clients={n:5d} accepted={out['accepted']} in {out['seconds']} s = "
              f"{out['updates_per_s']} updates/s  p50={out['p50_ms']} ms  p99={out['p99_ms']} ms"
              f"  server peak RSS={stats['peak_rss_mb']} MB  lost={lost} "
              f"double-merged={stats['double']} refused={out['refused']} {out['errors']}",
              flush=True)
    print("rerun: PYTHONPATH=src python bench/bench_http_load.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
