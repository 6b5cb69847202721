"""The gRPC edge (grpc.aio): the Generation service, health, reflection, auth, limits.

One call of Generate::

    request -> wire.request_inputs (validate, tokenize) -> Router.generate
            -> a GenerateResponse per Delta, a last one from the Final
    error   -> status.status_for (the one error -> status code table) -> abort the call
    client cancels / deadline passes -> grpc cancels this handler -> the router's stream
            is closed, which aborts the request on every worker holding it (blocks freed)

Health (grpc.health.v1) is SERVING while every role the mode needs has a live worker,
for the whole server ("") and for pdserve.v1.Generation; it flips to NOT_SERVING while,
say, a dead decode worker is being replaced, and on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proto.pdserve.v1 import generation_pb2 as pb
from proto.pdserve.v1 import generation_pb2_grpc as pb_grpc
from router import wire
from router.auth import ApiKeyInterceptor
from router.core import Router
from router.errors import RequestFailedError
from router.metrics import Metrics
from router.request_state import Delta
from router.server_config import ServerConfig
from router.status import status_for

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # pdserve.v1.Generation


def version() -> str:
    try:
        return importlib.metadata.version("pdserve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class _Outcome:
    """How a Generate call ended, for pdserve_requests_total{finish_reason, code}."""

    def __init__(self) -> None:
        self.finish_reason = "error"
        self.code = grpc.StatusCode.INTERNAL


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, router: Router, config: ServerConfig, metrics: Metrics) -> None:
        self.router = router
        self.config = config
        self.metrics = metrics
        self.started = time.monotonic()

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        rid = request.request_id or f"req-{uuid.uuid4().hex[:16]}"
        out = _Outcome()
        try:
            async for response in self._generate(rid, request, out):
                yield response
            out.code = grpc.StatusCode.OK
        except asyncio.CancelledError:
            # The client went away or the deadline passed: grpc cancels this task, which
            # closes the router's stream in _generate, which aborts the request on every
            # worker holding it.
            out.finish_reason = "abort"
            remaining = context.time_remaining()
            out.code = (grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None
                        and remaining <= 0 else grpc.StatusCode.CANCELLED)
            raise
        except Exception as e:
            status = status_for(e)
            out.code = status.code
            await context.abort(status.code, status.message)
        finally:
            self.metrics.count_request(out.finish_reason, out.code.name)

    async def _generate(self, rid: str, request: pb.GenerateRequest, out: _Outcome
                        ) -> AsyncIterator[pb.GenerateResponse]:
        inputs = wire.request_inputs(request, self.router, self.config.default_max_tokens)
        stream = self.router.generate(inputs.prompt_token_ids, inputs.params, rid)
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

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        try:
            return wire.model_info(self.router)
        except Exception as e:
            status = status_for(e)
            await context.abort(status.code, status.message)
            raise  # unreachable: abort raises

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerInfo:
        try:
            return wire.server_info(self.router, version(), time.monotonic() - self.started)
        except Exception as e:
            status = status_for(e)
            await context.abort(status.code, status.message)
            raise


class HealthReporter:
    """Keeps grpc.health.v1 in step with worker liveness."""

    def __init__(self, router: Router, servicer: health.aio.HealthServicer) -> None:
        self.router = router
        self.servicer = servicer
        self.serving: bool | None = None

    def needed_roles(self) -> tuple[str, ...]:
        return ("colocated",) if self.router.config.mode == "colocated" else ("prefill", "decode")

    async def update(self) -> bool:
        ok = all(self.router.cluster.live(role) for role in self.needed_roles())
        if ok != self.serving:
            status = (health_pb2.HealthCheckResponse.SERVING if ok
                      else health_pb2.HealthCheckResponse.NOT_SERVING)
            for name in ("", SERVICE_NAME):
                await self.servicer.set(name, status)
            if ok:
                log.info("health: SERVING")
            elif self.serving is not None:
                log.warning("health: NOT_SERVING (a needed role has no live worker)")
            self.serving = ok
        return ok

    async def run(self, interval_s: float) -> None:
        while True:
            await self.update()
            await asyncio.sleep(interval_s)


class GrpcServer:
    """The grpc.aio server with every service on it; ``port`` is the bound port."""

    def __init__(self, router: Router, config: ServerConfig, metrics: Metrics) -> None:
        self.config = config
        opts = [("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0)]  # a port already taken must fail, not be shared
        interceptors = [ApiKeyInterceptor(config.api_key)] if config.api_key else []
        self.server = grpc.aio.server(interceptors=interceptors, options=opts)
        self.servicer = GenerationServicer(router, config, metrics)
        pb_grpc.add_GenerationServicer_to_server(self.servicer, self.server)
        self.health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health_servicer, self.server)
        self.health = HealthReporter(router, self.health_servicer)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.port = self._bind()
        self._health_task: asyncio.Task[None] | None = None

    def _bind(self) -> int:
        c = self.config
        host = f"[{c.host}]" if ":" in c.host else c.host  # IPv6 literals need brackets
        address = f"{host}:{c.port}"
        try:
            if c.tls_cert is not None and c.tls_key is not None:
                with open(c.tls_key, "rb") as k, open(c.tls_cert, "rb") as crt:
                    creds = grpc.ssl_server_credentials([(k.read(), crt.read())])
                port = self.server.add_secure_port(address, creds)
            else:
                port = self.server.add_insecure_port(address)
        except RuntimeError:  # grpc's "Failed to bind"
            port = 0
        if port == 0:  # older grpc versions report a failed bind this way
            raise OSError(f"could not listen on {address} (gRPC): is the port taken?")
        return port

    async def start(self) -> None:
        await self.health.update()
        await self.server.start()
        self._health_task = asyncio.get_running_loop().create_task(
            self.health.run(self.config.health_interval_s))

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        await self.health_servicer.enter_graceful_shutdown()
        await self.server.stop(self.config.grace_period_s)
