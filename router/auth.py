"""Bearer-token authentication for every gRPC call (but health checks).

A server interceptor, so no servicer can forget it: a call without metadata
``authorization: Bearer <key>`` matching the server's key is answered UNAUTHENTICATED
before any handler runs. Health checks stay open on purpose (see ServerConfig.api_key).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

from router.status import AuthError, status_for

HEALTH_SERVICE_PREFIX = "/grpc.health.v1.Health/"


def bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """``on_refused(method)``: called for each call refused (the server counts refused
    Generate calls in pdserve_requests_total, which no handler of theirs ever sees)."""

    def __init__(self, api_key: str, on_refused: Callable[[str], None] | None = None
                 ) -> None:
        self._key = api_key.encode()
        self._on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_SERVICE_PREFIX):
            return handler
        token = bearer_token(details.invocation_metadata)
        # compare_digest: the time taken must not reveal how much of a guess was right.
        if token is not None and hmac.compare_digest(token.encode(), self._key):
            return handler
        reason = "missing" if token is None else "invalid"
        if self._on_refused is not None:
            self._on_refused(details.method)
        return _rejecting(handler, AuthError(f"{reason} API key: send the metadata "
                                             "'authorization: Bearer <key>'"))


def _rejecting(handler: grpc.RpcMethodHandler, err: AuthError) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only aborts the call."""
    status = status_for(err)

    async def unary(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(status.code, status.message)

    async def streaming(request: object, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        await context.abort(status.code, status.message)
        yield  # pragma: no cover  (makes this an async generator; abort raises first)

    shape = dict(request_deserializer=handler.request_deserializer,
                 response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **shape)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **shape)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **shape)
    return grpc.stream_stream_rpc_method_handler(streaming, **shape)
