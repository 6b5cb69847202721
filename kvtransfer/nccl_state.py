"""The NCCL backend's bookkeeping, apart from CUDA so it can be tested on CPU with fakes.

- ``PendingReceives`` (decode side): the receives posted for requests, each with its
  buffer and a completion event (anything with ``query() -> bool``). A buffer stays
  referenced until its receive completed or its peer's communicator was aborted --
  freeing it earlier would let the allocator hand out memory NCCL is still writing.
  Aborted requests (``cancel``) and unfetched completed receives are dropped; a receive
  still pending after ``timeout_s`` names its peer as stuck, because a receive that will
  never be matched blocks every later one on that peer's stream.
- ``PeerComms``: one communicator (and one stream) per peer, with the peer's actor
  handle a sweep probes (kvtransfer/peer_sweep.py); ``abort`` ends a communicator for
  good and forgets the peer, so the next transfer starts a new one; ``release`` forgets
  one only if the peer still has it (a sweep that found the peer dead never takes a
  newer one) and leaves ending it to the caller, outside its lock.
- ``call_with_timeout``: a blocking call (NCCL's communicator set-up, which cupy only
  offers blocking) on a thread of its own, given up on after a timeout.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from messages.transfer import KVTransferError, KVTransferTimeout

T = TypeVar("T")


class Event(Protocol):
    def query(self) -> bool: ...


@dataclass
class Receive:
    request_id: str
    peer_id: str
    buffer: Any  # the staging tensor NCCL writes into
    done: Event
    posted_at: float
    cancelled: bool = False


class PendingReceives:
    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self._clock = clock
        self._by_request: dict[str, Receive] = {}
        self._orphans: list[Receive] = []  # cancelled or timed out, receive still running

    def add(self, request_id: str, peer_id: str, buffer: Any, done: Event) -> None:
        if request_id in self._by_request:
            raise KVTransferError(f"request {request_id}: a receive is already posted")
        self._by_request[request_id] = Receive(request_id, peer_id, buffer, done, self._clock())

    def take(self, request_id: str) -> Receive | None:
        """The receive for a fetch (it is the fetcher's now), or None if none was posted."""
        return self._by_request.pop(request_id, None)

    def orphan(self, rx: Receive) -> None:
        """Keep ``rx``'s buffer alive until its receive completes or its peer is aborted
        (a fetch that timed out hands it back here)."""
        rx.cancelled = True
        self._orphans.append(rx)

    def cancel(self, request_id: str) -> bool:
        """The request was aborted: drop its receive, at once if it completed, else once
        it does (or its peer is aborted). True if one was posted."""
        rx = self._by_request.pop(request_id, None)
        if rx is None:
            return False
        if not rx.done.query():
            self.orphan(rx)
        return True

    def sweep(self) -> set[str]:
        """Drop what is finished; return the peers with a receive stuck past timeout_s
        (their communicators must be aborted). Completed receives nobody fetched within
        the timeout (their request was aborted before the receive was posted) go too."""
        now = self._clock()
        self._orphans = [rx for rx in self._orphans if not rx.done.query()]
        stuck = {rx.peer_id for rx in self._orphans if now - rx.posted_at > self.timeout_s}
        for rid, rx in list(self._by_request.items()):
            if now - rx.posted_at <= self.timeout_s:
                continue
            if rx.done.query():
                del self._by_request[rid]  # never fetched: its request went away
            else:
                stuck.add(rx.peer_id)
        return stuck

    def drop_peer(self, peer_id: str) -> list[str]:
        """Forget every receive from ``peer_id`` (its communicator was aborted, so NCCL
        no longer writes their buffers); the ids of requests that lost theirs."""
        lost = [rid for rid, rx in self._by_request.items() if rx.peer_id == peer_id]
        for rid in lost:
            del self._by_request[rid]
        self._orphans = [rx for rx in self._orphans if rx.peer_id != peer_id]
        return lost

    def requests(self) -> list[str]:
        return list(self._by_request)

    def num_buffers(self) -> int:
        """Buffers still referenced (posted plus orphaned): what a leak would grow."""
        return len(self._by_request) + len(self._orphans)


@dataclass
class Peer(Generic[T]):
    comm: T
    stream: Any  # this pair's CUDA stream: a stuck operation blocks only this pair
    # The other side's actor (None: unknown): a sweep ends the communicator once Ray
    # reports it dead (kvtransfer/peer_sweep.py).
    actor: Any = None
    # Held by a sender while it issues and waits for operations on ``comm``: a sweep
    # ends only a communicator it can take, never one an NCCL call is being made on.
    in_use: threading.Lock = field(default_factory=threading.Lock)


class PeerComms(Generic[T]):
    """peer id -> its communicator and stream. ``abort_fn`` ends a communicator (cupy's
    ``NcclCommunicator.abort``: pending operations stop, its resources go)."""

    KEEP_ABORTED = 64  # the last aborts are enough to read; a long-lived worker keeps no more

    def __init__(self, abort_fn: Callable[[T], None]) -> None:
        self._abort = abort_fn
        self._peers: dict[str, Peer[T]] = {}
        self.aborted: list[str] = []  # peer ids, in order, the last KEEP_ABORTED (tests, logs)

    def get(self, peer_id: str) -> Peer[T] | None:
        return self._peers.get(peer_id)

    def put(self, peer_id: str, comm: T, stream: Any, actor: Any = None) -> None:
        """A new communicator for ``peer_id`` (``actor``: its, for the sweeps); an old
        one is aborted first."""
        if peer_id in self._peers:
            self.abort(peer_id)
        self._peers[peer_id] = Peer(comm, stream, actor)

    def abort(self, peer_id: str) -> bool:
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return False
        try:
            self._abort(peer.comm)
        finally:
            self._note(peer_id)
        return True

    def release(self, peer_id: str, comm: T) -> bool:
        """Forget ``comm`` if it is still ``peer_id``'s communicator; True if it was, and
        the caller ends it."""
        peer = self._peers.get(peer_id)
        if peer is None or peer.comm is not comm:
            return False
        del self._peers[peer_id]
        self._note(peer_id)
        return True

    def _note(self, peer_id: str) -> None:
        self.aborted.append(peer_id)
        del self.aborted[:-self.KEEP_ABORTED]

    def items(self) -> list[tuple[str, T]]:
        return [(peer_id, peer.comm) for peer_id, peer in self._peers.items()]

    def entries(self) -> list[tuple[str, Peer[T]]]:
        return list(self._peers.items())

    def __contains__(self, peer_id: str) -> bool:
        return peer_id in self._peers

    def __len__(self) -> int:
        return len(self._peers)


def call_with_timeout(fn: Callable[[], T], timeout_s: float, what: str,
                      on_late: Callable[[T], None] | None = None) -> T:
    """Run blocking ``fn`` on a daemon thread; its result, or KVTransferTimeout after
    ``timeout_s`` (the thread is then left to finish on its own and, if it ever does,
    ``on_late`` gets its result: an orphaned communicator to abort)."""
    fut: concurrent.futures.Future[T] = concurrent.futures.Future()

    def target() -> None:
        try:
            fut.set_result(fn())
        except BaseException as e:
            fut.set_exception(e)

    threading.Thread(target=target, name=f"pdserve-{what}", daemon=True).start()
    try:
        return fut.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        if on_late is not None:
            fut.add_done_callback(lambda f: f.exception() is None and on_late(f.result()))
        raise KVTransferTimeout(f"{what} did not finish within {timeout_s}s") from None
