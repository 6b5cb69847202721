"""A dead peer's NCCL communicator, stream and receive buffers are released by the
workers that survive it (kvtransfer/nccl.py's sweeps, kvtransfer/peer_sweep.py).

The fake NCCL and CUDA seams of tests/unit/test_kvtransfer_nccl_fakes.py; each worker's
actor is a fake handle whose ``__ray_ready__`` answers as Ray would for a live, dead or
unreachable actor, so the real ``peer_alive`` decides. Sweeps run on the test's event
loop, as they would on the worker's; the engine thread's sends run on a thread.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import ray
import torch

import kvtransfer.nccl as nccl_mod
from kvtransfer.addresses import NcclAddress
from kvtransfer.base import Endpoint
from kvtransfer.nccl import NcclConnect, NcclReceiver, NcclSender
from kvtransfer.peer_sweep import SweepSchedule
from tests.unit.test_kvtransfer_nccl_fakes import DEV, SPEC, FakeComm, Fakes


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[Fakes]:
    monkeypatch.setattr(nccl_mod, "PROBE_TIMEOUT_S", 0.05, raising=False)  # silent: soon
    yield Fakes(monkeypatch)


class Actor:
    """A worker's actor handle: ``on_peer_message`` reaches its receiver (if any), and
    ``__ray_ready__.remote()`` answers as Ray does for an actor in ``state``."""

    def __init__(self, receiver: NcclReceiver | None = None) -> None:
        self.receiver = receiver
        self.state = "alive"  # or "dead", "unavailable", "silent"
        self.__ray_ready__ = SimpleNamespace(remote=self._ready)

    async def on_peer_message(self, message: Any) -> None:
        assert self.receiver is not None
        await self.receiver.on_peer_message(message)

    async def _ready(self) -> None:
        if self.state == "dead":
            raise ray.exceptions.ActorDiedError()
        if self.state == "unavailable":  # restarting, or its node not yet declared lost
            raise ray.exceptions.ActorUnavailableError("unreachable", None)
        if self.state == "silent":
            await asyncio.Event().wait()


def decode(worker_id: str) -> tuple[Actor, Endpoint]:
    rx = NcclReceiver(2.0)
    rx.bind(DEV, SPEC)
    actor = Actor(rx)
    return actor, Endpoint("nccl", worker_id, SPEC, NcclAddress(actor))


def prefill(worker_id: str) -> NcclSender:
    tx = NcclSender(worker_id, 2.0)
    tx.actor = Actor()  # what own_actor finds inside a Ray actor
    return tx


async def transfer(tx: NcclSender, ep: Endpoint, rid: str) -> None:
    """One request's KV, as a prefill worker sends it: prepare on the loop, send on the
    engine thread, the decode worker fetches."""
    cache = torch.randn(4, *SPEC.block_shape)
    await tx.prepare(ep, DEV, 2.0)
    handle = await asyncio.to_thread(tx.send, cache, [3, 1], ep, [0, 1], rid)
    rx = ep.address.peer.receiver
    assert torch.equal(await rx.fetch(handle, 2.0), cache[[3, 1]])


async def quiet(sweeps: SweepSchedule) -> None:
    """Until no sweep runs or is due after a join (bounded: the sender's take its lock
    on threads), so the books read next are what the last sweep left."""
    for _ in range(500):
        task = sweeps._task
        if (task is None or task.done()) and not sweeps._requested:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("a sweep never ended")


def held(books: Any) -> list[str]:
    return sorted(peer_id for peer_id, _ in books.items())


def comm(books: Any, peer_id: str) -> FakeComm:
    return books.get(peer_id).comm  # type: ignore[no-any-return]


def test_a_prefill_worker_aborts_only_the_communicators_of_decode_workers_ray_reports_dead(
        fakes: Fakes) -> None:
    (a0, ep0), (_, ep1), (a2, ep2), (a3, ep3) = (decode(f"d{i}") for i in range(4))
    _, ep4 = decode("d4")
    tx = prefill("p0")

    async def go() -> None:
        for i, ep in enumerate((ep0, ep1, ep2, ep3)):
            await transfer(tx, ep, f"r{i}")
        await quiet(tx.sweeps)  # the joins' own: everyone answered
        assert tx.sweeps.finished >= 1
        assert held(tx.peers) == ["d0", "d1", "d2", "d3"]
        comms = {d: comm(tx.peers, d) for d in ("d0", "d1", "d2", "d3")}
        a0.state, a2.state, a3.state = "dead", "unavailable", "silent"
        # The router never sends to d0 again: only its replacement's join tells.
        await transfer(tx, ep4, "r4")
        await quiet(tx.sweeps)
        assert held(tx.peers) == ["d1", "d2", "d3", "d4"]  # dead: gone; unsure: kept
        assert comms["d0"].aborted
        assert not any(comms[d].aborted for d in ("d1", "d2", "d3"))
        assert tx.peers.aborted == ["d0"]
        await transfer(tx, ep1, "r5")  # a live pair goes on, on its first communicator
        assert comm(tx.peers, "d1") is comms["d1"]

    asyncio.run(go())


def test_a_decode_worker_releases_a_dead_prefill_workers_communicator_and_buffers(
        fakes: Fakes) -> None:
    rx = NcclReceiver(2.0)
    rx.bind(DEV, SPEC)
    senders = {f"p{i}": Actor() for i in range(4)}
    uids = itertools.count(100)

    async def go() -> None:
        for peer_id, actor in list(senders.items())[:3]:
            await rx.connect(peer_id, (next(uids),), actor)
        await quiet(rx.sweeps)
        assert held(rx.peers) == ["p0", "p1", "p2"]
        # p0 died between posting its receives and sending: nothing will match them.
        rx.post_recv("r0", "p0", 2)
        rx.post_recv("r1", "p0", 1)
        rx.post_recv("r2", "p1", 1)
        rx.cancel("r1")  # an aborted request's receive, kept while NCCL may write it
        assert rx.pending.num_buffers() == 3
        dead, unsure = comm(rx.peers, "p0"), comm(rx.peers, "p2")
        senders["p0"].state, senders["p2"].state = "dead", "silent"
        await rx.on_peer_message(NcclConnect("p3", (next(uids),), senders["p3"]))
        await quiet(rx.sweeps)
        assert held(rx.peers) == ["p1", "p2", "p3"]
        assert dead.aborted and not unsure.aborted
        assert rx.pending.requests() == ["r2"]  # p0's dropped, after its abort
        assert rx.pending.num_buffers() == 1

    asyncio.run(go())


def test_a_sender_with_no_actor_is_never_released(fakes: Fakes) -> None:
    rx = NcclReceiver(2.0)
    rx.bind(DEV, SPEC)

    async def go() -> None:
        await rx.connect("p0", (1,))  # an older sender's NcclConnect carries none
        await rx.connect("p1", (2,), Actor())
        await quiet(rx.sweeps)
        assert rx.sweeps.finished >= 1
        assert held(rx.peers) == ["p0", "p1"] and rx.peers.aborted == []

    asyncio.run(go())


def test_a_communicator_rebuilt_while_the_sweep_asked_ray_is_not_touched(
        fakes: Fakes) -> None:
    rx = NcclReceiver(2.0)
    rx.bind(DEV, SPEC)
    old, new = Actor(), Actor()
    asked = asyncio.Event()
    answer = asyncio.Event()

    async def slow_death() -> None:
        asked.set()
        await answer.wait()
        raise ray.exceptions.ActorDiedError()

    async def go() -> None:
        await rx.connect("p0", (1,), old)
        await quiet(rx.sweeps)
        old.__ray_ready__ = SimpleNamespace(remote=slow_death)
        rx.sweeps.request()
        assert rx.sweeps.maybe_start(rx.sweep_dead)
        await asyncio.wait_for(asked.wait(), 5)
        await rx.connect("p0", (2,), new)  # the sender started over meanwhile
        rebuilt = comm(rx.peers, "p0")
        answer.set()
        await quiet(rx.sweeps)  # that sweep, and the one the new join asked for
        assert rx.sweeps.finished == 3
        assert comm(rx.peers, "p0") is rebuilt and not rebuilt.aborted

    asyncio.run(go())


def test_the_sender_sweeps_while_transfers_go_on_and_spares_a_communicator_in_use(
        fakes: Fakes) -> None:
    (a0, ep0), (_, ep1) = decode("d0"), decode("d1")
    tx = prefill("p0")
    now = [0.0]
    tx.sweeps = SweepSchedule(interval_s=60.0, clock=lambda: now[0])

    async def go() -> None:
        await transfer(tx, ep0, "r0")
        await transfer(tx, ep1, "r1")
        await quiet(tx.sweeps)
        swept = tx.sweeps.finished
        a0.state = "dead"  # no join follows: only the interval finds it
        await transfer(tx, ep1, "r2")
        await quiet(tx.sweeps)
        assert held(tx.peers) == ["d0", "d1"] and tx.sweeps.finished == swept  # not due
        d0 = tx.peers.get("d0")
        assert d0 is not None
        d0.in_use.acquire()  # a send to d0 is under way on the engine thread
        now[0] = 61.0
        await transfer(tx, ep1, "r3")
        await quiet(tx.sweeps)
        assert tx.sweeps.finished == swept + 1
        assert held(tx.peers) == ["d0", "d1"] and not d0.comm.aborted  # left to that send
        d0.in_use.release()
        now[0] = 122.0
        await transfer(tx, ep1, "r4")
        await quiet(tx.sweeps)
        assert held(tx.peers) == ["d1"] and d0.comm.aborted

    asyncio.run(go())


def test_a_send_that_finds_its_communicator_released_fails_without_using_it(
        fakes: Fakes) -> None:
    a0, ep0 = decode("d0")
    tx = prefill("p0")

    async def go() -> None:
        await transfer(tx, ep0, "r0")
        peer = tx.peers.get("d0")
        assert peer is not None
        a0.state = "dead"
        await tx.sweep_dead()
        assert "d0" not in tx.peers and peer.comm.aborted
        with pytest.raises(nccl_mod.KVTransferError, match="was ended"):
            tx._use(peer, "d0", "r1")  # a send that took the peer before the sweep

    asyncio.run(go())


def test_the_receiver_sweeps_while_receives_are_posted(fakes: Fakes) -> None:
    rx = NcclReceiver(2.0)
    rx.bind(DEV, SPEC)
    now = [0.0]
    rx.sweeps = SweepSchedule(interval_s=60.0, clock=lambda: now[0])
    p0, p1 = Actor(), Actor()

    async def go() -> None:
        await rx.connect("p0", (1,), p0)
        await rx.connect("p1", (2,), p1)
        await quiet(rx.sweeps)
        p0.state = "dead"  # no sender joins after: only the interval finds it
        rx.post_recv("r0", "p1", 1)
        await quiet(rx.sweeps)
        assert held(rx.peers) == ["p0", "p1"]  # not due yet
        now[0] = 61.0
        rx.post_recv("r1", "p1", 1)
        await quiet(rx.sweeps)
        assert held(rx.peers) == ["p1"] and rx.pending.requests() == ["r0", "r1"]

    asyncio.run(go())
