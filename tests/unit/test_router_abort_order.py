"""The order of aborts: the prefill worker is told before the decode worker.

A request whose KV may be in flight -- its prefill sent, the decode worker's blocks
reserved as the destination -- is ended early (client cancel, deadline, a failed or
drained prefill, shutdown). The prefill worker answers an abort only once its KV send is
over (prefill_worker/worker.py), and with cuda-ipc that send writes in place into the
decode worker's reserved blocks. So the decode worker must not be told (and free, and
hand those blocks to another request) until the prefill worker has answered. These tests
hold the prefill worker's answer back (``abort_gate``: its send still running) and
assert, from the cluster's cross-actor call journal, that the decode worker hears of the
abort only afterwards -- in every way an attempt can end while both hold something.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from messages import PrefillAborted
from router.core import Router
from router.errors import RequestFailedError
from router.request_state import Phase
from tests.unit.router_fakes import FakeActor, FakeCluster
from tests.unit.test_router_lifecycle import (
    PROMPT,
    collect,
    expected,
    run,
    settle,
    start,
    until,
)
from tests.unit.test_router_lifecycle import cluster as cluster  # the fixture

__all__ = ["cluster"]


def aborts(cluster: FakeCluster, attempt: str) -> list[str]:
    """Who was told to abort ``attempt``, in the order the workers heard it."""
    return [w for w, method, rid in cluster.journal if method == "abort" and rid == attempt]


async def check_order(router: Router, cluster: FakeCluster, attempt: str,
                      prefill: FakeActor, decode: FakeActor) -> None:
    """With the prefill worker's abort held (its KV send still running), the decode
    worker keeps the reservation and hears nothing; once it answers, the decode worker
    is told and the blocks come back."""
    await until(lambda: aborts(cluster, attempt), "a worker told")
    for _ in range(20):  # let any abort that was not waiting for the answer arrive
        await asyncio.sleep(0.001)
    assert aborts(cluster, attempt) == [prefill.worker_id]
    assert attempt in decode.reserved, "the destination blocks were freed too early"
    prefill.abort_gate.set()
    await until(lambda: aborts(cluster, attempt) == [prefill.worker_id, decode.worker_id],
                "the decode worker told second")
    await settle(router, cluster)


async def prefill_in_flight(cluster: FakeCluster, router: Router, rid: str,
                            go: Callable[[], Awaitable[object]]
                            ) -> tuple[FakeActor, FakeActor, asyncio.Future[object]]:
    """Start a request and hold it in its prefill, with the prefill's abort held."""
    prefill, decode = cluster.live("prefill")[0], cluster.live("decode")[0]
    prefill.prefill_gate.clear()
    prefill.abort_gate.clear()
    task = asyncio.ensure_future(go())
    await until(lambda: rid in router.requests
                and router.requests[rid].phase is Phase.PREFILLING
                and ("prefill", f"{rid}@1") in prefill.calls, "the prefill in flight")
    return prefill, decode, task


def test_cancel_during_prefill_tells_prefill_first(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster)
        prefill, decode, task = await prefill_in_flight(
            cluster, router, "c", lambda: collect(router, request_id="c"))
        task.cancel()  # the client went away
        await asyncio.gather(task, return_exceptions=True)
        await check_order(router, cluster, "c@1", prefill, decode)
        await router.shutdown()
    run(go())


def test_deadline_during_prefill_tells_prefill_first(cluster: FakeCluster) -> None:
    """The call's deadline passes while the prefill runs: gRPC cancels the handler,
    which closes the router's stream (router/grpc_servicer.py) -- the same path a
    deadline takes in the server."""
    async def go() -> None:
        router = await start(cluster)
        prefill, decode, task = await prefill_in_flight(
            cluster, router, "t",
            lambda: asyncio.wait_for(collect(router, request_id="t", timeout_s=30.0), 0.05))
        with pytest.raises(TimeoutError):
            await task
        await check_order(router, cluster, "t@1", prefill, decode)
        await router.shutdown()
    run(go())


def test_router_abort_during_prefill_tells_prefill_first(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster)
        prefill, decode, task = await prefill_in_flight(
            cluster, router, "a", lambda: collect(router, request_id="a"))
        assert await router.abort("a")
        toks, final = await task  # type: ignore[misc]
        assert toks == [] and final.finish_reason == "abort"
        await check_order(router, cluster, "a@1", prefill, decode)
        await router.shutdown()
    run(go())


def test_failed_prefill_tells_prefill_first(cluster: FakeCluster) -> None:
    """A prefill that fails inside the worker (not an abort): the request fails, and
    both workers are still told, prefill first -- its send may have started."""
    async def go() -> None:
        router = await start(cluster)
        prefill, decode, task = await prefill_in_flight(
            cluster, router, "f", lambda: collect(router, request_id="f"))
        prefill.fail_next_prefill = RuntimeError("the step failed")
        prefill.prefill_gate.set()
        with pytest.raises(RequestFailedError, match="the step failed"):
            await task
        await check_order(router, cluster, "f@1", prefill, decode)
        await router.shutdown()
    run(go())


def test_prefill_aborted_by_its_worker_tells_prefill_first_and_retries(
        cluster: FakeCluster) -> None:
    """The prefill worker aborts the prefill itself (it drains): the attempt is placed
    again, and the old one is cleaned up prefill first."""
    async def go() -> None:
        router = await start(cluster)
        prefill, decode, task = await prefill_in_flight(
            cluster, router, "d", lambda: collect(router, request_id="d"))
        prefill.fail_next_prefill = PrefillAborted("d@1 aborted: the worker drains")
        prefill.prefill_gate.set()
        await check_order(router, cluster, "d@1", prefill, decode)
        toks, final = await task  # type: ignore[misc]
        assert toks == expected(PROMPT, 12) and final.finish_reason == "length"
        assert ("prefill", "d@2") in prefill.calls
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_shutdown_during_prefill_tells_prefill_first(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster)
        prefill, decode, task = await prefill_in_flight(
            cluster, router, "s", lambda: collect(router, request_id="s"))
        stop = asyncio.ensure_future(router.shutdown(grace_s=0.0))
        await until(lambda: aborts(cluster, "s@1"), "a worker told")
        for _ in range(20):
            await asyncio.sleep(0.001)
        assert aborts(cluster, "s@1") == [prefill.worker_id]
        assert "s@1" in decode.reserved
        prefill.abort_gate.set()
        await stop
        await asyncio.gather(task, return_exceptions=True)
        assert aborts(cluster, "s@1") == [prefill.worker_id, decode.worker_id]
    run(go())


def test_only_the_decode_worker_is_told_once_the_prefill_is_over(
        cluster: FakeCluster) -> None:
    """After the prefill returned, the prefill worker holds nothing of the attempt (its
    blocks are prefix cache): a cancel while the KV is imported tells the decode worker
    alone."""
    async def go() -> None:
        router = await start(cluster)
        prefill, decode = cluster.live("prefill")[0], cluster.live("decode")[0]
        decode.start_gate.clear()
        task = asyncio.ensure_future(collect(router, request_id="i"))
        await until(lambda: "i" in router.requests
                    and router.requests["i"].phase is Phase.STARTING, "importing")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        decode.start_gate.set()
        await settle(router, cluster)
        assert aborts(cluster, "i@1") == [decode.worker_id]
        assert ("abort", "i@1") not in prefill.calls
        await router.shutdown()
    run(go())
