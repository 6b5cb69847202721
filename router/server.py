"""The gRPC server (grpc.aio): the Generation service (router/grpc_servicer.py), health,
reflection, auth, limits.

Health (grpc.health.v1) is SERVING while every role the mode needs has a live worker,
for the whole server ("") and for pdserve.v1.Generation; it flips to NOT_SERVING while,
say, a dead decode worker is being replaced (or no alive Ray node can host its
replacement: the log says which role and why), and at once when shutdown begins.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from router.auth import ApiKeyInterceptor
from router.core import Router
from router.grpc_servicer import SERVICE_NAME, GenerationServicer
from router.metrics import Metrics
from router.server_config import ServerConfig

log = logging.getLogger(__name__)
FLUSH_GRACE_S = 2.0


class HealthReporter:
    """Keeps grpc.health.v1 in step with worker liveness."""

    def __init__(self, router: Router, servicer: health.aio.HealthServicer) -> None:
        self.router = router
        self.servicer = servicer
        self.status: bool | None = None  # last status set

    def serving(self) -> bool:
        """Every role has a live worker and shutdown has not begun (the HTTP edge's
        /ready reads the same)."""
        return (not self.router.admission.closing
                and all(self.router.registry.live(r) for r in self.router.config.roles))

    def reason(self) -> str:
        """Why the service is not serving, for the log."""
        if self.router.admission.closing:
            return "shutting down"
        registry = self.router.registry
        missing = [r for r in self.router.config.roles if not registry.live(r)]
        why = [registry.why_not_placeable(r) or f"no live {r} worker; one is starting"
               for r in missing]
        return "; ".join(why) or "serving"

    async def update(self) -> bool:
        ok = self.serving()
        if ok != self.status:
            status = (health_pb2.HealthCheckResponse.SERVING if ok
                      else health_pb2.HealthCheckResponse.NOT_SERVING)
            for name in ("", SERVICE_NAME):
                await self.servicer.set(name, status)
            if ok:
                log.info("health: SERVING")
            elif self.status is not None:
                log.warning("health: NOT_SERVING (%s)", self.reason())
            self.status = ok
        return ok

    async def run(self, interval_s: float) -> None:
        while True:
            await self.update()
            await asyncio.sleep(interval_s)


# New calls grpc core may hold for the server to take (a memory bound: each is a few KB).
MAX_PENDING_CALLS = 16384


class GrpcServer:
    """The grpc.aio server with every service on it; ``port`` is the bound port."""

    def __init__(self, router: Router, config: ServerConfig, metrics: Metrics) -> None:
        self.config = config
        opts = [("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a port already taken must fail, not be shared
                # grpc core cancels new calls that wait for grpc.aio to take them once
                # over 1000 wait by default: a burst of new calls would end CANCELLED
                # without reaching the router, whose admission answers the excess
                # RESOURCE_EXHAUSTED with a retry hint instead.
                ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
                ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS)]
        interceptors = [ApiKeyInterceptor(config.api_key, _counting_refusals(metrics))
                        ] if config.api_key else []
        self.server = grpc.aio.server(interceptors=interceptors, options=opts)
        self.servicer = GenerationServicer(router, config, metrics)
        self.servicer.register(self.server)
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
        """Close the server; streams were ended by the router's shutdown before, so the
        short grace here only lets their last messages leave."""
        if self._health_task is not None:
            self._health_task.cancel()
        await self.health_servicer.enter_graceful_shutdown()
        await self.server.stop(FLUSH_GRACE_S)


def _counting_refusals(metrics: Metrics) -> Callable[[str], None]:
    """Counts a Generate call the API key check refused, as the handler would have."""
    generate = f"/{SERVICE_NAME}/Generate"

    def refused(method: str) -> None:
        if method == generate:
            metrics.count_request("error", grpc.StatusCode.UNAUTHENTICATED.name)
    return refused
