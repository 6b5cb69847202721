"""The gRPC edge's Generation service: one call in, a stream of responses out.

One call of Generate::

    bytes   -> GenerateRequest (bytes that do not parse: INVALID_ARGUMENT, not UNKNOWN)
    request -> wire.request_inputs (validate, tokenize: on a thread when large)
            -> Router.generate, bounded by the call's deadline
            -> a GenerateResponse per Delta, a last one from the Final
    error   -> status.status_for (the one error -> status code table) -> abort the call;
               RESOURCE_EXHAUSTED carries a retry hint (grpc-retry-pushback-ms)
    client cancels / deadline passes -> grpc cancels this handler -> the router's stream
            is closed, which aborts the request on every worker holding it (blocks freed)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from proto.pdserve.v1 import generation_pb2 as pb
from router import wire
from router.core import TOKENIZE_INLINE_BYTES, Router
from router.errors import OverloadedError, RequestFailedError
from router.metrics import Metrics
from router.request_state import Delta
from router.server_config import ServerConfig
from router.status import status_for

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # pdserve.v1.Generation


@functools.cache
def version() -> str:  # read from disk once: GetServerInfo answers it on every call
    try:
        return importlib.metadata.version("pdserve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


# A cancel this close to the call's deadline (as the server counts it) is the deadline.
NEAR_DEADLINE_S = 1.0


class Undecodable:
    """What a request deserializes to when its bytes are not a valid message."""

    def __init__(self, error: str) -> None:
        self.error = error


def _lenient(cls: type[Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return Undecodable(str(e))
    return parse


class _Outcome:
    """How a Generate call ended, for pdserve_requests_total{finish_reason, code}."""

    def __init__(self) -> None:
        self.finish_reason = "error"
        self.code = grpc.StatusCode.INTERNAL


class GenerationServicer:
    def __init__(self, router: Router, config: ServerConfig, metrics: Metrics) -> None:
        self.router = router
        self.config = config
        self.metrics = metrics
        self.started = time.monotonic()

    def register(self, server: grpc.aio.Server) -> None:
        """Add the service with deserializers that let the handler answer bad bytes."""
        def handler(kind: Callable[..., grpc.RpcMethodHandler], method: Callable[..., Any],
                    request: type[Message], response: type[Message]) -> grpc.RpcMethodHandler:
            return kind(method, request_deserializer=_lenient(request),
                        response_serializer=response.SerializeToString)

        handlers = {
            "Generate": handler(grpc.unary_stream_rpc_method_handler, self.Generate,
                                pb.GenerateRequest, pb.GenerateResponse),
            "GetModelInfo": handler(grpc.unary_unary_rpc_method_handler, self.GetModelInfo,
                                    pb.GetModelInfoRequest, pb.ModelInfo),
            "GetServerInfo": handler(grpc.unary_unary_rpc_method_handler,
                                     self.GetServerInfo, pb.GetServerInfoRequest,
                                     pb.ServerInfo),
            "DrainWorker": handler(grpc.unary_unary_rpc_method_handler, self.DrainWorker,
                                   pb.DrainWorkerRequest, pb.DrainWorkerResponse),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))

    async def Generate(self, request: pb.GenerateRequest | Undecodable,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        if isinstance(request, Undecodable):
            self.metrics.count_request("error", grpc.StatusCode.INVALID_ARGUMENT.name)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request does not "
                                f"parse as a GenerateRequest: {request.error}")
        assert isinstance(request, pb.GenerateRequest)
        out = _Outcome()
        try:
            rid = request.request_id or f"req-{uuid.uuid4().hex[:16]}"
            async for response in self._generate(rid, request, context, out):
                yield response
            out.code = grpc.StatusCode.OK
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away or the deadline passed: grpc cancels this task (or,
            # when that finds it at a yield, writing a response, closes this generator),
            # which closes the router's stream in _generate, which aborts the request on
            # every worker holding it.
            out.finish_reason = "abort"
            out.code = _cancel_code(context)
            raise
        except Exception as e:
            status = status_for(e)
            out.code = status.code
            if isinstance(e, OverloadedError):
                context.set_trailing_metadata(
                    (("grpc-retry-pushback-ms", str(int(e.retry_after_s * 1000))),))
            await context.abort(status.code, status.message)
        finally:
            self.metrics.count_request(out.finish_reason, out.code.name)

    async def _generate(self, rid: str, request: pb.GenerateRequest,
                        context: grpc.aio.ServicerContext, out: _Outcome
                        ) -> AsyncIterator[pb.GenerateResponse]:
        default = self.config.default_max_tokens
        if request.ByteSize() > TOKENIZE_INLINE_BYTES:  # off the loop: others keep streaming
            inputs = await asyncio.to_thread(wire.request_inputs, request, self.router, default)
        else:
            inputs = wire.request_inputs(request, self.router, default)
        stream = self.router.generate(inputs.prompt_token_ids, inputs.params, rid,
                                      timeout_s=context.time_remaining())
        last_token_at: float | None = None
        async with contextlib.aclosing(stream):
            async for item in stream:
                if isinstance(item, Delta):
                    now = time.monotonic()
                    if last_token_at is not None:
                        self.metrics.observe_tokens(len(item.token_ids), now - last_token_at)
                    if item.token_ids:
                        last_token_at = now
                    yield wire.delta_response(rid, item)
                    continue
                if item.finish_reason == "error":
                    raise RequestFailedError(item.error or f"request {rid} failed")
                out.finish_reason = item.finish_reason
                # The router forgets the request once its stream resumes past the Final,
                # so its events are read now.
                yield wire.final_response(rid, item, self.router.requests.get(rid))

    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext
                           ) -> pb.ModelInfo:
        return await self._unary(context, lambda: wire.model_info(self.router), request)

    async def GetServerInfo(self, request: Any, context: grpc.aio.ServicerContext
                            ) -> pb.ServerInfo:
        return await self._unary(context, lambda: wire.server_info(
            self.router, version(), time.monotonic() - self.started), request)

    async def DrainWorker(self, request: pb.DrainWorkerRequest | Undecodable,
                          context: grpc.aio.ServicerContext) -> pb.DrainWorkerResponse:
        async def drain() -> pb.DrainWorkerResponse:
            assert isinstance(request, pb.DrainWorkerRequest)
            moved = await self.router.drain(request.worker_id)
            return pb.DrainWorkerResponse(num_requests_moved=moved)

        return await self._unary(context, drain, request)

    async def _unary(self, context: grpc.aio.ServicerContext, fn: Callable[[], Any],
                     request: Any = None) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request does not parse: {request.error}")
        try:
            result = fn()
            return await result if asyncio.iscoroutine(result) else result
        except Exception as e:
            status = status_for(e)
            await context.abort(status.code, status.message)
            raise  # unreachable: abort raises


def _cancel_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """One answer to "cancelled or deadline?", wherever the call ended. The client's
    deadline timer started first (the server's counts from the call's arrival) and its
    cancel may come in before the server's own deadline: a cancel that close to the
    deadline is counted as the deadline."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= NEAR_DEADLINE_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED
