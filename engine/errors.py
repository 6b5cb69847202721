"""Typed engine errors; the gRPC edge maps each to one status code."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of errors the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """The request cannot be served as asked (INVALID_ARGUMENT); ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Raised inside workers and sent back through Ray: pickling must rebuild it
        # from its own arguments, or the client gets INTERNAL instead of this error.
        return type(self), (self.field, self.message)


class RequestNotFoundError(EngineError, KeyError):
    """No request with that id is known (NOT_FOUND)."""
