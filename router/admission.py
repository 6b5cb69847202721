"""Admission: what the router accepts before it spends anything on a request.

The checks here, each failing fast with its own status:
- check_prompt_bytes: the prompt text is over max_prompt_bytes -> InvalidRequestError
  (INVALID_ARGUMENT). Router.encode / encode_chat call it before tokenizing, so a huge
  prompt costs nothing.
- check_open: the service is draining for shutdown -> ShuttingDownError (UNAVAILABLE).
- admit(): that, then the deployment at its in-flight bound -> OverloadedError
  (RESOURCE_EXHAUSTED, with a retry hint). The bound is what keeps a burst from
  queueing thousands of calls on a worker actor: beyond it callers are told to come
  back, which is cheap and honest, instead of waiting until their deadlines pass.

Router._admit runs, in order: the prompt's own checks (engine/validation.py:
vocabulary, context -> INVALID_ARGUMENT), a request id already in flight
(INVALID_ARGUMENT), check_open, the KV wait queue at max_queue (QueueFullError,
RESOURCE_EXHAUSTED), then admit().
"""

from __future__ import annotations

from engine.errors import InvalidRequestError
from router.config import RouterConfig
from router.errors import OverloadedError, ShuttingDownError

# The hint follows how long requests take lately: a client that comes back after about
# one request's duration finds room freed. Clamped so it stays a useful hint.
MIN_RETRY_S, MAX_RETRY_S = 0.05, 10.0
EWMA_WEIGHT = 0.05


class Admission:
    def __init__(self, config: RouterConfig) -> None:
        self.limit = config.admission_limit
        self.max_prompt_bytes = config.max_prompt_bytes
        self.inflight = 0
        self.refused = 0  # calls refused for load, since start (a metric)
        self.closing = False
        self._mean_duration_s = 1.0

    def check_prompt_bytes(self, nbytes: int) -> None:
        if nbytes > self.max_prompt_bytes:
            raise InvalidRequestError(
                "prompt", f"the prompt is {nbytes} bytes; the limit is "
                f"{self.max_prompt_bytes} (RouterConfig.max_prompt_bytes)")

    def check_open(self) -> None:
        if self.closing:
            raise ShuttingDownError("the server is shutting down")

    def admit(self) -> None:
        """Take one in-flight slot, or refuse; release() gives it back."""
        self.check_open()
        if self.inflight >= self.limit:
            self.refused += 1
            raise OverloadedError(
                f"the server is at its limit of {self.limit} requests in flight; "
                "retry later", self.retry_after_s())
        self.inflight += 1

    def release(self, duration_s: float) -> None:
        self.inflight -= 1
        self._mean_duration_s += EWMA_WEIGHT * (duration_s - self._mean_duration_s)

    def retry_after_s(self) -> float:
        return min(MAX_RETRY_S, max(MIN_RETRY_S, self._mean_duration_s))
