"""How the gRPC edge counts a Generate call's end (pdserve_requests_total's labels),
on a real Router over the fake cluster: a cancel is CANCELLED wherever grpc finds the
handler (awaiting, or at a yield, which closes the generator), and a cancel at the
deadline is DEADLINE_EXCEEDED even when the server's clock says a moment is left."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from proto.pdserve.v1 import generation_pb2 as pb
from router.grpc_servicer import NEAR_DEADLINE_S, GenerationServicer
from router.metrics import Metrics
from router.server_config import ServerConfig
from tests.unit.router_fakes import FakeCluster
from tests.unit.test_router_lifecycle import cluster, run, start  # noqa: F401

REQUEST = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[11, 22, 33]), sampling=pb.SamplingParams(
    temperature=0.0, max_tokens=500, ignore_eos=True))


class Context:
    """The part of grpc.aio.ServicerContext the handler uses."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining

    def set_trailing_metadata(self, _md: Any) -> None:
        pass

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AssertionError(f"aborted: {code} {details}")


def counted(metrics: Metrics) -> dict[tuple[str, str], float]:
    return {(s.labels["finish_reason"], s.labels["code"]): s.value
            for m in metrics.requests.collect() for s in m.samples
            if s.name.endswith("_total") and s.value}


@pytest.mark.parametrize("how,remaining,code", [
    ("close", None, "CANCELLED"),  # grpc found the handler at a yield
    ("cancel", None, "CANCELLED"),  # ...or awaiting the next token
    ("cancel", 30.0, "CANCELLED"),
    ("close", NEAR_DEADLINE_S / 2, "DEADLINE_EXCEEDED"),
    ("cancel", -0.01, "DEADLINE_EXCEEDED"),
])
def test_how_a_cancelled_call_is_counted(cluster: FakeCluster, how: str,  # noqa: F811
                                         remaining: float | None, code: str) -> None:
    async def go() -> None:
        router = await start(cluster)
        metrics = Metrics(router)
        servicer = GenerationServicer(router, ServerConfig(), metrics)
        calls = servicer.Generate(REQUEST, Context(remaining))  # type: ignore[arg-type]
        try:
            await calls.__anext__()
            if how == "close":
                await calls.aclose()
            else:
                task = asyncio.ensure_future(calls.__anext__())
                await asyncio.sleep(0)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            assert counted(metrics) == {("abort", code): 1.0}
        finally:
            await router.shutdown()
    run(go())
