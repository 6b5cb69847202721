"""The router's handle on one worker actor: what it knows of the worker, and the typed
calls it makes to it. The path router -> worker reads here: every remote call the
router makes goes through one of these methods.

Liveness comes from Ray itself, never from timing: ``lost`` resolves when the worker's
lifeline call fails (the actor died, or its node did) or a call to it reported the actor
dead. A busy worker answers late; it is never declared dead for that. Every call races
``lost``, so no request waits on a dead worker.

A worker that is alive but has gone *silent* -- no token batch, heartbeat or stats
answer for SILENT_AFTER_S, as a frozen process (SIGSTOP, a hung driver) or a stalled
node behaves -- is not declared dead either, but placement passes it over for new
requests while any other worker of its role is heard from (router/placement.py): a
busy worker still heartbeats each second from its actor's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams, SamplingParamsError
from messages import Endpoint, KVSpec, PrefillResult, PrefillTask, StepBatch, WorkerStats
from router.errors import TransferFailed, WorkerLost
from router.routing import PrefillLoad
from runtime.actors import NodeInfo
from runtime.token_channel import read_channel

T = TypeVar("T")

# The errors of a call whose worker process is gone: the actor died or is unreachable,
# or Ray's memory monitor killed it (OutOfMemoryError is not a RayActorError). Its
# requests are placed again, as after any worker death.
WORKER_GONE = (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError,
               ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)

SILENT_AFTER_S = 10.0  # ten missed heartbeats (runtime/streaming_worker.py HEARTBEAT_S)


@dataclass(eq=False)
class WorkerHandle:
    worker_id: str
    role: str  # prefill | decode | colocated
    actor: Any  # ray ActorHandle of runtime.actors' class for the role
    endpoint: Endpoint | None = None  # decode: where prefill workers send KV
    node: NodeInfo | None = None  # the Ray node it runs on (known once it has started)
    stats: WorkerStats | None = None
    # How its KV cache stores blocks, as the worker resolved it on its device (asked once
    # at start; router/kv_spec_gate.py refuses a prefill or decode worker that differs).
    kv_spec: KVSpec | None = None
    alive: bool = True
    draining: bool = False  # out of rotation (pdserve drain): takes no new requests
    load: PrefillLoad | None = None  # prefill workers: affinity and queued tokens
    # Requests placed here whose tokens this worker streams (decode/colocated) or whose
    # prefill it runs (prefill): for drains and the in-flight bound.
    requests: set[str] = field(default_factory=set)
    # Blocks reserved since the last stats report: a burst of requests must not all pick
    # the worker whose (stale) stats looked emptiest.
    fresh_blocks: int = 0
    lost: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    stream_task: asyncio.Task[None] | None = None
    # The registry's reaction to a death, run the moment anyone sees it (so a request
    # that saw it first finds the replacement already counted as starting).
    on_lost: Callable[[], None] | None = None
    # When the router last heard from it (time.monotonic): a token batch or heartbeat
    # (decode, colocated), a stats answer (prefill), its start.
    heard_at: float = field(default_factory=time.monotonic)

    @property
    def accepting(self) -> bool:
        return self.alive and not self.draining

    def heard(self) -> None:
        self.heard_at = time.monotonic()

    def seconds_since_heard(self) -> float:
        return time.monotonic() - self.heard_at

    def silent(self) -> bool:
        """Alive, maybe, but not heard from for SILENT_AFTER_S: no new work while others
        answer."""
        return self.seconds_since_heard() > SILENT_AFTER_S

    def est_usage(self) -> float:
        """Estimated KV usage including reservations the stats do not show yet."""
        if self.stats is None:
            return 0.0
        return self.stats.kv_usage + self.fresh_blocks / max(self.stats.num_usable_blocks, 1)

    def mark_lost(self) -> None:
        if self.lost.done():
            return
        self.alive = False
        self.lost.set_result(None)
        if self.on_lost is not None:
            self.on_lost()

    # -- calls -------------------------------------------------------------------------
    async def call(self, ref: Awaitable[T], *others: WorkerHandle) -> T:
        """Await a remote call to this worker; WorkerLost if this worker (or one of
        ``others`` the caller also depends on) dies first. Errors raised inside the
        worker come back as ray.exceptions.RayTaskError."""
        fut = asyncio.ensure_future(ref)
        watched = [self, *others]
        try:
            await asyncio.wait([fut, *(h.lost for h in watched)],
                               return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        for h in watched:
            if h.lost.done():
                fut.cancel()
                raise WorkerLost(h.worker_id)
        try:
            return fut.result()
        except WORKER_GONE:
            self.mark_lost()  # the registry kills what may be left of it, and replaces it
            raise WorkerLost(self.worker_id) from None
        except ray.exceptions.RayTaskError as e:
            # The request's own fault, found by the worker (say, a prompt that needs
            # more KV blocks than its pool has): the client's error, not ours.
            if isinstance(e.cause, (InvalidRequestError, SamplingParamsError)):
                raise e.cause from None
            raise

    async def reserve(self, request_id: str, tokens: list[int], params: SamplingParams,
                      age_s: float = 0.0) -> list[int] | None:
        return await self.call(self.actor.reserve.remote(request_id, tokens, params, age_s))

    async def prefill(self, task: PrefillTask, decode: WorkerHandle) -> PrefillResult:
        """The prefill and the KV send to ``decode``, which must stay alive for it."""
        return await self.call(self.actor.prefill.remote(task), decode)

    async def start(self, request_id: str, res: PrefillResult, cached_tokens: int) -> None:
        try:
            await self.call(self.actor.start.remote(request_id, res.first_token, res.handle,
                                                    res.logprobs, cached_tokens))
        except ray.exceptions.RayTaskError as e:
            raise TransferFailed(f"KV import failed on {self.worker_id}: {cause(e)}") from None

    async def generate(self, request_id: str, tokens: list[int], params: SamplingParams,
                       age_s: float = 0.0) -> None:
        await self.call(self.actor.generate.remote(request_id, tokens, params, age_s))

    async def abort(self, request_id: str) -> None:
        """Drop the request on this worker, whatever it holds of it. Fire and forget in
        spirit: a dead worker holds nothing, and the worker remembers the id so a call
        still on its way for it is refused."""
        if not self.alive:
            return
        with contextlib.suppress(WorkerLost, ray.exceptions.RayError):
            await self.call(self.actor.abort.remote(request_id))

    async def step_batches(self) -> AsyncIterator[StepBatch]:
        """The worker's step batches, one per engine step (or heartbeat), read from its
        token channel (runtime/token_channel.py); TokenChannelError when it breaks."""
        address = await self.call(self.actor.stream_channel.remote())
        async with contextlib.aclosing(read_channel(address)) as batches:
            async for batch in batches:
                yield batch

    async def ping(self) -> None:
        """Answered on the worker's event loop, not between engine steps: the process
        is not frozen, however long its current step."""
        await self.call(self.actor.ping.remote())

    async def fetch_stats(self) -> WorkerStats:
        return await self.call(self.actor.stats.remote())

    async def pool_state(self) -> dict[str, int]:
        return await self.call(self.actor.pool_state.remote())


def cause(e: ray.exceptions.RayTaskError) -> str:
    """The worker-side exception of a failed call, as one line."""
    c = getattr(e, "cause", None)
    return one_line(c) if c is not None else str(e).splitlines()[0]


def one_line(e: BaseException) -> str:
    """An exception as one line for a client: Ray's errors go on with node addresses,
    pids and other processes' command lines, which belong in the log only."""
    first = next(iter(str(e).splitlines()), "")
    return f"{type(e).__name__}: {first}"

