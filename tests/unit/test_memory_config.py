"""runtime/memory_config.py: a fixed mmap threshold, bounded oneDNN caches (issue 11).

Each case runs in a fresh interpreter: the allocator's state is per process, and a
threshold once fixed cannot be unfixed.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Free a 4 MiB block (under glibc's defaults this raises the mmap threshold to 4 MiB),
# then allocate 2 MiB: does it come from mmap (mallinfo2's hblks counts mmapped blocks)?
CHILD = """
import ctypes, json, sys
from runtime.memory_config import configure_malloc
from runtime.memory_diag import _libc
configured = configure_malloc() if sys.argv[1] == "configure" else None
libc = _libc()
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(4 << 20))
before = libc.mallinfo2().hblks
p = libc.malloc(2 << 20)
mmapped = libc.mallinfo2().hblks - before
libc.free(p)
print(json.dumps({"configured": configured, "mmapped": mmapped}))
"""

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc only")


def run_child(configure: bool = True, **env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", CHILD, "configure" if configure else "no"],
                         env={**clean, **env,
                         "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fixed_threshold_keeps_mid_sized_buffers_off_the_heap() -> None:
    assert run_child() == {"configured": True, "mmapped": 1}


def test_glibc_default_puts_them_on_the_heap_once_a_larger_one_was_freed() -> None:
    # The behaviour configure_malloc exists for; if glibc stops doing this the fix is moot.
    assert run_child(configure=False) == {"configured": None, "mmapped": 0}


def test_operator_settings_win() -> None:
    assert run_child(MALLOC_MMAP_THRESHOLD_=str(8 << 20))["configured"] is False


# engine.linear's prepacked oneDNN path with a new M (tokens in a prefill step) each
# call, as prefill steps have: how much malloc in-use memory the second 75 new shapes
# add, once the first 75 would have filled a 64-entry cache.
ONEDNN_CHILD = """
import json, random, sys
from runtime.memory_config import configure_worker_memory
if sys.argv[1] == "configure":
    configure_worker_memory()
import torch
from engine.linear import Linear
from runtime.memory_diag import _libc, malloc_stats
torch.set_num_threads(1)
lin = Linear(576, 1536, bias=False)
if not lin.prepack():
    print(json.dumps(None)); sys.exit()
libc = _libc()
ms = random.Random(0).sample(range(1, 1500), 150)
with torch.inference_mode():
    for i, m in enumerate(ms):
        if i == 75:
            half = malloc_stats(libc)["malloc_in_use_mb"]
        lin(torch.randn(m, 576))
print(json.dumps(malloc_stats(libc)["malloc_in_use_mb"] - half))
"""


def onednn_growth_mb(configure: bool) -> float | None:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", ONEDNN_CHILD,
                          "configure" if configure else "no"],
                         env={**clean, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_onednn_caches_stop_growing_with_new_prefill_shapes() -> None:
    capped = onednn_growth_mb(configure=True)
    if capped is None:
        pytest.skip("this torch has no prepacked oneDNN linear")
    uncapped = onednn_growth_mb(configure=False)
    assert uncapped is not None
    # Uncapped, each new shape keeps ~0.65 MB (oneDNN's and ideep's caches, 1024
    # entries each); capped, the caches are full and evict: nothing grows.
    assert uncapped > 20, uncapped
    assert capped < 5, capped
