"""Process-wide memory settings for a worker, applied before its model loads (issue 11).

A prefill worker's anonymous RSS crept up in soaks for two reasons, each fixed here
(figures and commands in docs/benchmarks.md section 6; runtime/memory_diag.py is how they
were found, from inside the worker):

1. **oneDNN's caches, keyed by shape.** engine/linear.py runs fp32 linears through
   oneDNN's prepacked path. oneDNN keeps every primitive it built in a cache
   (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) and torch's ideep layer keeps its own
   (``LRU_CACHE_CAPACITY``), both 1024 entries by default and keyed by the input's
   shape. A prefill step's M (tokens in the step) is new almost every step, so both
   caches fill with primitives used once: ~0.65 MB per new M per weight shape, ~2.4 MB
   per new step size for SmolLM2 -- a steady ~3 MB/min of malloc in-use bytes in one
   thread's arena in the 0.25 req/s soak, until ~1024 entries (hundreds of MB). Decode
   steps reuse a handful of M values (the batch size moves by one at a time), so a
   small cache keeps them all: ``ONEDNN_CACHE_ENTRIES`` each.
2. **glibc's dynamic mmap threshold.** glibc raises its mmap threshold to the size of
   the largest block freed (up to 32 MiB). A prefill worker frees large buffers all the
   time (activations of long prompts, the staging buffer a KV send gathers into); after
   the first, mid-sized buffers come from the heap and fragment it: malloc's held bytes
   grow while its in-use bytes do not (bench/memory_probe.py isolates this). A fixed
   1 MiB threshold (``mallopt``, what ``MALLOC_MMAP_THRESHOLD_`` does at start-up; fixing
   it also turns the dynamic one off) keeps them in mmaps, returned on free.

Settings an operator made (the environment variables above) win. Both are process-wide
and read once (oneDNN's at its first use): apply them before the engine is built.
"""

from __future__ import annotations

import ctypes
import os

MMAP_THRESHOLD = 1 << 20  # bytes: KV blocks of a few tokens and up go to mmap
TRIM_THRESHOLD = 1 << 20  # bytes: heap top freed beyond this goes back to the OS
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
# Entries in each oneDNN cache: decode's few batch sizes x ~5 weight shapes fit; a
# prefill step's new M misses whatever the size (it would with 1024 too), so a small
# cache costs prefill nothing. 0 would be "no cache", which crashed torch 2.13's ideep.
ONEDNN_CACHE_ENTRIES = 64
ONEDNN_ENV = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def configure_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds in this process; True if set. Memory
    already fragmented stays so: call it early. Idempotent; does nothing off glibc or
    when the operator set the thresholds."""
    if any(v in os.environ for v in MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def cap_onednn_caches() -> None:
    """Bound oneDNN's shape-keyed caches; takes effect only before oneDNN's first use
    in this process (it reads the variables once)."""
    for var in ONEDNN_ENV:
        os.environ.setdefault(var, str(ONEDNN_CACHE_ENTRIES))


def configure_worker_memory() -> None:
    """Both settings; a worker actor calls it first thing, before importing its role."""
    cap_onednn_caches()
    configure_malloc()
