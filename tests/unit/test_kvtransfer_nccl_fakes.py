"""The NCCL backend, and cuda-ipc's NCCL fallback, end to end on CPU through a fake NCCL.

The fake matches each send with the receive posted for it and copies the bytes between
the two buffers' memory, so KV really moves; streams and events are fakes that record
which stream every buffer was allocated on and handed to. What is checked: the bytes,
the stream discipline (defect 2), and that nothing hangs or leaks when a join, a post,
a send or a receive goes wrong (defect 3)."""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import kvtransfer.nccl as nccl_mod
from kvtransfer.addresses import IpcAddress, NcclAddress
from kvtransfer.base import Endpoint, KVSpec, KVTransferError, KVTransferTimeout
from kvtransfer.cuda_ipc import CudaIpcReceiver, CudaIpcSender
from kvtransfer.nccl import NcclConnect, NcclReceiver, NcclRecv, NcclSender

SPEC = KVSpec((2, 2, 4, 2, 8), "float32", 4)  # (layers, K/V, block size, heads, dim)
DEV = torch.device("cpu")


@dataclass
class Op:
    ptr: int
    nbytes: int
    done: bool = False


class Wire:
    """One pair's link: the n-th send completes with the n-th receive, bytes copied."""

    def __init__(self) -> None:
        self.sends: deque[Op] = deque()
        self.recvs: deque[Op] = deque()
        self.hold = False  # True: nothing completes (a peer that never matches)

    def post(self, queue: deque[Op], op: Op) -> None:
        queue.append(op)
        self.match()

    def match(self) -> None:
        while self.sends and self.recvs and not self.hold:
            s, r = self.sends.popleft(), self.recvs.popleft()
            assert s.nbytes == r.nbytes
            ctypes.memmove(r.ptr, s.ptr, s.nbytes)
            s.done = r.done = True


_ids = itertools.count(1)


@dataclass
class FakeStream:
    cuda_stream: int = field(default_factory=lambda: next(_ids))
    ops: list[Op] = field(default_factory=list)


@dataclass
class FakeEvent:
    ops: list[Op]

    def query(self) -> bool:
        return all(o.done for o in self.ops)


class FakeComm:
    def __init__(self, wire: Wire, rank: int, streams: dict[int, FakeStream]) -> None:
        self.wire, self.rank, self.streams = wire, rank, streams
        self.aborted = False

    def _op(self, ptr: int, nbytes: int, stream: int) -> Op:
        assert not self.aborted, "used after abort"
        op = Op(ptr, nbytes)
        self.streams[stream].ops.append(op)
        return op

    def send(self, ptr: int, nbytes: int, dtype: int, peer: int, stream: int) -> None:
        assert (dtype, peer, self.rank) == (1, 1, 0)
        self.wire.post(self.wire.sends, self._op(ptr, nbytes, stream))

    def recv(self, ptr: int, nbytes: int, dtype: int, peer: int, stream: int) -> None:
        assert (dtype, peer, self.rank) == (1, 0, 1)
        self.wire.post(self.wire.recvs, self._op(ptr, nbytes, stream))

    def abort(self) -> None:
        self.aborted = True


class Fakes:
    """Installs the fake NCCL and CUDA seams; records what the backend did with them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.streams: dict[int, FakeStream] = {}
        self.wires: dict[tuple[int, ...], Wire] = {}
        self.comms: list[FakeComm] = []
        self.allocated_on: dict[int, int] = {}  # buffer data_ptr -> stream id
        self.handed: list[int] = []  # buffers handed to the consumer's stream
        self.ordered: list[tuple[int, int]] = []  # (stream id, tensor data_ptr)
        self.join_gate: Callable[[int], None] = lambda rank: None
        self.uid = itertools.count()
        m = monkeypatch
        m.setattr(nccl_mod, "_nccl", lambda: SimpleNamespace(
            NCCL_UINT8=1, get_unique_id=lambda: (next(self.uid),)))
        m.setattr(nccl_mod, "_new_stream", self.new_stream)
        m.setattr(nccl_mod, "_record", lambda s: FakeEvent(list(s.ops)))
        m.setattr(nccl_mod, "_alloc_on", self.alloc_on)
        m.setattr(nccl_mod, "_hand_to_current_stream", lambda b: self.handed.append(b.data_ptr()))
        m.setattr(nccl_mod, "_order_after_current",
                  lambda s, t: self.ordered.append((s.cuda_stream, t.data_ptr())))
        m.setattr(nccl_mod, "_new_comm", self.new_comm)
        m.setattr(nccl_mod, "_to_peer", self.to_peer)
        m.setattr(nccl_mod, "_wait_peer", self.wait_peer)

    def new_stream(self, device: torch.device) -> FakeStream:
        s = FakeStream()
        self.streams[s.cuda_stream] = s
        return s

    def alloc_on(self, stream: FakeStream, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
        buf = torch.full(shape, float("nan"), dtype=dtype)  # poisoned: every byte must come
        self.allocated_on[buf.data_ptr()] = stream.cuda_stream
        return buf

    def new_comm(self, uid: tuple[int, ...], rank: int, device: torch.device) -> FakeComm:
        self.join_gate(rank)
        comm = FakeComm(self.wires.setdefault(uid, Wire()), rank, self.streams)
        self.comms.append(comm)
        return comm

    def to_peer(self, peer: Any, message: Any) -> Any:
        """What the decode actor's kv_peer does (hand the message to its receiver), run
        at once; its outcome stands in for the call's ObjectRef."""
        assert isinstance(message, NcclRecv | NcclConnect)
        try:
            return asyncio.run(peer.on_peer_message(message))
        except Exception as e:
            return e

    def wait_peer(self, ref: Any, timeout_s: float) -> Any:
        if isinstance(ref, Exception):
            raise ref
        return ref

    def wire(self) -> Wire:
        return self.wires[next(reversed(self.wires))]


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[Fakes]:
    yield Fakes(monkeypatch)


def pair(timeout_s: float = 2.0) -> tuple[NcclSender, NcclReceiver, Endpoint, torch.Tensor]:
    rx = NcclReceiver(timeout_s)
    rx.bind(DEV, SPEC)
    tx = NcclSender("p0", timeout_s)
    cache = torch.randn(10, *SPEC.block_shape)
    return tx, rx, Endpoint("nccl", "d0", SPEC, NcclAddress(rx)), cache


def fetch(rx: Any, handle: Any, timeout_s: float = 2.0) -> Any:
    return asyncio.run(rx.fetch(handle, timeout_s))


def test_blocks_arrive_exactly_with_buffers_on_the_pairs_stream(fakes: Fakes) -> None:
    tx, rx, dest, cache = pair()
    handle = tx.send(cache, [3, 1, 7], dest, [5, 6, 2], "r1")
    assert handle.backend == "nccl" and handle.num_blocks == 3
    buf = fetch(rx, handle)
    assert torch.equal(buf, cache[[3, 1, 7]])
    recv_stream = rx.peers.get("p0").stream.cuda_stream  # type: ignore[union-attr]
    assert fakes.allocated_on[buf.data_ptr()] == recv_stream  # not the default stream
    assert fakes.handed == [buf.data_ptr()]  # recorded on the consumer before use
    assert fakes.ordered[0][0] == tx.peers.get("d0").stream.cuda_stream  # type: ignore[union-attr]
    assert rx.pending.num_buffers() == 0
    handle2 = tx.send(cache, [2], dest, [9], "r2")  # the pair is reused, not rebuilt
    assert torch.equal(fetch(rx, handle2), cache[[2]])
    assert len(fakes.comms) == 2


def test_one_join_per_peer_however_many_sends_prepare_at_once(fakes: Fakes) -> None:
    tx, _, dest, _ = pair()
    fakes.join_gate = lambda rank: time.sleep(0.2)
    peers: list[Any] = []
    threads = [threading.Thread(target=lambda: peers.append(tx.peer(dest, DEV)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(peers) == 3 and all(p is peers[0] for p in peers)
    assert [c.rank for c in fakes.comms] == [1, 0]


def test_a_join_that_never_completes_times_out_without_blocking_the_caller(
        fakes: Fakes) -> None:
    tx, _, dest, _ = pair()
    release = threading.Event()
    fakes.join_gate = lambda rank: rank == 0 and release.wait(5)
    t0 = time.monotonic()
    with pytest.raises(KVTransferTimeout, match="NCCL set-up with d0"):
        asyncio.run(tx.prepare(dest, DEV, 0.3))
    assert time.monotonic() - t0 < 2
    release.set()
    for _ in range(100):
        if len(fakes.comms) == 2 and fakes.comms[1].aborted:
            break
        time.sleep(0.01)
    assert fakes.comms[1].rank == 0 and fakes.comms[1].aborted  # the late one is ended
    assert tx.peers.get("d0") is None


def test_a_receive_that_cannot_be_posted_ends_the_pair_and_the_next_send_rebuilds_it(
        fakes: Fakes) -> None:
    tx, rx, dest, cache = pair()
    tx.peer(dest, DEV)
    rx.abort_peer("p0")  # the decode side lost its communicator
    with pytest.raises(KVTransferError, match="no NCCL communicator with p0"):
        tx.send(cache, [1], dest, [2], "r1")
    assert tx.peers.aborted == ["d0"]
    handle = tx.send(cache, [4], dest, [2], "r2")  # a fresh join, then the transfer
    assert torch.equal(fetch(rx, handle), cache[[4]])


def test_a_send_never_matched_times_out_and_the_receiver_sweeps_its_side(
        fakes: Fakes) -> None:
    tx, rx, dest, cache = pair(timeout_s=0.2)
    tx.peer(dest, DEV)
    fakes.wire().hold = True
    with pytest.raises(KVTransferTimeout, match="NCCL send did not complete"):
        tx.send(cache, [1, 2], dest, [3, 4], "r1")
    assert tx.peers.aborted == ["d0"]
    assert rx.pending.requests() == ["r1"]
    time.sleep(0.25)
    rx.sweep()  # stuck past the timeout: the receiver aborts its communicator too
    assert rx.peers.aborted == ["p0"] and rx.pending.num_buffers() == 0


def test_an_aborted_request_does_not_leak_its_posted_receive(fakes: Fakes) -> None:
    tx, rx, dest, cache = pair()
    tx.peer(dest, DEV)
    wire = fakes.wire()
    wire.hold = True
    rx.post_recv("r1", "p0", 2)
    rx.cancel("r1")  # the decode worker's abort
    assert rx.pending.requests() == [] and rx.pending.num_buffers() == 1
    peer = tx.peers.get("d0")
    assert peer is not None
    peer.comm.send(cache.data_ptr(), 2 * SPEC.block_nbytes(), 1, 1, peer.stream.cuda_stream)
    wire.hold = False
    wire.match()  # the prefill's send lands after all
    rx.sweep()
    assert rx.pending.num_buffers() == 0 and rx.peers.aborted == []


def test_a_fetch_that_times_out_aborts_the_pair_and_keeps_no_buffer(fakes: Fakes) -> None:
    tx, rx, dest, _ = pair()
    tx.peer(dest, DEV)
    rx.post_recv("r1", "p0", 1)
    handle = SimpleNamespace(request_id="r1")
    with pytest.raises(KVTransferTimeout, match=r"did not complete within 0\.1s"):
        fetch(rx, handle, 0.1)
    assert rx.peers.aborted == ["p0"] and rx.pending.num_buffers() == 0
    with pytest.raises(KVTransferError, match="no NCCL communicator"):
        rx.post_recv("r2", "p0", 1)


def test_a_new_join_replaces_the_old_communicator_and_fails_its_receives(
        fakes: Fakes) -> None:
    _, rx, _, _ = pair()
    asyncio.run(rx.connect("p0", (1,)))
    rx.post_recv("r1", "p0", 1)
    asyncio.run(rx.connect("p0", (2,)))
    assert fakes.comms[0].aborted and not fakes.comms[1].aborted
    with pytest.raises(KVTransferError, match="no NCCL receive is posted"):
        fetch(rx, SimpleNamespace(request_id="r1"))


def test_cuda_ipc_falls_back_to_nccl_for_a_decode_worker_on_another_gpu(
        fakes: Fakes) -> None:
    receiver = CudaIpcReceiver()
    receiver.fallback.bind(DEV, SPEC)
    addr = IpcAddress(b"h", 0, "GPU-decode", 16, 0, receiver)
    dest = Endpoint("cuda-ipc", "d0", SPEC, addr)
    sender = CudaIpcSender("p0")
    sender._uuids = ["GPU-prefill"]  # Ray shows each actor only its own GPU
    cache = torch.randn(8, *SPEC.block_shape)
    asyncio.run(sender.prepare(dest, DEV, 2.0))
    handle = sender.send(cache, [5, 2], dest, [1, 3], "r1")
    assert sender.last_path == "nccl" and handle.backend == "nccl"
    assert torch.equal(fetch(receiver, handle), cache[[5, 2]])
    receiver.cancel("r-unknown")  # the decode worker's abort reaches the fallback
