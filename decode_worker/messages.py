"""What a decode worker exchanges with the router (typed; no dicts of strings)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.llm_engine import EngineStats
from engine.request import TokenLogprobs


@dataclass(frozen=True)
class WorkerStats:
    worker_id: str
    role: str
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_usable_blocks: int
    kv_usage: float
    prefix_queries: int
    prefix_hits: int
    num_preemptions: int
    steps: int
    busy_seconds: float = 0.0  # engine step time so far (the rest is idle or overhead)


def worker_stats(worker_id: str, role: str, s: EngineStats, steps: int,
                 busy_seconds: float) -> WorkerStats:
    return WorkerStats(worker_id, role, s.num_running, s.num_waiting, s.num_free_blocks,
                       s.num_usable_blocks, s.kv_usage, s.prefix_queries, s.prefix_hits,
                       s.num_preemptions, steps, busy_seconds)


@dataclass
class TokenEvent:
    """New tokens of one request from one engine step (or its end).

    finish_reason: None while running; "stop" / "length" / "abort" when done;
    "migrated" when the worker preempted it and the router must continue it elsewhere.
    """

    request_id: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int = 0


@dataclass
class StepBatch:
    """Everything one engine step produced on one worker: one stream item per step."""

    worker_id: str
    events: list[TokenEvent]
    stats: WorkerStats
