"""How big a CPU worker's KV pool is when nobody said (no num_blocks, no memory_bytes).

The pool is a budget of host memory, not a constant: this engine's share of the memory
available on the host when it starts, less its weights, times CPU_KV_FRACTION::

    pool = CPU_KV_FRACTION x (available x host_share - 2 x weights)

``available`` is MemAvailable, bounded by the cgroup's limit when the process runs in
one (a container sees the host's /proc/meminfo). ``host_share`` is the fraction of the
host this engine may plan on: the router gives each of the N workers on a node 1/N
(they start together and all read the same MemAvailable). The weights count twice: the
loaded state dict and the model's packed copy are both alive while the model is built.
The rest (CPU_KV_FRACTION's complement) is left for activations, the allocator's
slack, Ray, the router and whatever else runs on the machine.

The budget is bounded below by one sequence of up to 4096 tokens (a pool that cannot
hold one request serves nothing) and above by four full-length sequences per seat, as
on GPUs:
beyond that the extra blocks would only hold prefix cache, each one a Python object.

Importable without torch, like engine.config.
"""

from __future__ import annotations

import os
from typing import NamedTuple

# Share of (this engine's part of the host's available memory, less its weights) the KV
# pool takes. 0.3: `make run` (1 prefill + 1 decode worker of the 135M model, the router
# and Ray) on an 8 GB laptop with ~5.5 GB available gives each worker a ~0.47 GiB pool
# (~10k tokens); a worker is ~1.6 GB besides its pool (measured), so the deployment takes
# ~4.8 GB of the 5.5 (docs/operations.md, Memory sizing).
CPU_KV_FRACTION = 0.3
_CGROUP_V2 = "/sys/fs/cgroup"
_CGROUP_V1 = "/sys/fs/cgroup/memory"


class PoolSize(NamedTuple):
    """A pool's size and why: what the startup log line and GetServerInfo report."""

    num_blocks: int  # including the null block
    bytes_per_block: int
    block_size: int  # tokens per block
    source: str  # "num_blocks" | "memory_bytes" | "host budget" | "gpu budget"

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def tokens(self) -> int:
        return self.usable_blocks * self.block_size

    @property
    def bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def describe(self) -> str:
        return (f"{self.usable_blocks} blocks x {self.block_size} tokens = {self.tokens} "
                f"tokens, {self.bytes / 2**30:.2f} GiB ({self.bytes_per_block} bytes a "
                f"block; sized by {self.source})")


def cpu_pool_bytes(available: int, share: float, weights: int,
                   fraction: float = CPU_KV_FRACTION) -> int:
    """Bytes for the KV pool of one engine on a host with ``available`` bytes free (see
    the module docstring); may be <= 0 when the weights alone take the share."""
    return int(fraction * (available * share - 2 * weights))


def host_available_bytes() -> int:
    """Memory this process can still get: MemAvailable, or less when a cgroup limits it."""
    avail = _meminfo_available()
    limit = _cgroup_room()
    return min(avail, limit) if limit is not None else avail


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # No /proc (not Linux): half the physical memory is a guess that will not swap.
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def _cgroup_room() -> int | None:
    """The cgroup's limit less its usage, or None when there is no limit."""
    for limit_file, usage_file in ((f"{_CGROUP_V2}/memory.max", f"{_CGROUP_V2}/memory.current"),
                                   (f"{_CGROUP_V1}/memory.limit_in_bytes",
                                    f"{_CGROUP_V1}/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                raw = f.read().strip()
            with open(usage_file) as f:
                used = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if raw == "max" or not raw.isdigit() or int(raw) >= 1 << 60:  # v1 says "no limit" so
            return None
        return max(0, int(raw) - used)
    return None
