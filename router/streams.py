"""Token streams: one consumer per decode (or colocated) worker.

A worker streams one StepBatch per engine step: every request's new tokens, ends and
migrations, and the worker's stats. The consumer turns them into the requests' Deltas
(router/request_state.py) and ends their attempts; it never places anything itself --
the request's own task does that (router/lifecycle.py). Events of an attempt that is
over (an aborted or migrated one) name an attempt id nobody waits for, and are dropped.

When the stream breaks, the worker is gone: the registry is told, which fails every
attempt waiting on it (they race its ``lost``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable

from messages import TokenEvent
from router.errors import RequestFailedError
from router.request_state import AttemptEnd, Delta, Final, RouterRequest
from router.worker_handle import WorkerHandle
from router.worker_registry import WorkerRegistry

log = logging.getLogger(__name__)
QueueItem = Delta | Final | BaseException


def coalesce(first: Delta, queue: asyncio.Queue[QueueItem]) -> tuple[Delta, QueueItem | None]:
    """``first`` and every Delta queued right behind it, as one Delta (tokens, text and
    logprobs in order), and the item that stopped the merge (a Final or an error; None
    if the queue ran dry). A client that keeps up gets one message per step; one that
    fell behind gets everything it missed in one message instead of one per step, so a
    slow consumer costs fewer writes, not more."""
    nxt: QueueItem | None = None
    merged: Delta | None = None
    while not queue.empty():
        nxt = queue.get_nowait()
        if not isinstance(nxt, Delta):
            break
        if merged is None:
            merged = Delta(list(first.token_ids), first.text, list(first.logprobs))
        merged.token_ids += nxt.token_ids
        merged.text += nxt.text
        merged.logprobs += nxt.logprobs
        nxt = None
    return (merged or first), nxt


class StreamConsumer:
    def __init__(self, registry: WorkerRegistry, attempts: dict[str, RouterRequest],
                 on_batch: Callable[[], Awaitable[None]]) -> None:
        self.registry = registry
        self.attempts = attempts
        self.on_batch = on_batch  # placement's room_changed: freed blocks wake waiters

    def watch(self, h: WorkerHandle) -> None:
        if h.role in ("decode", "colocated"):
            h.stream_task = asyncio.get_running_loop().create_task(self._consume(h))

    async def _consume(self, h: WorkerHandle) -> None:
        try:
            async for batch in h.step_batches():
                stats = batch.stats
                if stats.pool is None and h.stats is not None:  # read once a second
                    stats = dataclasses.replace(stats, pool=h.stats.pool)
                h.stats = stats
                h.heard()
                h.fresh_blocks = 0
                for ev in batch.events:
                    self._on_event(h, ev)
                await self.on_batch()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if h.alive:
                log.warning("worker %s stream ended: %s", h.worker_id, e)
        self.registry.lose(h, "its token stream broke")

    def _on_event(self, h: WorkerHandle, ev: TokenEvent) -> None:
        rr = self.attempts.get(ev.request_id)
        if rr is None or rr.done or rr.worker != h.worker_id:
            return  # an attempt that is over: stale
        if h.role == "colocated" and not rr.generated and not rr.events.migrations:
            rr.cached_tokens = ev.num_cached_tokens
        if ev.token_ids and rr.add_tokens(ev.token_ids, ev.logprobs):
            rr.finish("stop")
            rr.end_attempt(AttemptEnd.STOPPED_HERE)
            return
        if ev.finish_reason is None:
            return
        if ev.finish_reason == "migrated":
            rr.end_attempt(AttemptEnd.MIGRATED)
            return
        if ev.finish_reason == "error":
            rr.fail(RequestFailedError(ev.error or f"request {rr.request_id} failed on "
                                       f"{h.worker_id}"))
        else:
            rr.finish(ev.finish_reason)
        rr.end_attempt(AttemptEnd.FINISHED)
