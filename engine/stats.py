"""An engine's load snapshot (torch-free: workers ship it to the router in WorkerStats)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for load balancing and metrics (counts of requests and KV blocks)."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_usable_blocks: int
    kv_usage: float
    prefix_queries: int
    prefix_hits: int
    num_preemptions: int
    # The pool's shape (what GetServerInfo reports beside the block counts).
    kv_block_bytes: int = 0
    block_size: int = 0
    # The prefix cache's spill tier (engine.kv_spill); zeros when it is off.
    spill_blocks: int = 0  # in the tier now
    spill_capacity_bytes: int = 0
    spill_hits: int = 0  # blocks found in the tier by prefix lookups
    spilled_bytes: int = 0  # pool -> tier, as stored (encoded)
    restored_bytes: int = 0  # tier -> pool, as stored
