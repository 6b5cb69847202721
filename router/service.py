"""The running service: router (and its Ray workers), gRPC server, the OpenAI-compatible
HTTP server (router/http/, unless http_port is 0), metrics, pollers.

Start: the ports open first (health NOT_SERVING), then the workers load (SERVING once
every role has one). Stop (SIGTERM): health NOT_SERVING and new calls refused at once,
running streams get ``shutdown_grace_s`` to finish, the rest end with a last
FINISH_REASON_ABORT message, then the server closes and the workers go.

``pdserve serve`` starts Ray before this (or joins a cluster); when nobody has, the
router's worker registry starts a local Ray itself (tests, embedding).
"""

from __future__ import annotations

import asyncio
import logging
import sys

from router.config import RouterConfig
from router.core import Router
from router.http import HttpServer
from router.metrics import Metrics, StatsPoller
from router.server import GrpcServer
from router.server_config import ServerConfig

log = logging.getLogger(__name__)


class Service:
    def __init__(self, router_config: RouterConfig, server_config: ServerConfig) -> None:
        self.router_config = router_config
        self.server_config = server_config
        self.router = Router(router_config)  # tokenizer and model metadata only
        self.metrics = Metrics(self.router)
        self.grpc: GrpcServer | None = None
        self.http: HttpServer | None = None
        self.metrics_port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def port(self) -> int:
        assert self.grpc is not None, "start() first"
        return self.grpc.port

    @property
    def target(self) -> str:
        """host:port a client on this machine dials."""
        host = self.server_config.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def start(self) -> None:
        """Ports first, workers second: a taken port fails in a second, not after the
        workers have loaded, and while they load the service already answers (health
        NOT_SERVING, Generate UNAVAILABLE, GetModelInfo served)."""
        cfg = self.server_config
        self.grpc = GrpcServer(self.router, cfg, self.metrics)
        if cfg.http_port:
            self.http = HttpServer(self.router, cfg, self.metrics, self._serving)
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve(cfg.host, cfg.metrics_port)
        await self.grpc.start()
        if self.http is not None:
            await self.http.start()
        await self.router.start()
        await self.grpc.health.update()  # SERVING now, not at the next health tick
        self._tasks.append(asyncio.get_running_loop().create_task(
            StatsPoller(self.router, cfg.stats_interval_s).run()))
        log.info("serving pdserve.v1.Generation on %s (HTTP: %s, metrics: %s)", self.target,
                 self.http_url, self.metrics_port)

    def _serving(self) -> bool:
        """gRPC health's verdict, which the HTTP API's /health and /ready report too."""
        return self.grpc is not None and self.grpc.health.serving()

    @property
    def http_url(self) -> str | None:
        """Base URL of the OpenAI-compatible API (None when it is off)."""
        if self.http is None:
            return None
        host = self.target.rsplit(":", 1)[0]
        return f"{self.http.scheme}://{host}:{self.http.port}"

    async def stop(self) -> None:
        self.router.begin_shutdown()
        if self.grpc is not None:
            await self.grpc.health.update()  # NOT_SERVING now: balancers stop sending
        await self.router.shutdown(self.server_config.shutdown_grace_s)
        for t in self._tasks:
            t.cancel()
        # The router has ended every stream: the servers only let last bytes leave.
        await asyncio.gather(*(s.stop() for s in (self.http, self.grpc) if s is not None))
        self.metrics.stop()

    def usage(self) -> str:
        """How to reach the service, printed by ``pdserve serve``."""
        c = self.server_config
        flags = f" --target {self.target}"
        flags += " --tls-ca CERT.pem" if c.tls else ""
        flags += " --api-key KEY" if c.api_key else ""
        grpcurl = "grpcurl" + ("" if c.tls else " -plaintext")
        grpcurl += ' -H "authorization: Bearer KEY"' if c.api_key else ""
        body = '{"chat": {"messages": [{"role": "user", "content": "Hello!"}]}}'
        lines = [
            f"pdserve is serving pdserve.v1.Generation on {self.target}",
            f'  pdserve generate{flags} --chat "What is the capital of France?"',
            f"  pdserve info{flags}",
            f"  {grpcurl} -d '{body}' {self.target} pdserve.v1.Generation/Generate",
        ]
        if self.http_url is not None:
            curl = "curl" + (" --cacert CERT.pem" if c.tls else "")
            curl += ' -H "Authorization: Bearer KEY"' if c.api_key else ""
            chat = ('{"messages": [{"role": "user", "content": "Hello!"}], '
                    '"max_tokens": 32}')
            lines += [f"OpenAI-compatible HTTP API on {self.http_url}/v1",
                      f"  {curl} {self.http_url}/v1/chat/completions "
                      f"-H 'Content-Type: application/json' -d '{chat}'"]
        if self.metrics_port is not None:
            host = self.target.rsplit(":", 1)[0]
            lines.append(f"  metrics: http://{host}:{self.metrics_port}/metrics")
        return "\n".join(lines)


def print_usage(service: Service) -> None:
    print(service.usage(), file=sys.stdout, flush=True)
