"""Ending the pair groups of workers that died (the sweeps of kvtransfer/collective.py
and of kvtransfer/nccl.py, whose communicators leak alike).

Nothing else would end them: worker ids are never reused (a replacement is a new peer,
so its join does not replace its predecessor's group), and the router sends no request
to a dead worker, so no failing transfer ends its group either. Without a sweep a
surviving worker keeps, per dead peer and for good, the pair's process group (gloo: its
threads and sockets; NCCL: a communicator), a sender's store connection and the peer's
actor handle.

Who is dead is Ray's word: each pair keeps the other side's actor handle, and a probe of
it (``__ray_ready__``, which every actor has) that fails with ActorDiedError means the
actor is gone for good (workers are never restarted). An answer, or none within
PROBE_TIMEOUT_S (a lost node Ray has not declared dead yet), keeps the group for a later
sweep: only a sure death releases one, so a live pair is never ended here.

When (``SweepSchedule``): after a join -- a new peer is most often a dead one's
replacement -- and otherwise at most every SWEEP_INTERVAL_S while transfers go on (a
drained worker dies after its replacement joined). A sweep is a task on the worker's
event loop: its probes are awaited, never waited for on the engine thread; one at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

import ray

log = logging.getLogger(__name__)


class _HasActor(Protocol):
    actor: Any


P = TypeVar("P", bound=_HasActor)

SWEEP_INTERVAL_S = 60.0
PROBE_TIMEOUT_S = 10.0


async def peer_alive(peer: Any, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """False only when Ray says the actor ``peer`` died; True when it answers, or when it
    cannot tell within ``timeout_s`` (a later sweep asks again)."""
    try:
        await asyncio.wait_for(peer.__ray_ready__.remote(), timeout_s)
    except ray.exceptions.ActorDiedError:
        return False
    except Exception as e:  # no answer in time, restarting, not an actor: keep
        log.debug("liveness of %r unknown: %s", peer, e)
    return True


async def dead_peers(peers: list[tuple[str, P]],
                     alive: Callable[[Any], Awaitable[bool]] = peer_alive
                     ) -> list[tuple[str, P]]:
    """The (peer id, books entry) pairs whose ``actor`` Ray reports dead (entries of
    kvtransfer.nccl_state.PeerComms): all probed at once, each bounded; a peer with no
    known actor is kept."""
    known = [(peer_id, peer) for peer_id, peer in peers if peer.actor is not None]
    answers = await asyncio.gather(*(alive(peer.actor) for _, peer in known))
    dead = [p for p, ok in zip(known, answers, strict=True) if not ok]
    for peer_id, _ in dead:
        log.info("Ray reports %s dead; ending what this worker holds for it", peer_id)
    return dead


def own_actor() -> Any:
    """This worker's actor handle, sent with a join so the other side's sweeps can probe
    it; None outside an actor (the driver, tests without Ray)."""
    if not ray.is_initialized():
        return None
    try:
        return ray.get_runtime_context().current_actor
    except RuntimeError:  # the driver, not an actor
        return None


class SweepSchedule:
    """When a sweep is due: once ``request``-ed (any thread; a join), else every
    ``interval_s``. ``maybe_start`` starts one on the running loop if due and none runs;
    one requested while another runs starts when that one is over."""

    def __init__(self, interval_s: float = SWEEP_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last = clock()  # the first one waits for a join or an interval
        self._requested = False
        self._task: asyncio.Task[None] | None = None
        self.finished = 0  # sweeps over (tests)

    def request(self) -> None:
        self._requested = True

    def maybe_start(self, sweep: Callable[[], Coroutine[Any, Any, None]]) -> bool:
        """Start ``sweep()`` if one is due and none runs; True if it started. Outside a
        running loop (a receiver's books used directly) nothing starts."""
        if self._task is not None and not self._task.done():
            return False  # a request stays pending until that one is over
        now = self._clock()
        if not self._requested and now - self._last < self.interval_s:
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        self._requested, self._last = False, now
        self._task = loop.create_task(self._run(sweep))
        return True

    async def _run(self, sweep: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            await sweep()
        except Exception:  # a failed sweep leaves the groups as they were; the next retries
            log.exception("sweeping the groups of dead peers failed")
        finally:
            self.finished += 1
            if self._requested:  # a join during this sweep: this task is not done yet
                asyncio.get_running_loop().call_soon(self.maybe_start, sweep)
