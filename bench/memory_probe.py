"""Is a prefill worker's RSS growth a leak or the allocator? A probe, not a benchmark.

Runs a prefill worker's memory pattern in one process, without Ray: prompts of random
length prefilled with their blocks held, the blocks gathered into a staging buffer (what
the ``ray`` KV sender does before ray.put), then released. Every few seconds it records
the process's RSS, glibc's malloc statistics (``mallinfo2``: bytes in use by live
allocations vs bytes the allocator holds from the OS) and Python's live object count.

Reading the result: if the allocator's in-use bytes stay flat while RSS climbs, the
growth is memory the allocator keeps after frees (fragmentation, a raised mmap
threshold), not a leak; if in-use bytes climb with RSS, something is kept alive.

    python -m bench.memory_probe --seconds 300 [--out bench/results/memory-probe.json]

With ``--any-length`` prompts take every length from 1 to 1500, so nearly every prefill
step has a new shape: that is what showed oneDNN's shape-keyed caches growing (malloc
in-use bytes up ~2.4 MB per new length; flat under "worker defaults").

Each configuration runs in its own process, with the malloc environment it names.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CONFIGS: dict[str, dict[str, str]] = {
    "glibc default": {},
    # A fixed mmap threshold: glibc otherwise raises it to the size of the largest
    # buffer freed (up to 32 MiB), after which staging buffers below that come from the
    # heap and fragment it.
    "fixed mmap threshold (1 MiB)": {"MALLOC_MMAP_THRESHOLD_": str(1 << 20),
                                     "MALLOC_TRIM_THRESHOLD_": str(1 << 20)},
    "MALLOC_ARENA_MAX=2": {"MALLOC_ARENA_MAX": "2"},
    # What worker actors now set themselves (runtime/memory_config.py): the threshold,
    # and oneDNN's shape-keyed caches bounded (see --any-length).
    "worker defaults": {"MALLOC_MMAP_THRESHOLD_": str(1 << 20),
                        "MALLOC_TRIM_THRESHOLD_": str(1 << 20),
                        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"},
}
LENGTHS = (16, 64, 200, 600, 1500)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def malloc_stats() -> dict[str, float]:
    """MiB in use by live allocations, and held from the OS (heap arenas + mmaps)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    m = libc.mallinfo2()
    return {"malloc_in_use_mb": (m.uordblks + m.hblkhd) / 2**20,
            "malloc_held_mb": (m.arena + m.hblkhd) / 2**20}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def probe(seconds: float, sample_s: float, seed: int,
          any_length: bool = False) -> list[dict[str, Any]]:
    """The loop, in this process."""
    import torch

    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams
    from kernels import gather_blocks

    engine = LLMEngine(EngineConfig(num_threads=1), detokenize=False)
    params = SamplingParams(temperature=0.0, max_tokens=1)
    rnd = random.Random(seed)
    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()
    next_sample, n = 0.0, 0
    while (now := time.monotonic() - t0) < seconds:
        if now >= next_sample:
            samples.append({"t_s": now, "prompts": n, "rss_mb": rss_mb(),
                            "python_objects": sys.getallocatedblocks(), **malloc_stats()})
            next_sample += sample_s
        rid = f"p{n}"
        n_ids = rnd.randint(1, LENGTHS[-1]) if any_length else rnd.choice(LENGTHS)
        ids = [rnd.randrange(100, 40000) for _ in range(n_ids)]
        engine.add_request(ids, params, rid, hold_blocks=True)
        while engine.has_unfinished():
            engine.step()
        blocks = torch.tensor(engine.held_blocks(rid), dtype=torch.long)
        staging = gather_blocks(engine.kv_cache, blocks).cpu()
        payload = staging.view(torch.uint8).numpy().tobytes()  # ray.put copies it out
        del staging, payload
        engine.release(rid)
        n += 1
    return samples


def slope_per_min(samples: list[dict[str, Any]], key: str, after_s: float) -> float | None:
    from bench.soak import slope_mb_per_min  # least squares, per minute (any unit)

    return slope_mb_per_min([(s["t_s"], s[key]) for s in samples if s["t_s"] >= after_s])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=300.0)
    p.add_argument("--sample", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS))
    p.add_argument("--any-length", action="store_true",
                   help="prompt lengths uniform in 1-1500 (every shape), not 5 lengths")
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(probe(args.seconds, args.sample, args.seed, args.any_length)))
        return 0
    result: dict[str, Any] = {"command": "python -m bench.memory_probe " + " ".join(sys.argv[1:]),
                              "runs": {}}
    for name in args.configs:
        env = dict(os.environ, **CONFIGS[name])
        out = subprocess.run([sys.executable, "-m", "bench.memory_probe", "--child",
                              "--seconds", str(args.seconds), "--sample", str(args.sample),
                              "--seed", str(args.seed),
                              *(["--any-length"] if args.any_length else [])],
                             env=env, capture_output=True, text=True, check=True)
        samples = json.loads(out.stdout.strip().splitlines()[-1])
        summary = {k: slope_per_min(samples, k, args.warmup)
                   for k in ("rss_mb", "malloc_in_use_mb", "malloc_held_mb", "python_objects")}
        result["runs"][name] = {"env": CONFIGS[name], "slope_per_min_after_warmup": summary,
                                "first": samples[0], "last": samples[-1], "samples": samples}
        print(f"{name}: prompts={samples[-1]['prompts']} slopes/min={summary} "
              f"rss {samples[0]['rss_mb']:.0f}->{samples[-1]['rss_mb']:.0f} MiB", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
