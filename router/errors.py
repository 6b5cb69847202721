"""Typed router errors; the gRPC edge maps each to one status code."""

from __future__ import annotations


class RouterError(Exception):
    """Base class."""


class QueueFullError(RouterError):
    """The admission queue is full (RESOURCE_EXHAUSTED)."""


class NoWorkersError(RouterError):
    """No live worker can take the request (UNAVAILABLE)."""


class RequestFailedError(RouterError):
    """The request failed inside the cluster, e.g. its KV transfer (INTERNAL)."""
