"""``nccl``: NCCL point-to-point send/recv between GPUs (same node or across nodes).

One 2-rank communicator and one CUDA stream per (prefill, decode) pair, created before
the first send to that decode worker -- off the engine thread and with a timeout
(``prepare``): the prefill worker makes a unique id, sends the decode worker a
NcclConnect (through its KVPeer actor handle, carried in the Endpoint; see peer.py) to
join as rank 1, and joins as rank 0. Per transfer (push model, so the two sides' p2p
calls can never be issued in different orders):

    prefill (engine thread)                 decode (actor)
    gather blocks -> staging
    NcclRecv(id, n) to the peer -------->   allocate a buffer *on the peer's stream*,
                                            post the recv there (before any await: call
                                            order is post order), remember it under id
    the peer's stream waits for the gather;
    send staging there; poll its event
    until done or timeout
    (its blocks may be freed now)
                                            start(id): fetch() polls the recv's event
                                            (timeout), hands the buffer to the engine's
                                            stream, the worker scatters it

Streams and memory: a buffer is allocated on the stream NCCL writes it from, so the
caching allocator never gives its memory to other work while the receive may still
run; the consumer's stream is recorded on it before it is handed out. The sender
records the peer's stream on its staging tensor likewise.

Failures never hang a worker: a send or receive not done within the transfer timeout
aborts that pair's communicator (a receive nobody will match would block every later one
on the pair's stream) and the next transfer builds a new one. An aborted request's
posted receive is dropped once it completed; buffers stay referenced until NCCL is done
with them (kvtransfer/nccl_state.py keeps the books). NCCL cannot put two ranks on one
GPU, so this backend needs two GPUs; one GPU uses cuda-ipc. Not verified on hardware in
this repository yet (see docs/kernels.md).

Dead peers: the router sends no more transfers to a dead worker, and its replacement
has a new id, so no failure ever ends a dead peer's communicator, stream or receive
buffers. As in kvtransfer/collective.py, each side keeps the other side's actor handle
with them (the sender its Endpoint's, the receiver the one NcclConnect carries) and
sweeps (kvtransfer/peer_sweep.py): after a join, and at most every SWEEP_INTERVAL_S
while transfers go on, it asks Ray on its event loop about every peer it holds a
communicator with, and ends those of the peers Ray reports dead the way a failure does
(abort, then drop the buffers). A sender's sweep skips a communicator a send is using;
that send fails or times out on its own, and aborts it.

kvtransfer/collective.py runs this same protocol (and nccl_state's books) over
torch.distributed process groups -- NCCL for CUDA caches, gloo for CPU ones, so CI runs
it -- and is what ``--kv-transfer auto`` picks with whole GPUs; this cupy
implementation stays cuda-ipc's fallback for pairs on two GPUs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
import torch

from kernels import gather_blocks
from kvtransfer.addresses import NcclAddress
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
from kvtransfer.join_once import join_once
from kvtransfer.nccl_state import Peer, PeerComms, PendingReceives, call_with_timeout
from kvtransfer.peer import PeerMessage, to_peer
from kvtransfer.peer_sweep import (
    PROBE_TIMEOUT_S,
    SweepSchedule,
    dead_peers,
    own_actor,
    peer_alive,
)

DEFAULT_TIMEOUT_S = 30.0
_POLL_S = 0.0002


def _nccl() -> Any:
    try:
        from cupy.cuda import nccl
    except ImportError as e:  # pragma: no cover - GPU machines only
        raise KVTransferError("the nccl backend needs cupy with NCCL (cupy-cuda13x)") from e
    return nccl


# -- the CUDA touch points (tests replace these with fakes on CPU) -------------------------
def _new_stream(device: torch.device) -> Any:
    return torch.cuda.Stream(device)


def _record(stream: Any) -> Any:
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _alloc_on(stream: Any, shape: tuple[int, ...], dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    with torch.cuda.stream(stream):
        return torch.empty(shape, dtype=dtype, device=device)


def _hand_to_current_stream(buf: torch.Tensor) -> None:
    """``buf`` will be read on this thread's current stream: the allocator must not
    reuse it before that stream is done with it."""
    buf.record_stream(torch.cuda.current_stream(buf.device))


def _order_after_current(stream: Any, t: torch.Tensor) -> None:
    """``stream`` starts after the work queued so far on the current stream (which wrote
    ``t``), and ``t``'s memory is not reused before ``stream`` is done reading it."""
    stream.wait_stream(torch.cuda.current_stream(t.device))
    t.record_stream(stream)


def _new_comm(unique_id: tuple[int, ...], rank: int, device: torch.device) -> Any:
    """Join the pair's 2-rank communicator as ``rank`` (blocks until both have joined)."""
    nccl = _nccl()
    with torch.cuda.device(device):
        return nccl.NcclCommunicator(2, unique_id, rank)


def _abort_comm(comm: Any) -> None:
    comm.abort()


def _to_peer(peer: Any, message: PeerMessage) -> Any:
    return to_peer(peer, message)


def _wait_peer(ref: Any, timeout_s: float) -> Any:
    return ray.get(ref, timeout=timeout_s)


async def _peer_alive(peer: Any) -> bool:
    return await peer_alive(peer, PROBE_TIMEOUT_S)


@dataclass(frozen=True)
class NcclConnect(PeerMessage):
    """Join ``peer_id``'s communicator as rank 1; ``actor`` is the sender's (None:
    unknown), whose death ends the communicator."""

    peer_id: str
    unique_id: tuple[int, ...]
    actor: Any = None


@dataclass(frozen=True)
class NcclRecv(PeerMessage):
    """Post the receive of ``num_blocks`` blocks ``peer_id`` is about to send."""

    request_id: str
    peer_id: str
    num_blocks: int


class NcclReceiver(KVReceiver):
    """Decode side. Every method runs on the actor's event loop thread (the join's
    blocking part on a thread of its own), so the books need no lock."""

    backend = "nccl"

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.peers: PeerComms[Any] = PeerComms(_abort_comm)
        self.pending = PendingReceives(timeout_s)
        self._device: torch.device | None = None
        self._spec: KVSpec | None = None
        self.sweeps = SweepSchedule()

    def bind(self, device: torch.device, spec: KVSpec) -> None:
        """The cache receives go to (cuda-ipc's fallback binds without an endpoint)."""
        self._device, self._spec = device, spec

    def endpoint(self, cache: torch.Tensor, worker_id: str, spec: KVSpec) -> Endpoint:
        self.bind(cache.device, spec)
        # Senders reach us through the actor we run in; it must implement KVPeer.
        actor = ray.get_runtime_context().current_actor
        return Endpoint(self.backend, worker_id, spec, NcclAddress(actor))

    async def on_peer_message(self, message: PeerMessage) -> None:
        if isinstance(message, NcclRecv):  # posted before any await: call order is post order
            self.post_recv(message.request_id, message.peer_id, message.num_blocks)
        elif isinstance(message, NcclConnect):
            await self.connect(message.peer_id, message.unique_id, message.actor)
        else:
            await super().on_peer_message(message)

    async def connect(self, peer_id: str, unique_id: tuple[int, ...], actor: Any = None
                      ) -> None:
        """Join the pair's communicator as rank 1 (an older one with this peer is
        aborted: the sender decided to start over). ``actor``: the sender's, for the
        sweeps."""
        device = self._device
        assert device is not None, "bind() or endpoint() first"
        comm = await asyncio.to_thread(call_with_timeout,
                                       lambda: _new_comm(unique_id, 1, device),
                                       self.pending.timeout_s, f"NCCL join with {peer_id}",
                                       _abort_comm)
        self.abort_peer(peer_id)
        self.peers.put(peer_id, comm, _new_stream(device), actor)
        self.sweeps.request()  # a new sender is often a dead one's replacement
        self.sweeps.maybe_start(self.sweep_dead)

    def post_recv(self, request_id: str, peer_id: str, num_blocks: int) -> None:
        """Post the receive now (stream-ordered); fetch() waits for it."""
        self.sweep()
        peer = self.peers.get(peer_id)
        if peer is None:
            raise KVTransferError(f"request {request_id}: no NCCL communicator with "
                                  f"{peer_id} (never joined, or aborted)")
        assert self._spec is not None and self._device is not None
        buf = _alloc_on(peer.stream, (num_blocks, *self._spec.block_shape),
                        torch_dtype(self._spec), self._device)
        peer.comm.recv(buf.data_ptr(), buf.numel() * buf.element_size(),
                       getattr(_nccl(), "NCCL_UINT8", 1), 0, peer.stream.cuda_stream)
        self.pending.add(request_id, peer_id, buf, _record(peer.stream))
        self.sweeps.maybe_start(self.sweep_dead)

    async def fetch(self, handle: TransferHandle, timeout_s: float) -> torch.Tensor:
        self.pending.timeout_s = timeout_s
        rx = self.pending.take(handle.request_id)
        if rx is None:
            raise KVTransferError(f"request {handle.request_id}: no NCCL receive is posted "
                                  "(never posted, or its communicator was aborted)")
        deadline = time.monotonic() + timeout_s
        while not rx.done.query():  # poll: a blocked event loop would stall every request
            if time.monotonic() > deadline:
                self.pending.orphan(rx)  # NCCL may still write it: kept until the abort
                self.abort_peer(rx.peer_id)
                raise KVTransferTimeout(f"request {handle.request_id}: NCCL receive did not "
                                        f"complete within {timeout_s}s")
            await asyncio.sleep(0.0005)
        _hand_to_current_stream(rx.buffer)
        return rx.buffer

    def cancel(self, request_id: str) -> None:
        self.pending.cancel(request_id)
        self.sweep()

    def sweep(self) -> None:
        """Abort the communicators of peers with a receive stuck past the timeout."""
        for peer_id in self.pending.sweep():
            self.abort_peer(peer_id)

    def abort_peer(self, peer_id: str) -> None:
        self.peers.abort(peer_id)
        self.pending.drop_peer(peer_id)  # after the abort: NCCL writes them no more

    async def sweep_dead(self) -> None:
        """End the communicators of senders Ray reports dead as a failure does (on the
        loop, as every book here; one a join replaced meanwhile is not touched)."""
        for peer_id, peer in await dead_peers(self.peers.entries(), _peer_alive):
            if self.peers.get(peer_id) is peer:
                self.abort_peer(peer_id)


class NcclSender(KVSender):
    """Prefill side. ``prepare`` (actor thread pool) and ``send`` (engine thread) may run
    at once: the peers' books are under a lock, and one join per peer is in flight."""

    backend = "nccl"

    def __init__(self, worker_id: str = "prefill", timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.worker_id = worker_id
        self.timeout_s = timeout_s
        self.peers: PeerComms[Any] = PeerComms(_abort_comm)
        self._lock = threading.Lock()
        self._joining: dict[str, concurrent.futures.Future[Peer[Any]]] = {}
        self.actor = own_actor()  # sent with each join: the receiver's sweeps probe it
        self.sweeps = SweepSchedule()

    async def prepare(self, dest: Endpoint, device: torch.device, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        await asyncio.to_thread(self.peer, dest, device)
        self.sweeps.maybe_start(self.sweep_dead)  # due after a join, or after an interval

    def peer(self, dest: Endpoint, device: torch.device) -> Peer[Any]:
        """The communicator with ``dest``, set up on first use (one join at a time)."""
        return join_once(self._lock, self._joining, dest.worker_id,
                         lambda: self.peers.get(dest.worker_id),
                         lambda: self._join(dest, device), self.timeout_s, "NCCL")

    def _join(self, dest: Endpoint, device: torch.device) -> Peer[Any]:
        uid = _nccl().get_unique_id()
        joined = _to_peer(dest.address.peer, NcclConnect(self.worker_id, uid, self.actor))
        what = f"NCCL set-up with {dest.worker_id}"
        comm = call_with_timeout(lambda: _new_comm(uid, 0, device), self.timeout_s, what,
                                 _abort_comm)
        try:
            _wait_peer(joined, self.timeout_s)
        except Exception as e:
            _abort_comm(comm)
            raise KVTransferError(f"{what}: the decode worker did not join: {e!r}") from e
        with self._lock:
            self.peers.put(dest.worker_id, comm, _new_stream(device), dest.address.peer)
            peer = self.peers.get(dest.worker_id)
        self.sweeps.request()  # a new decode worker is often a dead one's replacement
        return peer  # type: ignore[return-value]

    def abort_peer(self, worker_id: str) -> None:
        with self._lock:
            self.peers.abort(worker_id)

    async def sweep_dead(self) -> None:
        """End the communicators of decode workers Ray reports dead. The books' lock is
        taken on threads (an abort_peer may hold it through NCCL's abort), never on the
        loop."""
        entries = await asyncio.to_thread(self._entries)
        for worker_id, peer in await dead_peers(entries, _peer_alive):
            await asyncio.to_thread(self._release, worker_id, peer)

    def _entries(self) -> list[tuple[str, Peer[Any]]]:
        with self._lock:
            return self.peers.entries()

    def _release(self, worker_id: str, peer: Peer[Any]) -> None:
        """Abort ``peer``'s communicator unless a send is using it (that send fails or
        times out on its own, and a later sweep finds it gone) or a join replaced it;
        outside the books' lock, which a send on the engine thread may want."""
        if not peer.in_use.acquire(blocking=False):
            return
        try:
            with self._lock:
                mine = self.peers.release(worker_id, peer.comm)
            if mine:
                _abort_comm(peer.comm)
        finally:
            peer.in_use.release()

    def send(
        self, cache: torch.Tensor, src_block_ids: list[int], dest: Endpoint,
        dest_block_ids: list[int], request_id: str,
    ) -> TransferHandle:
        check_counts(request_id, src_block_ids, dest_block_ids)
        check_spec(request_id, cache, dest)
        t0 = time.perf_counter()
        peer = self.peer(dest, cache.device)
        ids = torch.tensor(src_block_ids, dtype=torch.long, device=cache.device)
        staging = gather_blocks(cache, ids)
        self._use(peer, dest.worker_id, request_id)
        try:
            # The receive must be posted before our send can complete; the call returns
            # once it is posted (the decode worker does it before its first await).
            _wait_peer(_to_peer(dest.address.peer,
                                NcclRecv(request_id, self.worker_id, len(src_block_ids))),
                       self.timeout_s)
            _order_after_current(peer.stream, staging)
            peer.comm.send(staging.data_ptr(), staging.numel() * staging.element_size(),
                           getattr(_nccl(), "NCCL_UINT8", 1), 1, peer.stream.cuda_stream)
            self._wait(_record(peer.stream), request_id)
        except Exception as e:
            # A receive posted without its send (or a send never matched) would block the
            # pair's stream for good: end the communicator; the next transfer rebuilds it.
            self.abort_peer(dest.worker_id)
            if isinstance(e, KVTransferError):
                raise
            raise KVTransferError(f"request {request_id}: NCCL send to {dest.worker_id} "
                                  f"failed: {e!r}") from e
        finally:
            peer.in_use.release()
        return sent_handle(request_id, self.backend, dest, staging, t0)

    def _use(self, peer: Peer[Any], worker_id: str, request_id: str) -> None:
        """Take ``peer`` for a send: a sweep may be aborting it (bounded: it waits for
        at most that abort), and it must still be the peer's communicator then."""
        if not peer.in_use.acquire(timeout=self.timeout_s):
            raise KVTransferTimeout(f"request {request_id}: the NCCL communicator with "
                                    f"{worker_id} stayed busy for {self.timeout_s}s")
        with self._lock:
            current = self.peers.get(worker_id) is peer
        if not current:
            peer.in_use.release()
            raise KVTransferError(f"request {request_id}: the NCCL communicator with "
                                  f"{worker_id} was ended (its worker died, or a failure)")

    def _wait(self, done: Any, request_id: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not done.query():
            if time.monotonic() > deadline:
                raise KVTransferTimeout(f"request {request_id}: NCCL send did not complete "
                                        f"within {self.timeout_s}s")
            time.sleep(_POLL_S)
