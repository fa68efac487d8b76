"""Honest clients under attack: a real `tinyfed serve` (2NN, synchronous FedAvg, 20,000 synthetic
examples over 4 clients) with real `tinyfed client` processes, while H hostile connections (0, 8,
64) hold the server: a third open and send nothing, a third trickle request headers, a third
announce an upload of the model's size and send ten bytes, on the token of an enrolled device
(id 4, holding no task) that misbehaves. Each hostile connection reconnects as soon as the
server drops it, until the run ends.

Prints, per H: the honest rounds' median seconds and updates/s, the server's RSS before the
attack (after round 1), its peak during the attack and after it (once the attackers stopped and
two more rounds ran), and what the server counted (408, 429). Runs alternate between H values,
`--repeats` times each; min/median/max are reported.

    PYTHONPATH=src python bench/bench_http_hostile.py --hostile 0 8 64 --rounds 12 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
sys.path.insert(0, SRC)


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def rounds(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def attacker(kind: int, port: int, token: str, stop: threading.Event) -> None:
    """One hostile connection, reopened whenever the server closes it (bounded by `stop`)."""
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                if kind == 1:
                    s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
                elif kind == 2:
                    s.sendall(f"POST /v1/update?client_id=4 HTTP/1.1\r\nHost: x\r\n"
                              f"Authorization: Bearer {token}\r\nContent-Length: 800000\r\n"
                              f"Content-Type: application/octet-stream\r\n\r\n0123456789"
                              .encode())
                while not stop.is_set() and s.recv(4096):
                    pass
        except OSError:
            time.sleep(0.05)


def one_run(hostile: int, rounds_wanted: int, workdir: Path) -> dict:
    from tinyfed.runtimes.http.auth import new_tokens, write_tokens

    tokens = new_tokens(range(5))  # id 4: the misbehaving device
    tokens_file = workdir / "tokens.txt"
    write_tokens(tokens_file, tokens)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = workdir / f"run-{hostile}"
    env = {**os.environ, "PYTHONPATH": SRC}
    common = [sys.executable, "-m", "tinyfed"]
    server = subprocess.Popen(
        [*common, "serve", "--dataset", "synthetic", "--set", "synthetic_size=20000",
         "--model", "mlp", "--clients", "4", "--rounds", str(rounds_wanted), "--port",
         str(port), "--tokens", str(tokens_file), "--out", str(out), "--plain",
         "--wait-clients", "4"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clients = [subprocess.Popen(
        [*common, "client", "--server", f"http://127.0.0.1:{port}", "--tokens",
         str(tokens_file), "--client-ids", ids, "--quiet"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for ids in ("0,1", "2,3")]
    stop = threading.Event()
    threads = []
    try:
        end = time.monotonic() + 300
        while len(rounds(out)) < 1 and server.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        before = rss_mb(server.pid)
        attack_from = len(rounds(out))
        for i in range(hostile):
            t = threading.Thread(target=attacker, args=(i % 3, port, tokens[4], stop),
                                 daemon=True)
            t.start()
            threads.append(t)
        peak = after = before
        stop_at = rounds_wanted - 2  # the last two rounds run with the attackers gone
        while server.poll() is None and time.monotonic() < end:
            rss, done = rss_mb(server.pid), len(rounds(out))
            if stop.is_set():
                if done < rounds_wanted:  # not the end-of-run work (final model, plot)
                    after = rss or after
            else:
                peak = max(peak, rss)
            if done >= stop_at and not stop.is_set():
                stop.set()
            time.sleep(0.1)
        recs = [r for r in rounds(out) if r.get("kind", "round") == "round"]
        attacked = [r for r in recs if attack_from < r["round"] <= stop_at]
        seconds = [r["wall_seconds"] for r in attacked]
        updates = sum(r["clients_succeeded"] for r in attacked)
        return {"hostile": hostile, "round_s": statistics.median(seconds) if seconds else None,
                "updates_per_s": updates / sum(seconds) if seconds else None,
                "rss_before": round(before), "rss_peak": round(peak), "rss_after": round(after),
                "failed": sum(r["clients_failed"] for r in recs),
                "rounds": len(recs), "exit": server.returncode}
    finally:
        stop.set()
        for p in (server, *clients):
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hostile", type=int, nargs="+", default=[0, 8, 64])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    results: dict[int, list[dict]] = {h: [] for h in args.hostile}
    with tempfile.TemporaryDirectory(prefix="tinyfed-hostile-") as tmp:
        for rep in range(args.repeats):
            for h in args.hostile:  # alternate levels within each repeat
                work = Path(tmp) / f"{rep}-{h}"
                work.mkdir()
                res = one_run(h, args.rounds, work)
                results[h].append(res)
                print(json.dumps(res), flush=True)
    print(f"\nload average: {os.getloadavg()}")
    print("| hostile | round s (min/med/max) | updates/s (med) | RSS MB before / peak / after |"
          " failed tasks |")
    print("|---|---|---|---|---|")
    for h, runs in results.items():
        rs = sorted(r["round_s"] for r in runs if r["round_s"] is not None)
        ups = statistics.median(r["updates_per_s"] for r in runs if r["updates_per_s"])
        print(f"| {h} | {rs[0]:.3f} / {statistics.median(rs):.3f} / {rs[-1]:.3f} | {ups:.1f} | "
              f"{statistics.median(r['rss_before'] for r in runs):.0f} / "
              f"{statistics.median(r['rss_peak'] for r in runs):.0f} / "
              f"{statistics.median(r['rss_after'] for r in runs):.0f} | "
              f"{sum(r['failed'] for r in runs)} |")
    print("\nrerun: PYTHONPATH=src python bench/bench_http_hostile.py --hostile "
          f"{' '.join(map(str, args.hostile))} --rounds {args.rounds} --repeats {args.repeats}")


if __name__ == "__main__":
    main()
