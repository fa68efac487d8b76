"""Codec throughput: encode and decode MB/s (of fp32 model bytes) on the 2NN and the CNN.

Encode includes safetensors serialization and decode includes parsing it, as in a round, so
the figures say whether compression could ever dominate a round.

Rerun:  PYTHONPATH=src python bench/bench_codecs.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from safetensors.torch import load as st_load

from tinyfed.compress import parse_pipeline
from tinyfed.models import build_model, state_of
from tinyfed.wire import encode_tensors

SPECS = ["", "delta", "fp16", "int8", "int8:channel", "int8+zstd", "qsgd:8", "delta+topk:0.01",
         "delta+topk:0.01+int8", "delta+topk:0.01+int8+zstd", "delta+stc:0.01",
         "delta+stc:0.01+zstd", "delta+qsgd:2", "delta+qsgd:3+zstd", "delta+qsgd:4",
         "delta+qsgd:4+zstd", "delta+qsgd:8+zstd", "delta+topk:0.01+qsgd:5+zstd"]


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'model':5} {'codec':28} {'bytes':>10} {'ratio':>6} {'enc MB/s':>9} {'dec MB/s':>9}")
    for name, shape in (("2NN", "mlp"), ("CNN", "cnn")):
        ref = state_of(build_model(shape, (1, 28, 28), 10, 0))
        gen = torch.Generator().manual_seed(0)
        local = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in ref.items()}
        mb = sum(v.numel() * 4 for v in ref.values()) / 1e6
        for spec in SPECS:
            p = parse_pipeline(spec)
            payload = encode_tensors(p.encode(local, ref, {}))
            enc = best_of(lambda p=p, x=local, r=ref: encode_tensors(p.encode(x, r, {})),
                          args.repeats)
            dec = best_of(lambda p=p, b=payload, r=ref: p.decode(st_load(b), r), args.repeats)
            print(f"{name:5} {spec or 'none (fp32)':28} {len(payload):>10,} "
                  f"{mb * 1e6 / len(payload):>6.1f} {mb / enc:>9.0f} {mb / dec:>9.0f}")
    print(f"rerun: PYTHONPATH=src python bench/bench_codecs.py --repeats {args.repeats} "
          f"--threads {args.threads}")


if __name__ == "__main__":
    main()
