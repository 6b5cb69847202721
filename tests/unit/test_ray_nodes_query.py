"""The registry's ``ray.nodes()`` queries (router/worker_registry.py ray_nodes): with
Ray's GCS gone they block until Ray ends the process, so one under way must never
hold up the router's exit."""

from __future__ import annotations

import asyncio
import threading

import pytest
import ray

from router.worker_registry import ray_nodes


def test_the_answer_and_the_error_reach_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": "n1", "Alive": True}])
    assert asyncio.run(ray_nodes()) == [{"NodeID": "n1", "Alive": True}]

    def unreachable() -> list[dict[str, object]]:
        raise ConnectionError("the GCS is unreachable")

    monkeypatch.setattr(ray, "nodes", unreachable)
    with pytest.raises(ConnectionError, match="unreachable"):
        asyncio.run(ray_nodes())


def test_a_query_that_never_returns_does_not_hold_up_the_exit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    gcs_back = threading.Event()
    monkeypatch.setattr(ray, "nodes", lambda: gcs_back.wait() and [])

    async def serve_then_stop() -> None:
        query = asyncio.ensure_future(ray_nodes())
        await asyncio.sleep(0.05)  # it is blocked in ray.nodes now
        query.cancel()

    # asyncio.run joins its default executor's threads on the way out: a query run
    # there (asyncio.to_thread) would block this until the GCS came back, i.e. forever.
    done = threading.Event()
    runner = threading.Thread(target=lambda: (asyncio.run(serve_then_stop()), done.set()),
                              daemon=True)
    runner.start()
    try:
        assert done.wait(timeout=30), "the loop did not close while a query was blocked"
    finally:
        gcs_back.set()
