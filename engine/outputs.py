"""What the engine hands back: per-step deltas and the cumulative result of a request."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.logprobs import TokenLogprobs
from engine.request_times import RequestTimes


@dataclass
class RequestOutput:
    """State of one request after a step.

    ``new_token_ids`` / ``delta_text`` are what this step added (for streaming);
    ``token_ids`` / ``text`` are everything so far. ``finish_reason`` is None until the
    request ends, then "stop", "length", "abort", "error" (the engine could not compute
    this request: ``error`` says why; its batch mates were not affected) or "migrated"
    (decode workers: it continues on another worker).
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    delta_text: str
    finish_reason: str | None
    num_cached_tokens: int
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    times: RequestTimes | None = None  # a snapshot of the request's lifetime events
    num_preemptions: int = 0
    error: str | None = None  # set with finish_reason "error": what failed, for logs

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
