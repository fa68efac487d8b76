"""Keep freed memory for reuse instead of handing it back to the OS at once.

Every task and update moves a model-sized buffer (0.8 MB for the 2NN), and glibc's defaults
return such buffers to the kernel when freed, so the next one is faulted in again page by page.
On these VMs that made a FedAsync merge of the 2NN cost 1.9 ms instead of 0.35 ms, and the
same for every encode and decode (bench/bench_http_load.py, docs/benchmarks.md). Raising the
trim and mmap thresholds keeps up to a few model copies mapped; peak RSS, which counts pages
touched, is not raised by it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

TRIM_THRESHOLD = 128 << 20  # free memory kept at the top of the heap before trimming
TOP_PAD = 64 << 20  # extra heap asked for per growth (address space; pages come on first use)
MMAP_THRESHOLD = 32 << 20  # buffers below this come from the heap, so they are reused

_done = False


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for model-sized buffers; True when applied (Linux with glibc only).

    Idempotent, and a no-op elsewhere or when the C library does not offer `mallopt`."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in (
        (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD),
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD)))
    _done = ok
    return ok
