"""One real pdserve service shared by every test_grpc_* module (a pytest plugin: each
module names it in ``pytest_plugins``).

Ray on loopback, one prefill and one decode SmolLM2 worker on CPU, the real gRPC server
(API key on) and the metrics endpoint on free loopback ports. The service runs on its
own event-loop thread so tests stay plain synchronous gRPC clients, and it is stopped
right after the last test that uses it, so later e2e modules get the machine (and
Ray) to themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import grpc
import pytest
import ray

from engine.config import CacheConfig, EngineConfig
from proto.pdserve.v1 import generation_pb2 as pb
from proto.pdserve.v1 import generation_pb2_grpc as pb_grpc
from router.config import RouterConfig
from router.server_config import ServerConfig
from router.service import Service

T = TypeVar("T")
API_KEY = "e2e-test-key"
AUTH = (("authorization", f"Bearer {API_KEY}"),)
MAX_MESSAGE_BYTES = 1 << 20
KV_MEMORY_BYTES = 256 << 20
START_TIMEOUT_S = 240.0


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveService:
    """A Service on a background event loop, with helpers to reach into it."""

    def __init__(self, router_config: RouterConfig, server_config: ServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pdserve-e2e",
                                       daemon=True)
        self.thread.start()
        self.service = Service(router_config, server_config)
        self.auth = AUTH  # metadata every call needs (the service has an API key)
        self.api_key = API_KEY
        self.max_message_bytes = server_config.max_message_bytes
        self.stopped = False
        self.run(self.service.start(), timeout=START_TIMEOUT_S)
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.GenerationStub(self.channel)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def router(self):  # type: ignore[no-untyped-def]
        return self.service.router

    @property
    def target(self) -> str:
        return self.service.target

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.service.metrics_port}/metrics"

    def generate(self, request: pb.GenerateRequest, timeout: float = 120.0
                 ) -> list[pb.GenerateResponse]:
        return list(self.stub.Generate(request, metadata=self.auth, timeout=timeout))

    def pool_states(self) -> dict[str, dict[str, int]]:
        """Block accounting read from every live worker's pool."""
        handles = [h for h in self.router.workers() if h.alive]
        states = ray.get([h.actor.pool_state.remote() for h in handles], timeout=30)
        return {h.worker_id: s for h, s in zip(handles, states, strict=True)}

    def wait_until_idle(self, timeout: float = 30.0) -> dict[str, dict[str, int]]:
        """Poll until no worker holds a request or a block; returns the last states."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.pool_states()
            if all(s["used"] == 0 and s["requests"] == 0 and s["held"] == 0
                   for s in states.values()) and not self.router.requests:
                return states
            if time.monotonic() > deadline:
                return states
            time.sleep(0.2)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.channel.close()
        with contextlib.suppress(Exception):
            self.run(self.service.stop(), timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


_LIVE: LiveService | None = None
_STARTED_RAY = False


@pytest.fixture(scope="session")
def live() -> Iterator[LiveService]:
    global _LIVE, _STARTED_RAY
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=6, include_dashboard=False,
                 object_store_memory=300 << 20, _node_ip_address="127.0.0.1",
                 log_to_driver=False)
        _STARTED_RAY = True
    router_config = RouterConfig(
        mode="disaggregated", prefill_workers=1, decode_workers=1,
        engine=EngineConfig(cache=CacheConfig(memory_bytes=KV_MEMORY_BYTES)))
    server_config = ServerConfig(
        host="127.0.0.1", port=0, metrics_port=free_port(), http_port=0, api_key=API_KEY,
        max_message_bytes=MAX_MESSAGE_BYTES, health_interval_s=0.2, stats_interval_s=0.5)
    _LIVE = LiveService(router_config, server_config)
    yield _LIVE
    _release()


def _release() -> None:
    global _STARTED_RAY
    if _LIVE is not None:
        _LIVE.stop()
    if _STARTED_RAY:
        ray.shutdown()
        _STARTED_RAY = False


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop the shared service after the last test that uses it (not at session end)."""
    if _LIVE is None or _LIVE.stopped:
        return
    items = item.session.items
    later = items[items.index(item) + 1:] if item in items else []
    if not any("live" in getattr(i, "fixturenames", ()) for i in later):
        _release()
