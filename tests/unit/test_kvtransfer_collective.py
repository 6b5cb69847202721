"""The collective backend's protocol on real gloo process groups, in one process.

The decode side runs on an event-loop thread standing in for its actor: the sender's
peer calls (CollectiveConnect, CollectiveRecv) reach ``on_peer_message`` there, as a
Ray actor call would. The groups, the store and the bytes are real (gloo over TCP on
127.0.0.1); Ray actors, nodes and dead processes are tests/e2e/test_collective_*.py's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import threading
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest
import torch

import kvtransfer.collective as coll
from kvtransfer.addresses import CollectiveAddress
from kvtransfer.base import Endpoint, KVSpec, KVTransferError, KVTransferTimeout, TransferHandle
from kvtransfer.collective import CollectiveReceiver, CollectiveRecv, CollectiveSender
from kvtransfer.peer import PeerMessage

SPEC = KVSpec((2, 2, 4, 2, 8), "float32", 4)  # (layers, K/V, block size, heads, dim)
CPU = torch.device("cpu")


class LoopPeer:
    """The decode actor: its receiver on an event loop of its own; ``kv_peer.remote``
    returns a future of the call, as an actor call returns an ObjectRef."""

    def __init__(self, receiver: CollectiveReceiver) -> None:
        self.receiver = receiver
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.kv_peer = self  # peer.kv_peer.remote(message), as on an actor handle
        self.silent = False  # True: calls are never answered (a hung peer)
        self.seen: list[PeerMessage] = []

    def remote(self, message: PeerMessage) -> concurrent.futures.Future[None]:
        self.seen.append(message)
        if self.silent:
            return concurrent.futures.Future()
        return self.run_async(self.receiver.on_peer_message(message))

    def run_async(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, fn: Any) -> Any:
        async def go() -> Any:
            return fn()

        return self.run_async(go()).result(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(autouse=True)
def futures_as_refs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coll, "_wait_peer", lambda ref, t: ref.result(timeout=t))


@pytest.fixture
def link() -> Iterator[tuple[CollectiveSender, LoopPeer, Endpoint]]:
    rx = CollectiveReceiver(timeout_s=5.0)
    peer = LoopPeer(rx)
    host, port = peer.call(lambda: rx.listen(CPU, SPEC, host="127.0.0.1"))
    ep = Endpoint("collective", "decode-0", SPEC, CollectiveAddress(peer, host, port))
    tx = CollectiveSender("prefill-0", timeout_s=5.0)
    yield tx, peer, ep
    peer.close()


def cache(n: int = 12, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, *SPEC.block_shape).to(dtype)


def fetch(peer: LoopPeer, handle: TransferHandle, timeout_s: float = 5.0) -> torch.Tensor:
    return peer.run_async(peer.receiver.fetch(handle, timeout_s)).result(timeout_s + 10)


def test_blocks_arrive_exactly_and_one_group_serves_many_transfers(
        link: tuple[CollectiveSender, LoopPeer, Endpoint]) -> None:
    tx, peer, ep = link
    src = cache()
    for i, (s, d) in enumerate([([3, 1, 7], [0, 5, 2]), ([11], [4]), ([0, 2, 4, 6], [1, 3, 5, 7])]):
        handle = tx.send(src, s, ep, d, f"r{i}")
        assert handle.backend == "collective" and handle.num_blocks == len(s)
        assert handle.nbytes == len(s) * SPEC.block_nbytes()
        got = fetch(peer, handle)
        assert torch.equal(got, src[s])
    joins = [m for m in peer.seen if isinstance(m, coll.CollectiveConnect)]
    assert [j.prefix for j in joins] == ["prefill-0/1"]  # built once, reused twice
    assert peer.receiver.num_posted() == 0


def test_concurrent_sends_to_one_peer_each_get_their_own_bytes(
        link: tuple[CollectiveSender, LoopPeer, Endpoint]) -> None:
    tx, peer, ep = link
    src = cache(32)
    ids = [[i, i + 8] for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        handles = list(pool.map(lambda i: tx.send(src, ids[i], ep, [0, 1], f"c{i}"), range(8)))
    for i, h in enumerate(handles):
        assert torch.equal(fetch(peer, h), src[ids[i]])
    assert len([m for m in peer.seen if isinstance(m, coll.CollectiveConnect)]) == 1


def test_a_receiver_that_ended_the_group_fails_one_send_then_it_is_rebuilt(
        link: tuple[CollectiveSender, LoopPeer, Endpoint]) -> None:
    tx, peer, ep = link
    src = cache()
    fetch(peer, tx.send(src, [1], ep, [1], "a"))
    peer.call(lambda: peer.receiver.abort_peer("prefill-0"))  # e.g. after a failed receive
    with pytest.raises(KVTransferError, match="no collective group with prefill-0"):
        tx.send(src, [2], ep, [2], "b")
    assert "decode-0" not in tx.pairs  # the sender ended its side too
    got = fetch(peer, tx.send(src, [3, 4], ep, [3, 4], "c"))
    assert torch.equal(got, src[[3, 4]])
    joins = [m.prefix for m in peer.seen if isinstance(m, coll.CollectiveConnect)]
    assert joins == ["prefill-0/1", "prefill-0/2"]  # a fresh prefix: no stale keys read


def test_a_peer_that_never_answers_times_out_and_the_group_is_dropped(
        link: tuple[CollectiveSender, LoopPeer, Endpoint]) -> None:
    tx, peer, ep = link
    tx.timeout_s = 1.0
    fetch(peer, tx.send(cache(), [1], ep, [1], "a"))
    peer.silent = True
    with pytest.raises(KVTransferTimeout):
        tx.send(cache(), [2], ep, [2], "b")
    assert "decode-0" not in tx.pairs


def test_a_sender_that_goes_away_fails_the_posted_receive_without_waiting_it_out(
        link: tuple[CollectiveSender, LoopPeer, Endpoint]) -> None:
    tx, peer, ep = link
    fetch(peer, tx.send(cache(), [1], ep, [1], "a"))
    peer.remote(CollectiveRecv("b", "prefill-0", 2)).result(5)  # posted; its send never comes
    tx.abort_peer("decode-0")  # the sender's group is gone: its sockets close
    gc.collect()
    handle = TransferHandle("b", "collective", SPEC, 2, 2 * SPEC.block_nbytes())
    with pytest.raises(KVTransferError) as err:
        fetch(peer, handle, timeout_s=60.0)
    assert not isinstance(err.value, KVTransferTimeout)  # the closed connection, not the bound
    assert "prefill-0" not in peer.receiver.pairs


def test_an_aborted_requests_receive_is_drained_not_leaked(
        link: tuple[CollectiveSender, LoopPeer, Endpoint]) -> None:
    tx, peer, ep = link
    src = cache()
    fetch(peer, tx.send(src, [1], ep, [1], "warm"))
    # The request is aborted on the decode side after its receive was posted and
    # before its bytes came: the receive is drained in the background (its buffer
    # stays referenced), the bytes arrive, nothing stays posted, the pair goes on.
    peer.remote(CollectiveRecv("gone", "prefill-0", 2)).result(5)
    peer.call(lambda: peer.receiver.cancel("gone"))
    assert peer.call(peer.receiver.num_posted) == 1  # the drain, still waiting
    staging = src[[5, 6]].contiguous()
    tx.pair(ep, CPU).group.send([staging], 1, 0).wait()
    for _ in range(100):
        if peer.call(peer.receiver.num_posted) == 0:
            break
        threading.Event().wait(0.05)
    assert peer.call(peer.receiver.num_posted) == 0
    assert "prefill-0" in peer.receiver.pairs  # a drained success keeps the group
    assert torch.equal(fetch(peer, tx.send(src, [7], ep, [2], "after")), src[[7]])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_other_dtypes_travel_as_they_are(dtype: torch.dtype) -> None:
    spec = KVSpec(SPEC.block_shape, str(dtype).removeprefix("torch."), dtype.itemsize)
    rx = CollectiveReceiver(timeout_s=5.0)
    peer = LoopPeer(rx)
    try:
        host, port = peer.call(lambda: rx.listen(CPU, spec, host="127.0.0.1"))
        ep = Endpoint("collective", "decode-1", spec, CollectiveAddress(peer, host, port))
        src = cache(6, dtype)
        got = fetch(peer, CollectiveSender("p", timeout_s=5.0).send(src, [4, 0], ep, [0, 1], "r"))
        assert got.dtype == dtype and torch.equal(got, src[[4, 0]])
    finally:
        peer.close()


def test_a_receive_posted_without_a_group_is_refused() -> None:
    rx = CollectiveReceiver(timeout_s=1.0)
    rx.listen(CPU, SPEC, host="127.0.0.1")
    with pytest.raises(KVTransferError, match="no collective group"):
        rx.post_recv("r", "nobody", 1)
    handle = TransferHandle("r", "collective", SPEC, 1, SPEC.block_nbytes())
    with pytest.raises(KVTransferError, match="no collective receive is posted"):
        asyncio.run(rx.fetch(handle, 1.0))


def test_per_pair_choice_is_the_object_store_on_one_node_and_collective_across() -> None:
    from kvtransfer.addresses import PerPairAddress
    from kvtransfer.collective_auto import PerPairSender, sub_endpoint

    tx = PerPairSender("p")
    tx._node = "node-a"  # what Ray reports inside the prefill actor
    coll_addr = CollectiveAddress(None, "10.0.0.2", 1234)
    here = Endpoint("ray+collective", "d0", SPEC, PerPairAddress("node-a", coll_addr))
    there = Endpoint("ray+collective", "d1", SPEC, PerPairAddress("node-b", coll_addr))
    assert tx.same_node(here) and not tx.same_node(there)
    sub = sub_endpoint(there)
    assert (sub.backend, sub.worker_id, sub.address) == ("collective", "d1", coll_addr)
