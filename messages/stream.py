"""A decode or colocated worker's token stream: one StepBatch per engine step."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.logprobs import TokenLogprobs
from messages.stats import WorkerStats


@dataclass
class TokenEvent:
    """New tokens of one request from one engine step (or its end).

    finish_reason: None while running; "stop" / "length" / "abort" when done, or
    "error" (``error`` says why; its batch mates went on);
    "migrated" when the worker preempted it and the router must continue it elsewhere.
    """

    request_id: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    error: str | None = None  # with finish_reason "error": why the engine failed it


@dataclass
class StepBatch:
    """Everything one engine step produced on one worker: one stream item per step
    (``events`` is empty for a heartbeat, which still carries fresh ``stats``)."""

    worker_id: str
    events: list[TokenEvent]
    stats: WorkerStats
