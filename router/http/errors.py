"""OpenAI-style error bodies, and the HTTP status of every error the API can raise.

Typed errors get their status code in one place, router.status.status_for (the gRPC
code); this edge maps those codes to HTTP statuses, so a new error type is one line
there, not one line in each edge. Errors that only HTTP has (a body too large or too
slow, an unknown model or path, bad JSON) are raised here as ``HttpError`` directly,
each with the gRPC code of the nearest gRPC failure, which metrics count by.

The body is what OpenAI's API and its clients use::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature",
               "code": null}}
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import grpc
from starlette.responses import JSONResponse

from engine.sampling_params import shown
from router.status import status_for

# 429 and 503 are "come back later". Unless the router says how long (an error with
# retry_after_s), a second: short next to a request's life and long next to a decode
# step, so clients that honour it neither hammer nor idle.
RETRY_AFTER_S = 1.0


class HttpError(Exception):
    """An error as the client will see it. ``grpc_code`` is the code the same failure
    gets on the gRPC API (None for errors only HTTP has); metrics count by it."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 grpc_code: grpc.StatusCode | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.grpc_code = grpc_code
        self.retry_after_s = retry_after_s


class _Kind(NamedTuple):
    status: int
    type: str
    code: str | None


# The codes OpenAI's clients act on: 400/404 are not retried, 429 and >= 500 are (with
# backoff, honouring Retry-After), 401 asks for a key.
_BY_GRPC_CODE: dict[grpc.StatusCode, _Kind] = {
    grpc.StatusCode.INVALID_ARGUMENT: _Kind(400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: _Kind(401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.NOT_FOUND: _Kind(404, "invalid_request_error", "not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: _Kind(429, "rate_limit_error", "overloaded"),
    grpc.StatusCode.UNAVAILABLE: _Kind(503, "server_error", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: _Kind(504, "server_error", "timeout"),
}
_INTERNAL = _Kind(500, "server_error", None)


def api_error(exc: BaseException) -> HttpError:
    """The HttpError a raised exception becomes. Unexpected ones are logged (with their
    traceback) by status_for and reach the client as a generic 500."""
    if isinstance(exc, HttpError):
        return exc
    status = status_for(exc)
    kind = _BY_GRPC_CODE.get(status.code, _INTERNAL)
    # InvalidRequestError and SamplingParamsError name the culprit; the request parser
    # has already translated it to the OpenAI field name.
    param = getattr(exc, "field", None) if kind.status == 400 else None
    retry = getattr(exc, "retry_after_s", None)
    if retry is None and kind.status in (429, 503):
        retry = RETRY_AFTER_S
    return HttpError(kind.status, status.message, type_=kind.type, param=param,
                     code=kind.code, grpc_code=status.code, retry_after_s=retry)


def error_body(err: HttpError) -> dict[str, Any]:
    return {"error": {"message": _encodable(err.message), "type": err.type,
                      "param": None if err.param is None else _encodable(err.param),
                      "code": err.code}}


def _encodable(text: str) -> str:
    """Messages may quote the client's input: a lone surrogate in it (which JSON
    escapes can carry) would make the error response itself fail to encode."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(exc: BaseException) -> JSONResponse:
    err = api_error(exc)
    headers: dict[str, str] = {}
    if err.retry_after_s is not None:  # whole seconds (RFC 9110), never 0: that is "now"
        headers["retry-after"] = str(max(1, math.ceil(err.retry_after_s)))
    if err.status == 401:
        headers["www-authenticate"] = "Bearer"
    return JSONResponse(error_body(err), status_code=err.status, headers=headers)


def model_not_found(model: str) -> HttpError:
    return HttpError(404, f"The model {shown(model)} does not exist; GET /v1/models lists "
                     "the served one.", param="model", code="model_not_found",
                     grpc_code=grpc.StatusCode.NOT_FOUND)


def bad_body(message: str, param: str | None = None) -> HttpError:
    """A body that is not a JSON object the API can read (INVALID_ARGUMENT on gRPC,
    where a message that does not parse is refused the same way)."""
    return HttpError(400, message, param=param, grpc_code=grpc.StatusCode.INVALID_ARGUMENT)


def body_too_large(limit: int) -> HttpError:
    # gRPC refuses a message over its size limit with RESOURCE_EXHAUSTED.
    return HttpError(413, f"the request body exceeds {limit} bytes", code="request_too_large",
                     grpc_code=grpc.StatusCode.RESOURCE_EXHAUSTED)


def body_timed_out(idle_s: float) -> HttpError:
    return HttpError(408, f"the request body stalled: no bytes for {idle_s:g} s",
                     code="request_timeout")
