"""Load on the HTTP update path: N concurrent light clients (no training) long-poll for their
task and post a pre-made 2NN-size update frame.

The server process is, by default, the real `--mode async` server (`runner.execute` with the
FedAsync rule over `HttpRuntime`, `--concurrency` tasks in flight, every admitted update merged
in float64, the newest model encoded and served to the tasks that replace the merged ones,
evaluation and checkpoints every ~1000 updates).
`--server transport` swaps the loop for one that republishes a fixed model: the HTTP layer alone.

Prints accepted updates/s, p50/p99 POST latency, the server's peak RSS, and checks that every
accepted update was merged exactly once. `--rate R` offers R updates/s in total (latency under a
given load); without it every client posts as fast as it can (saturation, where latency is just
clients / throughput by Little's law).

    PYTHONPATH=src python bench/bench_http_load.py --clients 10 100 1000 --updates 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
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


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def bench_tokens(clients: int) -> dict[int, str]:
    return {c: f"bench-token-{c:06d}-xxxxxxxx" for c in range(clients)}


def serve_transport(clients: int) -> None:
    """Server process: HttpRuntime + a loop that republishes each client's task at once, always
    with the same model (what the async loop does, minus the merge)."""
    from tinyfed import wire
    from tinyfed.client import TrainSettings
    from tinyfed.config import build_config
    from tinyfed.memtune import keep_freed_memory
    from tinyfed.protocol import ClientTask, Expectation
    from tinyfed.runtimes.dispatch import Dispatcher
    from tinyfed.runtimes.http.runtime import HttpOptions, HttpRuntime
    from tinyfed.worker import configure_torch

    weights = model_2nn()
    spec = wire.spec_of(weights)
    payload = wire.encode_tensors(weights)
    cfg = build_config({"dataset": "synthetic", "clients": clients, "round_timeout": 600})
    configure_torch(cfg)  # as `tinyfed serve` does: torch's threads, malloc's thresholds
    keep_freed_memory()
    rt = Dispatcher(HttpRuntime(cfg, HttpOptions(tokens=bench_tokens(clients), announce=False,
                                                 linger=0.5)), cfg.round_timeout)

    class Exp:  # just what HttpRuntime.start reads
        client_ids = list(range(clients))
        config = cfg
        initial = weights
        spec = wire.spec_of(weights)

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
    idle = [True]  # the loop holds no result it has taken but not yet counted

    def report() -> None:  # on stdin EOF: print what the server loop saw, then exit
        sys.stdin.read()
        settle = time.monotonic() + 30  # let the loop take what was admitted before the end
        while time.monotonic() < settle and not (rt.hub.results.empty() and idle[0]):
            time.sleep(0.05)
        stats["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(stats), flush=True)
        os._exit(0)

    threading.Thread(target=report, daemon=True).start()
    for res in rt.results(3600):  # one long call; submit() while iterating, as the async loop
        idle[0] = False
        if res.ok:
            key = (res.client_id, res.round)
            stats["double"] += key in seen
            seen.add(key)
            stats["merged"] += 1
        else:
            stats["failed"] += 1
        submit(res.client_id, res.round + 1)
        idle[0] = True


def serve_async(clients: int, concurrency: int, updates: int) -> None:
    """Server process: the real async server (FedAsync) over HttpRuntime, in a scratch folder."""
    import tempfile

    from tinyfed.config import build_config
    from tinyfed.runner import execute, open_run
    from tinyfed.runtimes.http.runtime import HttpOptions, HttpRuntime

    every = max(1, 1000 // clients)  # rounds of `clients` merges: evaluate ~every 1000 updates
    folder = tempfile.mkdtemp(prefix="tinyfed-bench-http-")
    cfg = build_config({
        "dataset": "synthetic", "model": "mlp", "clients": clients, "fraction": 1.0,
        "mode": "async", "async_rule": "fedasync", "concurrency": min(clients, concurrency),
        "rounds": 2 * updates // clients + 2, "eval_every": every, "checkpoint_every": every,
        "round_timeout": 600, "out": folder})
    run_dir, cfg = open_run(cfg, None, {})
    url_file = Path(folder) / "url"
    rt = HttpRuntime(cfg, HttpOptions(tokens=bench_tokens(clients), announce=False, linger=0.5,
                                      url_file=str(url_file)))
    tasks: list[int] = []  # task number of every merged update, from the records

    def on_record(record) -> None:
        if record.get("kind") == "update":
            tasks.append(record["task"])

    def report() -> None:  # once the URL is up, print it; on stdin EOF, the merge counts
        while not url_file.exists():
            time.sleep(0.02)
        print(url_file.read_text(), flush=True)
        sys.stdin.read()
        settle = time.monotonic() + 30
        while time.monotonic() < settle and not rt.hub.results.empty():
            time.sleep(0.05)  # admitted updates not yet taken by the loop
        time.sleep(0.5)  # and the last one taken, merged
        print(json.dumps({"merged": len(tasks), "double": len(tasks) - len(set(tasks)),
                          "peak_rss_mb": peak_rss_mb()}), flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        os._exit(0)

    threading.Thread(target=report, daemon=True).start()
    with open(os.devnull, "w") as quiet:
        execute(cfg, run_dir, live=False, stream=quiet, subscribers=[on_record], runtime=rt)
    time.sleep(3600)  # the run ended before the load did: wait for the report


async def load(url: str, clients: int, updates: int, limit: float, pace: float) -> dict:
    """`clients` light clients; each fetches its task and posts a pre-made update, then waits
    until `pace` seconds have passed since its previous post began (0: no wait, saturation).

    The generator uses aiohttp (its C parser and O(1) connection pool keep it off the critical
    path on a 2-core machine, where it shares the CPU with the server)."""
    import aiohttp

    from tinyfed import wire
    from tinyfed.runtimes.http.hub import peek_header
    from tinyfed.wire import Kind

    made: list[tuple[bytes, int]] = []  # the update every client posts: the first task's model
    latencies: list[float] = []
    accepted = refused = 0
    errors: set[str] = set()
    budget = [updates]
    last = [0.0]  # when the last update was accepted: idle long-polls after it do not count
    end = time.monotonic() + limit
    connector = aiohttp.TCPConnector(limit=clients, limit_per_host=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as http:

        async def one(cid: int) -> None:
            auth = {"Authorization": f"Bearer bench-token-{cid:06d}-xxxxxxxx"}
            if pace:  # spread the first posts over one period, as devices would be
                await asyncio.sleep(pace * cid / clients)
            while budget[0] > 0 and time.monotonic() < end:
                budget[0] -= 1
                began = time.monotonic()
                try:
                    await cycle(cid, auth)
                except aiohttp.ClientError as exc:
                    errors.add(type(exc).__name__)
                    budget[0] += 1
                rest = pace - (time.monotonic() - began)
                if rest > 0:
                    await asyncio.sleep(rest)

        async def cycle(cid: int, auth: dict) -> None:
            nonlocal accepted, refused
            async with http.get("/v1/task", params={"client_id": cid, "wait": 10},
                                headers=auth) as r:
                if r.status != 200:
                    return
                task = await r.read()
            rnd = peek_header(task, len(task))[1]["round"]
            if not made:
                weights = wire.decode_frame(task).tensors
                payload = wire.encode_tensors(weights)
                made.append((payload, wire.payload_crc(payload)))
            payload, crc = made[0]
            frame = wire.encode_frame(Kind.UPDATE, {"client_id": cid, "round": rnd,
                                                    "num_examples": 1, "codec": "",
                                                    "metrics": {}}, payload, crc)
            t0 = time.perf_counter()
            async with http.post("/v1/update", params={"client_id": cid}, data=frame,
                                 headers={**auth, "Content-Type": "application/octet-stream"}
                                 ) as p:
                text = await p.text()
                latencies.append(time.perf_counter() - t0)
                if p.status == 200:
                    accepted += 1
                    last[0] = time.perf_counter()
                else:
                    refused += 1
                    errors.add(f"{p.status} {text[:120]}")

        t0 = time.perf_counter()
        await asyncio.gather(*(one(c) for c in range(clients)))
        seconds = max(last[0], t0 + 1e-9) - t0
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
    ap.add_argument("--rate", type=float, default=0,
                    help="offered updates/s in total (each client posts every clients/rate s); "
                         "0 = as fast as they can (saturation)")
    ap.add_argument("--server", choices=["async", "transport"], default="async",
                    help="async: the real --mode async server; transport: a fixed model, "
                         "no merge (the HTTP layer alone)")
    ap.add_argument("--concurrency", type=int, default=100,
                    help="async server: tasks in flight at once (the rest long-poll)")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        if args.server == "async":
            serve_async(args.serve, args.concurrency, max(args.updates, args.serve))
        else:
            serve_transport(args.serve)
        return
    for n in args.clients:
        serve_cmd = [sys.executable, __file__, "--serve", str(n), "--server", args.server,
                     "--concurrency", str(args.concurrency), "--updates", str(args.updates)]
        proc = subprocess.Popen(serve_cmd,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            url = proc.stdout.readline().strip()
            if not url.startswith("http"):
                raise SystemExit(f"the bench server for {n} clients did not start")
            pace = n / args.rate if args.rate else 0.0
            out = asyncio.run(load(url, n, max(args.updates, n), args.seconds, pace))
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
        offered = f"offered={args.rate:g}/s" if args.rate else "saturation"
        print(f"server={args.server} clients={n:5d} {offered} accepted={out['accepted']} "
              f"in {out['seconds']} s = "
              f"{out['updates_per_s']} updates/s  p50={out['p50_ms']} ms  p99={out['p99_ms']} ms"
              f"  server peak RSS={stats['peak_rss_mb']} MB  lost={lost} "
              f"double-merged={stats['double']} refused={out['refused']} {out['errors']}",
              flush=True)
    print("rerun: PYTHONPATH=src python bench/bench_http_load.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
