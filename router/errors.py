"""Typed router errors; the gRPC edge maps each to one status code (router/status.py)."""

from __future__ import annotations


class RouterError(Exception):
    """Base class."""


class QueueFullError(RouterError):
    """Too many requests wait for KV room (RESOURCE_EXHAUSTED)."""


class OverloadedError(RouterError):
    """Admission refused a request because the service is at its in-flight bound
    (RESOURCE_EXHAUSTED, with a retry hint): load never turns into UNAVAILABLE."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[type, tuple[str, float]]:  # pickled with its arguments
        return type(self), (str(self), self.retry_after_s)


class NoWorkersError(RouterError):
    """No live worker can take the request, and none is coming in time (UNAVAILABLE)."""


class ShuttingDownError(NoWorkersError):
    """The service is draining for shutdown: new calls are refused (UNAVAILABLE)."""


class RequestFailedError(RouterError):
    """The request failed inside the cluster for a reason of its own (INTERNAL)."""


class WorkerLost(RouterError):
    """Internal: a worker the request was using died; the request is placed again."""

    def __init__(self, worker_id: str) -> None:
        super().__init__(f"worker {worker_id} died")
        self.worker_id = worker_id

    def __reduce__(self) -> tuple[type, tuple[str]]:  # pickled with its arguments
        return type(self), (self.worker_id,)


class TransferFailed(RouterError):
    """Internal: the request's KV could not be moved; the request is placed again."""


class KVSpecMismatch(RouterError):
    """A prefill or decode worker came up storing its KV cache in another layout than
    the deployment's other workers (dtype, block shape or scales): no KV could move
    between them, so it is refused -- at startup the whole start fails, later the worker
    is not admitted (router/kv_spec_gate.py)."""


class DeadlineExceeded(TimeoutError):
    """The request's deadline passed while it waited or ran (DEADLINE_EXCEEDED)."""
