"""Which workers exist, which are alive, and replacing the ones that die.

Creating one actor is router/worker_spawn.py's.

Failure detector: each worker gets one *lifeline* call when it starts, which the worker
never answers. Ray fails it when the actor's process dies or its node is lost, so a
death is seen within Ray's own detection time and a busy worker -- however deep its
queue -- is never mistaken for a dead one. A death marks the handle lost (every request
waiting on it is placed again, see router/lifecycle.py) and starts a replacement.

Node loss: a node's death fails the lifelines (and breaks the token channels) of every
worker on it; each is counted (``lost``, by role and reason: ``node_lost`` if Ray
declares its node dead within LOSS_VERDICT_S, else ``actor_died``) and replaced. A
replacement asks for the same resources (custom ones included), so Ray puts it on
another node that offers them -- or keeps it pending until one joins. While a spawn
is pending the registry checks every CAPACITY_POLL_S whether any alive node could host
it at all (router/node_resources.py); if none can, the role
is *unplaceable*: new requests needing it fail at once with NoWorkersError
(UNAVAILABLE) and the reason, rather than wait for a worker that cannot start, until a
node joins. Requests already under way that are being placed again (their worker was on
the lost node) keep waiting, within their deadline and worker_wait_s: a node that
comes back in that time (a replaced spot instance) loses none of them.

KV layout: each prefill and decode worker reports its KV spec as it comes up, and one
that differs from the deployment's (router/kv_spec_gate.py) is refused. At startup the
start fails, naming both workers and specs (`pdserve serve` exits). A replacement that
differs is killed before it takes any request and counted lost
(``kv_spec_mismatch``); while its role has no live worker, new requests fail at once
with that reason, as for an unplaceable role, until a later try (the usual backoff and
retries) comes up matching.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import ray

from router.config import RouterConfig
from router.errors import DeadlineExceeded, KVSpecMismatch, NoWorkersError
from router.gpu_pairs import GpuPairs, wants_pairs
from router.kv_spec_gate import KVSpecGate
from router.node_resources import demand, unplaceable_reason
from router.worker_handle import WORKER_GONE, WorkerHandle, one_line
from router.worker_spawn import create_worker, worker_options

log = logging.getLogger(__name__)
REPLACE_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # between failed replacement attempts
START_ATTEMPTS = 3  # per worker of the first set whose process dies while it loads
CAPACITY_POLL_S = 0.5  # while a spawn is pending: can any alive node host it?
LOSS_VERDICT_S = 30.0  # a lost worker's node may be declared dead this long after


class WorkerRegistry:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.kv_transfer = config.resolved_kv_transfer()
        self.workers: dict[str, WorkerHandle] = {}
        self.on_started: list[Callable[[WorkerHandle], None]] = []
        self._ids = itertools.count()
        self._starting: dict[str, int] = {}  # spawns under way, by role
        self._replacing: dict[str, int] = {}  # replacements under way (retries included)
        # role -> why no alive node can host its pending spawn (cleared once one can)
        self.unplaceable: dict[str, str] = {}
        # role -> why its last replacement was refused (its KV spec differed); cleared
        # when a worker of the role is admitted. New requests fail with it, as above.
        self.refused: dict[str, str] = {}
        self.kv_specs = KVSpecGate()  # the KV layout every prefill/decode worker shares
        self.lost: Counter[tuple[str, str]] = Counter()  # (role, reason) -> workers lost
        # cuda-ipc with GPU fractions: prefill/decode pairs in one bundle each, so they
        # share a GPU; a replacement takes the bundle its predecessor gave back.
        self.pairs = GpuPairs(config) if wants_pairs(config, self.kv_transfer) else None
        self._bundle: dict[str, int | None] = {}  # worker id -> its bundle in pairs
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        # Set when the service begins to shut down: a worker lost from then on is not
        # replaced. Creating an actor waits on Ray's GCS, which a signal to the whole
        # process group (systemd's stop, Ctrl-C) has already ended: the creation would
        # block the event loop until Ray gives up on the GCS and ends the process.
        self.replacing_stopped = False
        self._owns_ray = False

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        if not ray.is_initialized():  # tests and embedders; `pdserve serve` starts Ray itself
            ray.init(address=self.config.ray_address, include_dashboard=False,
                     log_to_driver=True, ignore_reinit_error=True)
            self._owns_ray = True
        if self.pairs is not None:
            await self.pairs.create()
        roles = [r for r in self.config.roles for _ in range(self.config.num_workers(r))]
        spawns = [asyncio.ensure_future(self._spawn_at_start(r)) for r in roles]
        try:
            await asyncio.gather(*spawns)
        except BaseException:
            # One failed (a KV spec mismatch, say): the start is over, so the workers
            # still loading are stopped rather than left to join a deployment that exits.
            for t in spawns:
                t.cancel()
            await asyncio.gather(*spawns, return_exceptions=True)
            raise

    async def _spawn_at_start(self, role: str) -> WorkerHandle:
        """A worker of the first set; one whose process died while it loaded (Ray's
        memory monitor, say, when deployments start at once and each sizes its pool
        from the memory then free) is started again, START_ATTEMPTS in all. One whose
        constructor raised is not: that would only fail again."""
        for backoff in REPLACE_BACKOFF_S[:START_ATTEMPTS - 1]:
            try:
                return await self.spawn(role)
            except WORKER_GONE as e:
                if getattr(e, "actor_init_failed", False):
                    raise
                log.warning("a %s worker died while starting (%s); starting another",
                            role, one_line(e))
                await asyncio.sleep(backoff)
        return await self.spawn(role)  # the last attempt: its error is the start's

    async def shutdown(self) -> None:
        self._closing = True
        for t in list(self._tasks):
            t.cancel()
        for h in list(self.workers.values()):
            if h.stream_task is not None:
                h.stream_task.cancel()
            self._kill(h)
        self.workers.clear()
        if self.pairs is not None:
            self.pairs.remove()
        if self._owns_ray:
            ray.shutdown()

    async def spawn(self, role: str) -> WorkerHandle:
        """Create one worker actor and wait until it has loaded its model."""
        self._starting[role] = self._starting.get(role, 0) + 1
        capacity = asyncio.get_running_loop().create_task(self._watch_capacity(role))
        bundle, placement = self.pairs.take(role) if self.pairs else (None, {})
        try:
            h = await create_worker(self.config, f"{role}-{next(self._ids)}", role,
                                    self.kv_transfer, placement)
        except BaseException:
            self._give_back(role, bundle)
            raise
        finally:
            capacity.cancel()
            self._starting[role] -= 1
            if not self._starting[role]:
                self.unplaceable.pop(role, None)
            await self._notify()
        try:
            self.kv_specs.admit(h, self.workers.values())
        except KVSpecMismatch:
            self._kill(h)
            self._give_back(role, bundle)
            self.lost[(role, "kv_spec_mismatch")] += 1
            raise
        self.refused.pop(h.role, None)
        self.workers[h.worker_id] = h
        self._bundle[h.worker_id] = bundle
        h.on_lost = lambda: self.lose(h, "a call found it dead")
        self._spawn_task(self._watch_lifeline(h))
        for cb in self.on_started:
            cb(h)
        await self._notify()
        return h

    # -- liveness ------------------------------------------------------------------------
    async def _watch_lifeline(self, h: WorkerHandle) -> None:
        lifeline = asyncio.ensure_future(h.actor.lifeline.remote())
        try:
            await asyncio.wait([lifeline, h.lost], return_when=asyncio.FIRST_COMPLETED)
        finally:
            lifeline.cancel()
        self.lose(h, "its lifeline call failed")

    def lose(self, h: WorkerHandle, why: str) -> None:
        """The worker is gone: forget it, tell the waiters, start a replacement."""
        if self.workers.get(h.worker_id) is not h:
            return
        del self.workers[h.worker_id]
        h.mark_lost()
        if h.stream_task is not None and h.stream_task is not asyncio.current_task():
            # Its token channel is a TCP connection: a node that vanished sends no FIN.
            h.stream_task.cancel()
        self._kill(h)  # it may be half alive (unreachable node): make sure
        self._give_back(h.role, self._bundle.pop(h.worker_id, None))
        if self._closing:
            return
        node = f" on node {h.node.node_id[:12]} ({h.node.node_address})" if h.node else ""
        then = "not replaced: shutting down" if self.replacing_stopped else (
            "starting a replacement")
        log.warning("worker %s%s lost (%s); %s", h.worker_id, node, why, then)
        self.start_replacement(h.role)
        if not self.replacing_stopped:  # (its GCS query would only wait on a dead GCS)
            self._spawn_task(self._count_loss(h))
        self._spawn_task(self._notify())

    async def _count_loss(self, h: WorkerHandle) -> None:
        """Count the loss as ``node_lost`` when the worker's Ray node is gone, else
        ``actor_died``. A dead node's workers are often seen gone (their token channel
        breaks) before Ray has marked the node dead (its health checks take seconds), so
        the node gets LOSS_VERDICT_S to be declared dead before the loss counts as the
        actor's alone."""
        reason = "actor_died"
        if h.node is not None:
            with contextlib.suppress(Exception):  # the GCS unreachable: keep the default
                until = asyncio.get_running_loop().time() + LOSS_VERDICT_S
                while True:
                    nodes = await ray_nodes()
                    if h.node.node_id not in {n["NodeID"] for n in nodes if n.get("Alive")}:
                        reason = "node_lost"
                        break
                    if asyncio.get_running_loop().time() >= until:
                        break
                    await asyncio.sleep(CAPACITY_POLL_S)
        self.lost[(h.role, reason)] += 1

    async def _watch_capacity(self, role: str) -> None:
        """While a spawn of ``role`` is pending: keep ``unplaceable[role]`` saying why no
        alive node can host it (or absent if one can), and wake the waiters on change."""
        need = demand(worker_options(self.config, role))
        while True:
            await asyncio.sleep(CAPACITY_POLL_S)
            try:
                nodes = await ray_nodes()
            except Exception:  # the GCS unreachable for a moment: judge next time
                log.debug("ray.nodes() failed", exc_info=True)
                continue
            reason = unplaceable_reason(role, need, nodes)
            if reason == self.unplaceable.get(role):
                continue
            if reason is None:
                self.unplaceable.pop(role, None)
                log.info("a node can host a %s worker again", role)
            else:
                self.unplaceable[role] = reason
                log.warning("%s", reason)
            await self._notify()

    def start_replacement(self, role: str) -> None:
        """Start a worker of ``role`` in the background. It counts as starting from now
        (through its retries too), so requests wait for it rather than fail. Nothing
        once the service shuts down (``replacing_stopped``)."""
        if self.replacing_stopped:
            return
        self._replacing[role] = self._replacing.get(role, 0) + 1
        self._spawn_task(self._replace(role))

    async def _replace(self, role: str) -> None:
        try:
            for delay in (*REPLACE_BACKOFF_S, None):
                try:
                    await self.spawn(role)
                    return
                except asyncio.CancelledError:
                    raise
                except KVSpecMismatch as e:
                    log.error("replacement refused: %s", e)
                    self.refused[role] = str(e)
                    await self._notify()  # waiting new requests fail now, with the reason
                except Exception:
                    log.exception("could not start a replacement %s worker", role)
                if delay is None:
                    break
                await asyncio.sleep(delay)
            log.error("gave up replacing a %s worker", role)
        finally:
            self._replacing[role] -= 1
            await self._notify()

    def retire(self, h: WorkerHandle) -> None:
        """Take a drained worker away for good (its replacement was started first)."""
        if self.workers.pop(h.worker_id, None) is not None:
            self._give_back(h.role, self._bundle.pop(h.worker_id, None))
        h.mark_lost()
        self._kill(h)

    # -- views and waits -----------------------------------------------------------------
    def live(self, role: str) -> list[WorkerHandle]:
        """Workers of the role that take new requests."""
        return [h for h in self.workers.values() if h.role == role and h.accepting]

    def starting(self, role: str) -> int:
        """Workers of the role on their way (spawning, or replacements between tries)."""
        return self._starting.get(role, 0) + self._replacing.get(role, 0)

    async def wait_live(self, role: str, deadline: float, fail_fast: bool = True
                        ) -> list[WorkerHandle]:
        """Live workers of the role; if there are none but one is starting (a
        replacement), wait for it until ``deadline`` (loop time) or worker_wait_s.
        ``fail_fast``: if no alive node can host the one starting (or the last one was
        refused for its KV spec), raise at once (new requests); otherwise wait for a
        node to join (requests placed again)."""
        loop = asyncio.get_running_loop()
        until = min(deadline, loop.time() + self.config.worker_wait_s)
        async with self._changed:
            while True:
                live = self.live(role)
                if live:
                    return live
                why = self.why_not_placeable(role)
                if fail_fast and why:  # only a new node (or a matching worker) would help
                    raise NoWorkersError(f"no {role} worker is alive: {why}")
                left = until - loop.time()
                if self._closing or not self.starting(role) or left <= 0:
                    if left <= 0 and until == deadline:  # the request's own bound ran out
                        raise DeadlineExceeded(
                            f"reached its deadline while it waited for a {role} worker: "
                            + (why or "none is alive yet"))
                    if self.replacing_stopped:
                        why = "the server is shutting down (lost workers are not replaced)"
                    raise NoWorkersError(f"no {role} worker is alive"
                                         + (f": {why}" if why else ""))
                await self._changed_within(left)

    async def wait_for_another(self, role: str, h: WorkerHandle, timeout_s: float) -> bool:
        """Whether a worker of ``role`` other than ``h`` takes requests within
        ``timeout_s`` (a replacement coming up); False as soon as none is on its way."""
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout_s
        async with self._changed:
            while True:
                if any(w is not h for w in self.live(role)):
                    return True
                left = until - loop.time()
                if left <= 0 or self._closing or not self.starting(role):
                    return False
                await self._changed_within(left)

    def why_not_placeable(self, role: str) -> str | None:
        """Why a worker of ``role`` cannot come up as things stand (no alive node can
        host it, or its last replacement was refused), else None."""
        return self.unplaceable.get(role) or self.refused.get(role)

    async def _changed_within(self, timeout_s: float) -> None:
        """Wait (holding ``_changed``) until the workers change or ``timeout_s`` passes."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout=timeout_s)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- helpers -------------------------------------------------------------------------
    def _spawn_task(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _give_back(self, role: str, bundle: int | None) -> None:
        if self.pairs is not None:
            self.pairs.give_back(role, bundle)

    @staticmethod
    def _kill(h: WorkerHandle) -> None:
        h.alive = False
        try:
            ray.kill(h.actor, no_restart=True)
        except Exception:  # already gone
            log.debug("kill %s: already gone", h.worker_id)


async def ray_nodes() -> list[dict[str, Any]]:
    """``ray.nodes()`` off the event loop, on a daemon thread of its own: with the GCS
    gone (a SIGTERM to the whole process group ends it first) the query blocks until
    Ray ends the process, and a thread of the loop's default executor would hold up
    the process's exit until then, where a daemon thread is simply left behind."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[list[dict[str, Any]]] = loop.create_future()

    def query() -> None:
        nodes, error = None, None
        try:
            nodes = ray.nodes()
        except Exception as e:  # delivered to the awaiting task
            error = e
        with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
            loop.call_soon_threadsafe(_settle, fut, nodes, error)

    threading.Thread(target=query, name="ray-nodes", daemon=True).start()
    return await fut


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():  # the awaiting task was cancelled meanwhile
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
