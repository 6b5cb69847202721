"""Placement: which workers a request runs on (the policies are in router/routing.py).

- Decode: KV blocks reserved on the live decode worker with the lowest estimated KV
  usage that has room. With no room anywhere the request waits for room (streams
  report freed blocks), at most ``max_queue`` requests at once and never past its
  deadline.
- Prefill: prefix-cache affinity, then queued tokens.
- Colocated: the worker with the lowest estimated KV usage.

Every call that may leave state on a worker records that worker in ``touched`` *before*
it is sent: if the request is cancelled while the call is in flight, the lifecycle
still knows whom to tell (see router/lifecycle.py).

A request's first attempt fails fast when no alive node can host a role it needs;
a request placed again waits for one (``wait_live``'s fail_fast, worker_registry.py).

Workers gone silent (router/worker_handle.py: alive, maybe frozen) get no new request
while another worker of the role is heard from: a call to a frozen worker would hold
the request until its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from router.config import RouterConfig
from router.errors import DeadlineExceeded, QueueFullError, WorkerLost
from router.request_state import RouterRequest
from router.routing import block_hashes, pick_prefill
from router.worker_handle import SILENT_AFTER_S, WorkerHandle
from router.worker_registry import WorkerRegistry

log = logging.getLogger(__name__)

ROOM_POLL_S = 1.0  # re-check for room this often even without a stream's notice


class Placement:
    def __init__(self, config: RouterConfig, registry: WorkerRegistry, block_size: int
                 ) -> None:
        self.config = config
        self.registry = registry
        self.block_size = block_size
        self.waiting = 0  # requests waiting for KV room (what max_queue bounds)
        self._room = asyncio.Condition()
        # Counts room_changed calls. A request notes it before it asks the workers for
        # room and waits only if it has not moved since: a step batch that freed blocks
        # while the request was still awaiting a worker's "no room" answer would
        # otherwise notify nobody, and the request would sleep until the next poll.
        self._room_version = 0
        self._silent_warned: set[str] = set()  # silent workers already logged

    async def room_changed(self) -> None:
        """A worker reported its pool (or a worker started): waiters look again."""
        self._room_version += 1
        async with self._room:
            self._room.notify_all()

    async def reserve(self, rr: RouterRequest, tokens: list[int], params: SamplingParams,
                      touched: set[WorkerHandle]) -> tuple[WorkerHandle, list[int]]:
        """Blocks for ``tokens`` on a decode worker; waits (bounded) while none has room."""
        waiting = False
        est = -(-len(tokens) // self.block_size)
        try:
            while True:
                seen = self._room_version
                live = self._heard(await self.registry.wait_live(
                    "decode", rr.deadline, rr.placements <= 1))
                live.sort(key=lambda h: (h.est_usage(), len(h.requests)))
                # A worker whose pool could never hold the request refuses it for good;
                # pools differ (sized from the memory free when each worker started),
                # so that is the request's fault only when every live worker refuses.
                refused: list[InvalidRequestError] = []
                for d in live:
                    d.fresh_blocks += est  # before awaiting, so concurrent picks spread out
                    touched.add(d)
                    try:
                        blocks = await d.reserve(rr.attempt_id, tokens, params, rr.age_s())
                    except WorkerLost:
                        continue
                    except InvalidRequestError as e:
                        refused.append(e)
                        touched.discard(d)
                        continue
                    finally:
                        d.fresh_blocks -= est
                    if blocks is not None:
                        d.fresh_blocks += est  # until its next stats report counts them
                        return d, blocks
                    touched.discard(d)
                if live and len(refused) == len(live):
                    raise refused[0]
                if not waiting:
                    if self.waiting >= self.config.max_queue:
                        raise QueueFullError(
                            f"{self.waiting} requests already wait for KV room "
                            f"(max_queue={self.config.max_queue})")
                    waiting = True
                    self.waiting += 1
                await self._wait_for_room(rr, seen)
        finally:
            if waiting:
                self.waiting -= 1

    async def _wait_for_room(self, rr: RouterRequest, seen: int) -> None:
        left = rr.remaining_s()
        if left <= 0:
            raise DeadlineExceeded(f"request {rr.request_id} waited for KV room until its "
                                   "deadline")
        async with self._room:
            if self._room_version != seen:  # room changed while we asked: ask again
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), timeout=min(ROOM_POLL_S, left))

    async def prefill_worker(self, rr: RouterRequest, tokens: list[int]
                             ) -> tuple[WorkerHandle, list[int]]:
        """The prefill worker for ``tokens`` and the prompt's block hashes."""
        live = self._heard(await self.registry.wait_live(
            "prefill", rr.deadline, rr.placements <= 1))
        hashes = block_hashes(tokens, self.block_size)
        load = pick_prefill([h.load for h in live if h.load is not None], hashes,
                            self.block_size)
        return self.registry.workers[load.worker_id], hashes

    async def colocated_worker(self, rr: RouterRequest) -> WorkerHandle:
        live = self._heard(await self.registry.wait_live(
            "colocated", rr.deadline, rr.placements <= 1))
        return min(live, key=lambda h: (h.est_usage(), len(h.requests)))

    def _heard(self, live: list[WorkerHandle]) -> list[WorkerHandle]:
        """The workers heard from lately, or all of them if none is (then a silent one
        is as good a bet as any, and the request's deadline still bounds it)."""
        heard = []
        for h in live:
            silent = h.silent()
            if not silent:
                heard.append(h)
                self._silent_warned.discard(h.worker_id)
            elif h.worker_id not in self._silent_warned:
                self._silent_warned.add(h.worker_id)
                log.warning("worker %s not heard from for over %.0f s (frozen?): new "
                            "requests go to others of its role while any is heard from",
                            h.worker_id, SILENT_AFTER_S)
        return heard or live
