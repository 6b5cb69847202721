"""A dead peer's pair group is ended by the workers that survive it (kvtransfer/peer_sweep.py).

Real gloo groups in one process, as in tests/unit/test_kvtransfer_collective.py: each
worker's event loop runs on a thread of its own, and Ray's word on which actor died is a
set the test fills (``_peer_alive`` is the touch point, as ``_wait_peer`` is there). The
last test asks real Ray about real actors that hold real groups, one of them killed.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import ray
import torch

import kvtransfer.collective as coll
from kvtransfer.addresses import CollectiveAddress
from kvtransfer.base import Endpoint
from kvtransfer.collective import CollectiveReceiver, CollectiveSender
from kvtransfer.peer_sweep import SweepSchedule, peer_alive
from tests.unit.test_kvtransfer_collective import CPU, SPEC, LoopPeer, cache, fetch

T = TypeVar("T")
DEAD: set[Any] = set()  # the actors Ray reports dead


@pytest.fixture(autouse=True)
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    async def alive(peer: Any) -> bool:
        return peer not in DEAD

    monkeypatch.setattr(coll, "_wait_peer", lambda ref, t: ref.result(timeout=t))
    monkeypatch.setattr(coll, "_peer_alive", alive)
    DEAD.clear()
    yield
    DEAD.clear()


class Loop:
    """A prefill worker's event loop: ``prepare`` and its sweeps run there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def call(self, fn: Any) -> Any:
        async def go() -> Any:
            return fn()

        return self.run(go())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def decode(worker_id: str) -> tuple[LoopPeer, Endpoint]:
    rx = CollectiveReceiver(timeout_s=5.0)
    peer = LoopPeer(rx)
    host, port = peer.call(lambda: rx.listen(CPU, SPEC, host="127.0.0.1"))
    return peer, Endpoint("collective", worker_id, SPEC, CollectiveAddress(peer, host, port))


def prefill(worker_id: str) -> CollectiveSender:
    tx = CollectiveSender(worker_id, timeout_s=5.0)
    tx.actor = f"actor of {worker_id}"  # what own_actor finds inside a Ray actor
    return tx


def transfer(tx: CollectiveSender, loop: Loop, peer: LoopPeer, ep: Endpoint, rid: str) -> None:
    """One request's KV, as a prefill worker sends it: prepare on its loop, then send."""
    src = cache()
    loop.run(tx.prepare(ep, CPU, 5.0))
    got = fetch(peer, tx.send(src, [3, 1], ep, [0, 1], rid))
    assert torch.equal(got, src[[3, 1]])


def until(cond: Any, what: str) -> None:
    """Wait (bounded) for a sweep on another thread to have done its part."""
    for _ in range(200):
        if cond():
            return
        threading.Event().wait(0.02)
    raise AssertionError(f"never happened: {what}")


def die(peer: LoopPeer) -> None:
    """The decode worker's process is gone: Ray says so, its sockets close."""
    DEAD.add(peer)
    for peer_id, _ in peer.call(peer.receiver.pairs.items):
        peer.call(lambda p=peer_id: peer.receiver.abort_peer(p))
    peer.close()
    gc.collect()


def joins(peer: LoopPeer, prefill_id: str) -> int:
    return sum(1 for m in peer.seen
               if isinstance(m, coll.CollectiveConnect) and m.peer_id == prefill_id)


def test_a_prefill_worker_ends_the_group_of_a_dead_decode_worker_once_its_replacement_joins(
) -> None:
    loop = Loop()
    (d0, ep0), (d1, ep1), (d2, ep2) = decode("decode-0"), decode("decode-1"), decode("decode-2")
    try:
        tx = prefill("prefill-0")
        transfer(tx, loop, d0, ep0, "a")
        transfer(tx, loop, d1, ep1, "b")
        assert sorted(k for k, _ in tx.pairs.items()) == ["decode-0", "decode-1"]
        gone = weakref.ref(tx.pairs.get("decode-0").comm.group)  # type: ignore[union-attr]
        die(d0)
        # The router never sends to decode-0 again: only its replacement's join tells.
        transfer(tx, loop, d2, ep2, "c")
        until(lambda: "decode-0" not in tx.pairs, "the dead decode worker's group ended")
        assert sorted(k for k, _ in tx.pairs.items()) == ["decode-1", "decode-2"]
        gc.collect()
        assert gone() is None  # the process group itself went (threads, sockets, store)
        # The live pair was never touched: same group, no new join, transfers go on.
        transfer(tx, loop, d1, ep1, "d")
        assert joins(d1, "prefill-0") == 1 and d1.call(lambda: len(d1.receiver.pairs)) == 1
    finally:
        for peer in (d1, d2):
            peer.close()
        loop.close()


def test_a_decode_worker_ends_the_group_of_a_dead_prefill_worker_once_its_replacement_joins(
) -> None:
    loop = Loop()
    d, ep = decode("decode-0")
    rx = d.receiver
    try:
        p0, p1 = prefill("prefill-0"), prefill("prefill-1")
        transfer(p0, loop, d, ep, "a")
        transfer(p1, loop, d, ep, "b")
        assert sorted(d.call(lambda: [k for k, _ in rx.pairs.items()])) == ["prefill-0",
                                                                             "prefill-1"]
        gone = weakref.ref(d.call(lambda: rx.pairs.get("prefill-0").comm.group))  # type: ignore
        DEAD.add(p0.actor)  # prefill-0's process is gone: Ray says so, its sockets close
        p0.abort_peer("decode-0")
        p2 = prefill("prefill-2")
        transfer(p2, loop, d, ep, "c")  # its join sweeps
        until(lambda: d.call(lambda: "prefill-0" not in rx.pairs),
              "the dead prefill worker's group ended")
        assert sorted(d.call(lambda: [k for k, _ in rx.pairs.items()])) == ["prefill-1",
                                                                             "prefill-2"]
        d.call(gc.collect)
        assert gone() is None
        transfer(p1, loop, d, ep, "d")  # the live pair goes on, on its first group
        assert joins(d, "prefill-1") == 1
        # Three joins, none of their rendezvous keys left in the decode worker's store.
        assert d.call(rx._store.list_keys) == []
    finally:
        d.close()
        loop.close()


def test_peers_ray_does_not_report_dead_keep_their_groups_through_every_sweep() -> None:
    loop = Loop()
    (d0, ep0), (d1, ep1) = decode("decode-0"), decode("decode-1")
    try:
        tx = prefill("prefill-0")
        tx.sweeps.interval_s = 0.0  # a sweep with every prepare
        for i in range(6):
            transfer(tx, loop, (d0, d1)[i % 2], (ep0, ep1)[i % 2], f"r{i}")
        until(lambda: tx.sweeps.finished >= 3, "sweeps")
        assert sorted(k for k, _ in tx.pairs.items()) == ["decode-0", "decode-1"]
        assert joins(d0, "prefill-0") == 1 and joins(d1, "prefill-0") == 1
        assert tx.pairs.aborted == []
    finally:
        d0.close()
        d1.close()
        loop.close()


class _Ready:
    """An actor handle's ``__ray_ready__``: ``remote()`` is what Ray would answer."""

    def __init__(self, answer: Any) -> None:
        self.__ray_ready__ = self
        self._answer = answer

    def remote(self) -> Any:
        return self._answer()


def test_only_an_actor_ray_reports_dead_counts_as_dead() -> None:
    async def answers() -> bool:
        return True

    async def died() -> None:
        raise ray.exceptions.ActorDiedError()

    async def unavailable() -> None:
        raise ray.exceptions.ActorUnavailableError("restarting", None)

    async def silent() -> None:
        await asyncio.Event().wait()

    async def probe(answer: Any) -> bool:
        return await peer_alive(_Ready(answer), timeout_s=0.05)

    assert asyncio.run(probe(answers)) is True
    assert asyncio.run(probe(died)) is False
    assert asyncio.run(probe(unavailable)) is True  # not sure: ask again next sweep
    assert asyncio.run(probe(silent)) is True  # a node not yet declared lost, say
    assert asyncio.run(peer_alive(object(), 0.05)) is True  # no actor: nothing to end


def test_sweeps_are_due_after_a_join_or_an_interval_and_run_one_at_a_time() -> None:
    now = [0.0]
    sched = SweepSchedule(interval_s=60.0, clock=lambda: now[0])
    ran: list[int] = []
    gate = asyncio.Event()

    async def sweep() -> None:
        ran.append(len(ran))
        await gate.wait()

    async def go() -> None:
        assert not sched.maybe_start(sweep)  # nothing joined, no interval passed
        sched.request()
        assert sched.maybe_start(sweep)
        await asyncio.sleep(0)
        sched.request()  # a join while it runs: no second one at once ...
        assert not sched.maybe_start(sweep) and ran == [0]
        gate.set()
        for _ in range(10):
            await asyncio.sleep(0)
        assert ran == [0, 1] and sched.finished == 2  # ... but right after it
        assert not sched.maybe_start(sweep)
        now[0] = 61.0
        assert sched.maybe_start(sweep)
        await asyncio.sleep(0)

    asyncio.run(go())
    sched.request()
    assert not sched.maybe_start(sweep)  # no running loop (books used directly): none


def test_real_actors_end_the_groups_of_killed_ones() -> None:
    """Real Ray, processes, gloo: bench/transfer_actors.TransferEnd holds a collective
    sender and receiver, as a prefill and a decode worker do."""
    from bench.transfer_actors import TransferEnd
    from tests.e2e.runtime_fixtures import ensure_ray

    started_ray = not ray.is_initialized()
    ensure_ray()
    shape = list(SPEC.block_shape)
    p0, p1, d0, d1 = (TransferEnd.remote(("collective",), shape, 4, 20.0) for _ in range(4))
    try:
        eps = ray.get([d.endpoint.remote("collective") for d in (d0, d1)])
        ids = dict(zip(("p0", "p1", "d0", "d1"), ray.get(
            [e.__ray_call__.remote(lambda s: s.senders["collective"].worker_id)
             for e in (p0, p1, d0, d1)]), strict=True))

        def send(p: Any, ep: Any, d: Any, rid: str) -> None:
            handle, _ = ray.get(p.send.remote(ep, [0, 1], rid), timeout=60)
            ray.get(d.receive.remote(handle, [2, 3]), timeout=60)

        def sender_pairs(p: Any) -> list[str]:
            return sorted(ray.get(p.__ray_call__.remote(
                lambda s: [k for k, _ in s.senders["collective"].pairs.items()])))

        def receiver_pairs(d: Any) -> list[str]:
            return sorted(ray.get(d.__ray_call__.remote(
                lambda s: [k for k, _ in s.receivers["collective"].pairs.items()])))

        send(p0, eps[0], d0, "a")
        ray.kill(d0, no_restart=True)
        send(p0, eps[1], d1, "b")  # d0's replacement, say: its join sweeps
        until(lambda: sender_pairs(p0) == [ids["d1"]], "p0 ending its group with dead d0")
        ray.kill(p0, no_restart=True)
        send(p1, eps[1], d1, "c")  # p0's replacement joins d1
        until(lambda: receiver_pairs(d1) == [ids["p1"]], "d1 ending its group with dead p0")
        send(p1, eps[1], d1, "d")  # the live pair goes on
    finally:
        for end in (p0, p1, d0, d1):
            ray.kill(end, no_restart=True)
        if started_ray:  # the unit tests after this one run without Ray, as before
            ray.shutdown()
