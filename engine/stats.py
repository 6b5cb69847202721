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
