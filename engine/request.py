"""One request's state: tokens, progress through the KV cache, status and lifetime.

Status changes happen only in ``Request.transition`` so the lifecycle is checked and
timestamped in one place::

    WAITING -> RUNNING -> FINISHED_*         (the normal path)
    RUNNING -> PREEMPTED -> RUNNING          (blocks ran out: recompute later)
    RUNNING -> PREEMPTED -> MIGRATED         (decode workers: the router re-prefills it
                                              elsewhere instead of recomputing here)
    any unfinished -> FINISHED_ABORTED       (client gone, shutdown)
    any unfinished -> FINISHED_ERROR         (this request broke a step: failed alone)
"""

from __future__ import annotations

import enum
import time

import torch

from engine.logprobs import TokenLogprobs
from engine.request_times import RequestTimes
from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # the engine could not compute it; its batch mates went on
    MIGRATED = "migrated"  # left this engine to continue elsewhere; not a client finish

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR,
                        RequestStatus.MIGRATED)


_ALLOWED: dict[RequestStatus, set[RequestStatus]] = {
    RequestStatus.WAITING: {RequestStatus.RUNNING, RequestStatus.FINISHED_ABORTED,
                            RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_STOPPED,
                            RequestStatus.FINISHED_ERROR},
    RequestStatus.RUNNING: {RequestStatus.PREEMPTED, RequestStatus.FINISHED_STOPPED,
                            RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED,
                            RequestStatus.FINISHED_ERROR},
    RequestStatus.PREEMPTED: {RequestStatus.RUNNING, RequestStatus.FINISHED_ABORTED,
                              RequestStatus.FINISHED_ERROR, RequestStatus.MIGRATED},
}


class Request:
    """A generation request inside one engine.

    ``token_ids`` is the prompt followed by the generated tokens. ``num_computed_tokens``
    of them have their KV in the cache; the scheduler advances it. Blocks are owned by
    the KVCacheManager (keyed by request_id), not by the request.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: frozenset[int] = frozenset(),
        arrival: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hit on first scheduling (usage)
        self.block_hashes: list[int] = []  # chained hashes of this request's full blocks
        self.status = RequestStatus.WAITING
        self.times = RequestTimes() if arrival is None else RequestTimes(arrival=arrival)
        # When the scheduler last gave it tokens (arrival until then): "shortest_first"
        # serves a request that has gone max_wait_s without any first.
        self.last_scheduled = self.times.arrival
        # When the request first arrived anywhere (this engine's clock): a request
        # placed again after a preemption or a worker's death elsewhere keeps its age,
        # so it runs before, and is preempted after, requests younger than it.
        self.seniority = self.times.arrival
        self.num_preemptions = 0
        self.logprobs: list[TokenLogprobs] = []
        self.stop_token_ids = frozenset(params.stop_token_ids)
        self.eos_token_ids = frozenset() if params.ignore_eos else eos_token_ids
        # Prefill workers: keep the blocks after finishing until the KV transfer is done.
        self.hold_blocks = False
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)

    # -- derived -----------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def penalized_output_token_ids(self) -> list[int]:
        """What presence and frequency penalties count as output: this placement's
        tokens, and those an earlier placement generated (the prompt's last
        ``params.resumed_output_tokens``)."""
        start = max(0, self.num_prompt_tokens - self.params.resumed_output_tokens)
        return self.token_ids[start:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    # -- changes -----------------------------------------------------------------------
    def transition(self, new: RequestStatus) -> None:
        if new not in _ALLOWED.get(self.status, set()):
            raise RuntimeError(f"request {self.request_id}: {self.status.name} -> {new.name}")
        now = time.monotonic()
        if new is RequestStatus.RUNNING and self.times.first_scheduled is None:
            self.times.first_scheduled = now
        if new is RequestStatus.PREEMPTED:
            self.num_preemptions += 1
        if new.finished:
            self.times.finished = now
        self.status = new

    def append_token(self, token_id: int, logprobs: TokenLogprobs | None = None) -> None:
        now = time.monotonic()
        if self.times.first_token is None:
            self.times.first_token = now
        self.times.last_token = now
        self.token_ids.append(token_id)
        if logprobs is not None:
            self.logprobs.append(logprobs)

    def check_stop_token(self, max_model_len: int) -> RequestStatus | None:
        """Finish status implied by the last token and the lengths (stop strings aside)."""
        last = self.token_ids[-1]
        if last in self.stop_token_ids or last in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= self.params.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
