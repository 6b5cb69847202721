"""The gRPC edge's configuration: where it listens, how it secures calls, its limits."""

from __future__ import annotations

import os
from dataclasses import dataclass

from engine.config import ConfigError

API_KEY_ENV = "PDSERVE_API_KEY"
DEFAULT_PORT = 50051  # the customary gRPC port
DEFAULT_METRICS_PORT = 9464  # clear of Prometheus (9090), its exporters and DCGM (9400)
DEFAULT_HTTP_PORT = 8000  # what OpenAI-compatible servers (vLLM, SGLang's docs) listen on


@dataclass(frozen=True)
class ServerConfig:
    """One gRPC server, its OpenAI-compatible HTTP server and its Prometheus endpoint.

    host: the address all three listen on. Loopback by default: exposing the server is a
        decision (use 0.0.0.0 with TLS and an API key, or behind a proxy that has them).
    port / metrics_port: 0 picks a free port (tests); metrics_port None turns metrics off.
    http_port: the OpenAI-compatible HTTP API (router/http/), on by default because the
        tools people point at a server expect it; 0 turns it off (so, unlike the other
        ports, it cannot ask for a free port).
    api_key: when set, every call but the health check must carry the metadata (on
        HTTP, the header) "authorization: Bearer <api_key>" (health stays open for load
        balancers and Kubernetes probes, which cannot send credentials and learn nothing
        from it).
    tls_cert / tls_key: PEM files; both or neither; gRPC and the HTTP API both serve TLS
        with them. Metrics stay plain HTTP (scrapers usually sit on the private network;
        put a proxy in front if not).
    max_message_bytes: the largest request or response message accepted (HTTP: the
        largest request body, 413 above it); a prompt of the longest context as token
        ids is well under the default.
    default_max_tokens: max_tokens when a request leaves it unset (capped by the
        context left after the prompt).
    health_interval_s: how often health is re-evaluated from worker liveness.
    stats_interval_s: how often prefill workers' stats are polled (decode workers'
        stats arrive with every token batch).
    shutdown_grace_s: on SIGTERM, health turns NOT_SERVING and new calls are refused at
        once; running streams get this long to finish, and those cut off then get a
        last message with FINISH_REASON_ABORT before their call ends.
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    metrics_port: int | None = DEFAULT_METRICS_PORT
    http_port: int = DEFAULT_HTTP_PORT
    api_key: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    max_message_bytes: int = 8 << 20
    default_max_tokens: int = 256
    health_interval_s: float = 0.5
    stats_interval_s: float = 2.0
    shutdown_grace_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port", "http_port"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 65535:
                raise ConfigError(f"ServerConfig.{name} must be in [0, 65535], got {v}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("ServerConfig: tls_cert and tls_key go together (both or neither)")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"ServerConfig.{name}: no such file {path!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("ServerConfig.api_key must not be empty (leave it unset instead)")
        if self.max_message_bytes < 1024:
            raise ConfigError("ServerConfig.max_message_bytes must be >= 1024")
        if self.default_max_tokens < 1:
            raise ConfigError("ServerConfig.default_max_tokens must be >= 1")
        for name in ("health_interval_s", "stats_interval_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ServerConfig.{name} must be > 0")
        if self.shutdown_grace_s < 0:
            raise ConfigError("ServerConfig.shutdown_grace_s must be >= 0")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None
