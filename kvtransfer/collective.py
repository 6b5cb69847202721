"""``collective``: torch.distributed point-to-point send/recv, gloo on CPU, NCCL on GPU.

One code path for both: a 2-rank process group per (prefill, decode) pair
(kvtransfer/collective_group.py), created on first use, reused for every later transfer
of the pair, rebuilt after a failure. CI runs it with gloo across Ray actors and across
the nodes of a simulated cluster; with CUDA caches the same calls go through NCCL.

Set-up (sender's ``prepare``, off the engine thread, bounded by the transfer timeout):
the prefill worker (rank 0) tells the decode worker (rank 1), through its KVPeer actor
handle carried in the Endpoint (kvtransfer/peer.py), to join the group under a fresh
key prefix of its store; both join; a dead decode actor fails that call at once.

Per transfer (push model, as the cupy nccl backend: both ranks issue their operations
in one order, which NCCL needs)::

    prefill (own thread on CPU)              decode (actor event loop)
    gather blocks -> one staging buffer
    CollectiveRecv(id, n) to the peer --->   allocate n blocks, post the recv, remember
                                             it under id (before any await)
    send staging; wait for it (bounded)
    (its blocks may be freed now)
                                             fetch(): wait for the recv (bounded, on a
                                             thread), hand the buffer to the worker

Failures: a send or receive that fails or times out ends the pair's group on that side
(the other side's next operation fails too) and the next transfer builds a new one; a
peer whose process died fails the next transfer at once (its actor call, or gloo's
"connection closed"), never after a hang. A posted receive whose request was aborted is
still waited for (drained) so its buffer is never freed under a running receive.

Dead peers: the router sends no more transfers to a dead worker, and its replacement
has a new id, so neither path above ends a dead peer's group. Each side keeps the other
side's actor handle with the pair (the sender its Endpoint's, the receiver the one
CollectiveConnect carries) and sweeps (kvtransfer/peer_sweep.py): after a join, and at
most every SWEEP_INTERVAL_S while transfers go on, it asks Ray about every peer it holds
a group with, on its event loop, and ends the groups of those Ray reports dead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
import torch

from kvtransfer.addresses import CollectiveAddress
from kvtransfer.base import (
    Endpoint,
    KVReceiver,
    KVSender,
    KVSpec,
    KVTransferError,
    KVTransferTimeout,
    TransferHandle,
    check_counts,
    check_spec,
    sent_handle,
    torch_dtype,
)
from kvtransfer.block_copy import gather_request
from kvtransfer.collective_group import (
    PairGroup,
    connect,
    forget_keys,
    listen,
    new_group,
    node_host,
    wait_work,
)
from kvtransfer.join_once import join_once
from kvtransfer.nccl_state import Peer, PeerComms, call_with_timeout
from kvtransfer.peer import PeerMessage, to_peer
from kvtransfer.peer_sweep import (
    PROBE_TIMEOUT_S,
    SweepSchedule,
    dead_peers,
    own_actor,
    peer_alive,
)

DEFAULT_TIMEOUT_S = 30.0


# -- the actor-call touch points (unit tests use an event-loop thread as the peer) ----------
def _to_peer(peer: Any, message: PeerMessage) -> Any:
    return to_peer(peer, message)


def _wait_peer(ref: Any, timeout_s: float) -> Any:
    return ray.get(ref, timeout=timeout_s)


async def _peer_alive(peer: Any) -> bool:
    return await peer_alive(peer, PROBE_TIMEOUT_S)


@dataclass(frozen=True)
class CollectiveConnect(PeerMessage):
    """Join ``peer_id``'s group as rank 1, under ``prefix`` of this worker's store;
    ``actor`` is the sender's (None: unknown), whose death ends the group."""

    peer_id: str
    prefix: str
    actor: Any = None


@dataclass(frozen=True)
class CollectiveRecv(PeerMessage):
    """Post the receive of ``num_blocks`` blocks ``peer_id`` is about to send."""

    request_id: str
    peer_id: str
    num_blocks: int


@dataclass
class _Posted:
    request_id: str
    peer_id: str
    buffer: torch.Tensor
    work: Any
    posted_at: float


def _close(pair: PairGroup) -> None:
    pair.close()


class CollectiveReceiver(KVReceiver):
    """Decode side. Every method runs on the actor's event loop thread (blocking joins
    and waits on threads of their own), so its books need no lock."""

    backend = "collective"

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self.pairs: PeerComms[PairGroup] = PeerComms(_close)
        self.posted: dict[str, _Posted] = {}
        # Waits block a thread each (gloo offers no completion poll): a pool of their
        # own, so many transfers in flight never starve the loop's default executor.
        self._waiters = concurrent.futures.ThreadPoolExecutor(
            max_workers=32, thread_name_prefix="pdserve-kv-recv")
        self._drains: set[asyncio.Future[None]] = set()
        self._device: torch.device | None = None
        self._spec: KVSpec | None = None
        self._host = ""
        self._store: Any = None
        self.sweeps = SweepSchedule()

    def listen(self, device: torch.device, spec: KVSpec, host: str | None = None
               ) -> tuple[str, int]:
        """Start this worker's store server; (host, port) senders rendezvous at."""
        self._device, self._spec = device, spec
        self._host = host or node_host()
        self._store = listen(self._host, self.timeout_s)
        return self._host, int(self._store.port)

    def endpoint(self, cache: torch.Tensor, worker_id: str, spec: KVSpec) -> Endpoint:
        host, port = self.listen(cache.device, spec)
        # Senders reach us through the actor we run in; it must implement KVPeer.
        actor = ray.get_runtime_context().current_actor
        return Endpoint(self.backend, worker_id, spec, CollectiveAddress(actor, host, port))

    async def on_peer_message(self, message: PeerMessage) -> None:
        if isinstance(message, CollectiveRecv):  # before any await: call order is post order
            self.post_recv(message.request_id, message.peer_id, message.num_blocks)
        elif isinstance(message, CollectiveConnect):
            await self.join(message.peer_id, message.prefix, message.actor)
        else:
            await super().on_peer_message(message)

    async def join(self, peer_id: str, prefix: str, actor: Any = None) -> None:
        """Join the pair's group as rank 1; an older group with this peer is ended (the
        sender started over). ``actor``: the sender's, for the sweeps."""
        device, store, host = self._device, self._store, self._host
        assert device is not None and store is not None, "listen() or endpoint() first"

        def build() -> Any:
            try:
                return new_group(store, prefix, 1, device, host, self.timeout_s)
            finally:
                forget_keys(store, prefix)

        group = await asyncio.to_thread(
            call_with_timeout, build, self.timeout_s, f"collective join with {peer_id}",
            _close_group_late)
        self.pairs.put(peer_id, PairGroup(group, prefix), None, actor)
        self.sweeps.request()  # a new sender is often a dead one's replacement
        self.sweeps.maybe_start(self.sweep_dead)

    def post_recv(self, request_id: str, peer_id: str, num_blocks: int) -> None:
        self.sweep()
        pair = self.pairs.get(peer_id)
        if pair is None:
            raise KVTransferError(f"request {request_id}: no collective group with {peer_id} "
                                  "(never joined, or ended after a failure)")
        if request_id in self.posted:
            raise KVTransferError(f"request {request_id}: a receive is already posted")
        assert self._spec is not None and self._device is not None
        buf = torch.empty((num_blocks, *self._spec.block_shape), dtype=torch_dtype(self._spec),
                          device=self._device)
        work = pair.comm.group.recv([buf], 0, 0)
        self.posted[request_id] = _Posted(request_id, peer_id, buf, work, time.monotonic())
        self.sweeps.maybe_start(self.sweep_dead)

    async def fetch(self, handle: TransferHandle, timeout_s: float) -> torch.Tensor:
        self.timeout_s = timeout_s  # the worker's: joins and drains use it too
        rx = self.posted.pop(handle.request_id, None)
        if rx is None:
            raise KVTransferError(f"request {handle.request_id}: no collective receive is "
                                  "posted (its send never started, or it failed)")
        if rx.buffer.shape[0] != handle.num_blocks:
            self._drain(rx)
            raise KVTransferError(f"request {handle.request_id}: {rx.buffer.shape[0]} blocks "
                                  f"posted, handle says {handle.num_blocks}")
        try:
            await self._wait(rx, timeout_s)
        except KVTransferError:
            self.abort_peer(rx.peer_id)
            raise
        return rx.buffer

    async def _wait(self, rx: _Posted, timeout_s: float) -> None:
        what = f"request {rx.request_id}: receive from {rx.peer_id}"
        fut = asyncio.get_running_loop().run_in_executor(
            self._waiters, wait_work, rx.work, timeout_s, what)
        try:  # wait_work is bounded; this bounds a queue for a waiter thread too
            await asyncio.wait_for(asyncio.shield(fut), timeout_s + 5.0)
        except TimeoutError:
            raise KVTransferTimeout(f"{what} did not complete within {timeout_s}s") from None

    def cancel(self, request_id: str) -> None:
        rx = self.posted.pop(request_id, None)
        if rx is not None:
            self._drain(rx)

    def sweep(self) -> None:
        """Drain receives nobody fetched long after their transfer timeout (their
        request went away without an abort reaching us)."""
        now = time.monotonic()
        for rid, rx in list(self.posted.items()):
            if now - rx.posted_at > 2 * self.timeout_s:
                del self.posted[rid]
                self._drain(rx)

    def _drain(self, rx: _Posted) -> None:
        """Wait for an unwanted receive in the background: its buffer stays referenced
        until it is over, and a failure ends its pair's group."""

        async def drain() -> None:
            try:
                await self._wait(rx, self.timeout_s)
            except KVTransferError:
                self.abort_peer(rx.peer_id)

        task = asyncio.ensure_future(drain())
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    def abort_peer(self, peer_id: str) -> None:
        """End the group with ``peer_id`` if this side still has it; receives already
        posted on it fail or time out on their own and are not forgotten before."""
        self.pairs.abort(peer_id)

    async def sweep_dead(self) -> None:
        """End the groups of senders Ray reports dead (on the loop, as every book here)."""
        for peer_id, peer in await dead_peers(self.pairs.entries(), _peer_alive):
            if self.pairs.release(peer_id, peer.comm):
                peer.comm.close()

    def num_posted(self) -> int:
        """Receives posted and not yet fetched or drained: what a leak would grow."""
        return len(self.posted) + len(self._drains)


def _close_group_late(group: Any) -> None:
    PairGroup(group, "").close()


class CollectiveSender(KVSender):
    """Prefill side. ``prepare`` (a thread) and ``send`` may run at once: the books are
    under a lock, one join per peer is in flight, one transfer per pair at a time."""

    backend = "collective"

    def __init__(self, worker_id: str = "prefill", timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.worker_id = worker_id
        self.timeout_s = timeout_s
        self.pairs: PeerComms[PairGroup] = PeerComms(_close)
        self._lock = threading.Lock()
        self._joining: dict[str, concurrent.futures.Future[PairGroup]] = {}
        self._generations = itertools.count(1)
        self._on_cpu = True
        self.actor = own_actor()  # sent with each join: the receiver's sweeps probe it
        self.sweeps = SweepSchedule()

    @property
    def send_off_engine_thread(self) -> bool:  # type: ignore[override]
        """gloo reads CPU blocks the worker holds: safe beside a step. CUDA sends stay on
        the engine thread (its stream order), as the cupy nccl backend's do."""
        return self._on_cpu

    async def prepare(self, dest: Endpoint, device: torch.device, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._on_cpu = device.type == "cpu"
        await asyncio.to_thread(self.pair, dest, device)
        self.sweeps.maybe_start(self.sweep_dead)  # due after a join, or after an interval

    def pair(self, dest: Endpoint, device: torch.device) -> PairGroup:
        """The group with ``dest``, built on first use (one join per peer at a time)."""
        return join_once(self._lock, self._joining, dest.worker_id,
                         lambda: self._known(dest.worker_id),
                         lambda: self._join(dest, device), self.timeout_s, "collective")

    def _known(self, worker_id: str) -> PairGroup | None:
        peer = self.pairs.get(worker_id)
        return peer.comm if peer is not None else None

    def _join(self, dest: Endpoint, device: torch.device) -> PairGroup:
        addr = dest.address
        if not isinstance(addr, CollectiveAddress):
            raise KVTransferError(f"decode worker {dest.worker_id} offers no collective "
                                  f"endpoint (backend {dest.backend})")
        prefix = f"{self.worker_id}/{next(self._generations)}"
        what = f"collective set-up with {dest.worker_id}"
        timeout = self.timeout_s

        def build() -> PairGroup:
            store = connect(addr.host, addr.port, timeout)
            return PairGroup(new_group(store, prefix, 0, device, node_host(), timeout),
                             prefix, store)

        mine: concurrent.futures.Future[PairGroup] = concurrent.futures.Future()
        threading.Thread(target=_run_into, args=(build, mine), daemon=True,
                         name=f"pdserve-{what}").start()
        try:
            # The decode worker answers once it joined too; a dead one fails at once.
            _wait_peer(_to_peer(addr.peer, CollectiveConnect(self.worker_id, prefix,
                                                             self.actor)), timeout)
            pair = mine.result(timeout=timeout)
        except BaseException as e:
            mine.add_done_callback(lambda f: f.exception() is None and f.result().close())
            if isinstance(e, TimeoutError):  # ray.get's GetTimeoutError is one
                raise KVTransferTimeout(f"{what} did not finish within {timeout}s") from e
            raise KVTransferError(f"{what} failed: {_why(e)}") from e
        with self._lock:
            self.pairs.put(dest.worker_id, pair, None, addr.peer)
        self.sweeps.request()  # a new decode worker is often a dead one's replacement
        return pair

    def abort_peer(self, worker_id: str) -> None:
        with self._lock:
            self.pairs.abort(worker_id)

    async def sweep_dead(self) -> None:
        """End the groups of decode workers Ray reports dead. The books' lock is taken on
        threads (an abort_peer may hold it through NCCL's abort), never on the loop, and
        a group is ended outside it (a send on the engine thread may want it)."""
        entries = await asyncio.to_thread(self._entries)
        for worker_id, peer in await dead_peers(entries, _peer_alive):
            await asyncio.to_thread(self._release, worker_id, peer.comm)

    def _entries(self) -> list[tuple[str, Peer[PairGroup]]]:
        with self._lock:
            return self.pairs.entries()

    def _release(self, worker_id: str, pair: PairGroup) -> None:
        with self._lock:
            mine = self.pairs.release(worker_id, pair)
        if mine:
            pair.close()

    def send(
        self, cache: torch.Tensor, src_block_ids: list[int], dest: Endpoint,
        dest_block_ids: list[int], request_id: str,
    ) -> TransferHandle:
        check_counts(request_id, src_block_ids, dest_block_ids)
        check_spec(request_id, cache, dest)
        t0 = time.perf_counter()
        pair = self.pair(dest, cache.device)
        staging = gather_request(cache, src_block_ids)
        try:
            with pair.lock:
                # The receive is posted when this call returns; then send and wait.
                _wait_peer(_to_peer(dest.address.peer, CollectiveRecv(
                    request_id, self.worker_id, len(src_block_ids))), self.timeout_s)
                work = pair.group.send([staging], 1, 0)
                wait_work(work, self.timeout_s,
                          f"request {request_id}: send to {dest.worker_id}")
        except Exception as e:
            # Either side may hold a half-done operation: end the group; the next
            # transfer builds a new one (the receiver replaces its side on the join).
            self.abort_peer(dest.worker_id)
            if isinstance(e, KVTransferError):
                raise
            if isinstance(e, TimeoutError):  # ray.get's GetTimeoutError is one
                raise KVTransferTimeout(f"request {request_id}: {dest.worker_id} did not post "
                                        f"its receive within {self.timeout_s}s") from e
            raise KVTransferError(f"request {request_id}: collective send to "
                                  f"{dest.worker_id} failed: {_why(e)}") from e
        return sent_handle(request_id, self.backend, dest, staging, t0)


def _run_into(fn: Any, fut: concurrent.futures.Future[Any]) -> None:
    try:
        fut.set_result(fn())
    except BaseException as e:
        fut.set_exception(e)


def _why(e: BaseException) -> str:
    """One line on a failure: a dead actor's error names it without its traceback."""
    if isinstance(e, ray.exceptions.RayActorError):
        return "the decode worker's actor is gone"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"
