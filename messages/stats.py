"""A worker's load as the router sees it: engine counters, KV pool, step time."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from engine.stats import EngineStats


@dataclass(frozen=True)
class PoolState:
    """One worker's KV blocks, each counted once by owner (engine.block_ledger defines
    the owners); the five counts sum to ``usable``, the pool without its null block."""

    running: int  # in a scheduled request's block table
    reserved: int  # held for a KV import not started yet (decode)
    transfer: int  # held by a finished prefill until its KV has shipped
    cached: int  # free, but still a prefix-cache entry a prompt may revive
    free: int  # free, nothing to revive
    usable: int

    @classmethod
    def from_counts(cls, counts: Mapping[str, int]) -> PoolState:
        """From ``LLMEngine.pool_state()``'s dict ("blocks_<owner>" and "usable");
        KeyError names a missing count."""
        owners = {f.name: int(counts[f"blocks_{f.name}"]) for f in fields(cls)
                  if f.name != "usable"}
        return cls(**owners, usable=int(counts["usable"]))


@dataclass(frozen=True)
class WorkerStats:
    """A snapshot of one worker: who it is, its engine's counters, its pool.

    The engine's counters travel as one value (``engine``); the properties below are
    the ones the router reads, so ``stats.kv_usage`` means ``stats.engine.kv_usage``.
    """

    worker_id: str
    role: str
    engine: EngineStats
    steps: int  # engine steps so far
    busy_seconds: float = 0.0  # engine step time so far (the rest is idle or overhead)
    # Read on stats() calls and stream heartbeats, not with every step's batch (it
    # walks every block): None there.
    pool: PoolState | None = None

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting

    @property
    def num_free_blocks(self) -> int:
        return self.engine.num_free_blocks

    @property
    def num_usable_blocks(self) -> int:
        return self.engine.num_usable_blocks

    @property
    def kv_usage(self) -> float:
        return self.engine.kv_usage

    @property
    def prefix_queries(self) -> int:
        return self.engine.prefix_queries

    @property
    def prefix_hits(self) -> int:
        return self.engine.prefix_hits

    @property
    def num_preemptions(self) -> int:
        return self.engine.num_preemptions
