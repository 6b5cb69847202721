"""The one place where typed errors become gRPC status codes.

Everything below the edge raises typed errors (engine.errors, engine.sampling_params,
router.errors, router.auth); the servicer hands whatever escapes a call to
``status_for`` and aborts the call with the result. Messages of expected errors go to
the client as they are (they name the offending field); anything unexpected becomes
INTERNAL with a generic message, and its traceback goes to the log instead.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import grpc

from engine.errors import InvalidRequestError, RequestNotFoundError
from engine.sampling_params import SamplingParamsError
from router.errors import (
    NoWorkersError,
    OverloadedError,
    QueueFullError,
    RequestFailedError,
)

log = logging.getLogger(__name__)


class AuthError(Exception):
    """The call's credentials are missing or wrong (UNAUTHENTICATED)."""


class Status(NamedTuple):
    code: grpc.StatusCode
    message: str


# Most specific first: InvalidRequestError is also a ValueError, SamplingParamsError too.
_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (SamplingParamsError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NoWorkersError, grpc.StatusCode.UNAVAILABLE),
    (RequestFailedError, grpc.StatusCode.INTERNAL),
    (RequestNotFoundError, grpc.StatusCode.NOT_FOUND),
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def status_for(exc: BaseException) -> Status:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return Status(code, str(exc) or cls.__name__)
    log.error("unexpected error in a call", exc_info=exc)
    return Status(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})")
