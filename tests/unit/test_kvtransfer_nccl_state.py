"""The NCCL backend's books (kvtransfer/nccl_state.py) with fake events and a fake clock:
buffers stay referenced while NCCL may write them, aborted requests leak nothing, a
stuck receive names its peer, communicators are aborted and replaced."""

from __future__ import annotations

import threading
import time

import pytest

from kvtransfer.nccl_state import PeerComms, PendingReceives, call_with_timeout
from messages.transfer import KVTransferError, KVTransferTimeout


class FakeEvent:
    def __init__(self, done: bool = False) -> None:
        self.done = done

    def query(self) -> bool:
        return self.done


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def books() -> tuple[PendingReceives, Clock]:
    clock = Clock()
    return PendingReceives(timeout_s=30.0, clock=clock), clock


def test_a_fetch_takes_its_receive_once() -> None:
    p, _ = books()
    ev = FakeEvent()
    p.add("r1", "p0", "buf1", ev)
    with pytest.raises(KVTransferError, match="already posted"):
        p.add("r1", "p0", "buf2", ev)
    rx = p.take("r1")
    assert rx is not None and rx.buffer == "buf1" and rx.peer_id == "p0"
    assert p.take("r1") is None
    assert p.num_buffers() == 0


def test_an_aborted_request_keeps_its_buffer_only_until_the_receive_completes() -> None:
    p, _ = books()
    done, running = FakeEvent(done=True), FakeEvent()
    p.add("finished", "p0", "b1", done)
    p.add("in-flight", "p0", "b2", running)
    assert p.cancel("finished") and p.num_buffers() == 1  # completed: dropped at once
    assert p.cancel("in-flight") and p.requests() == []
    assert p.num_buffers() == 1  # NCCL may still write b2: kept
    assert p.sweep() == set()
    running.done = True
    assert p.sweep() == set() and p.num_buffers() == 0
    assert not p.cancel("never-posted")


def test_a_receive_stuck_past_the_timeout_names_its_peer() -> None:
    p, clock = books()
    p.add("r1", "p0", "b1", FakeEvent())
    p.add("r2", "p1", "b2", FakeEvent(done=True))  # completed, nobody fetched it
    clock.t += 29
    assert p.sweep() == set()
    clock.t += 2
    assert p.sweep() == {"p0"}
    assert p.requests() == ["r1"]  # r2's unfetched buffer went; r1 waits for the abort
    assert p.drop_peer("p0") == ["r1"]
    assert p.num_buffers() == 0


def test_a_timed_out_fetch_hands_the_buffer_back_until_its_peer_is_aborted() -> None:
    p, clock = books()
    p.add("r1", "p0", "b1", FakeEvent())
    p.add("r2", "p0", "b2", FakeEvent())
    p.add("r3", "p1", "b3", FakeEvent())
    rx = p.take("r1")
    assert rx is not None
    p.orphan(rx)
    clock.t += 31
    assert p.sweep() == {"p0", "p1"}
    assert p.drop_peer("p0") == ["r2"]  # r1 (orphaned) and r2 are released with p0
    assert p.num_buffers() == 1 and p.requests() == ["r3"]


def test_peer_comms_abort_the_old_communicator_when_replaced() -> None:
    aborted: list[str] = []
    comms: PeerComms[str] = PeerComms(aborted.append)
    comms.put("p0", "comm-a", "stream-a")
    comms.put("p0", "comm-b", "stream-b")
    assert aborted == ["comm-a"]
    peer = comms.get("p0")
    assert peer is not None and (peer.comm, peer.stream) == ("comm-b", "stream-b")
    assert comms.abort("p0") and not comms.abort("p0")
    assert aborted == ["comm-a", "comm-b"] and comms.aborted == ["p0", "p0"]
    assert "p0" not in comms


def test_call_with_timeout_returns_or_gives_up_and_aborts_a_late_result() -> None:
    assert call_with_timeout(lambda: 7, 5.0, "quick") == 7
    with pytest.raises(ValueError, match="boom"):
        call_with_timeout(lambda: (_ for _ in ()).throw(ValueError("boom")), 5.0, "raising")
    release, late = threading.Event(), []

    def slow() -> str:
        release.wait(5)
        return "comm"

    t0 = time.monotonic()
    with pytest.raises(KVTransferTimeout, match=r"NCCL join did not finish within 0\.2s"):
        call_with_timeout(slow, 0.2, "NCCL join", late.append)
    assert time.monotonic() - t0 < 2
    release.set()
    for _ in range(100):
        if late:
            break
        time.sleep(0.01)
    assert late == ["comm"]  # the communicator that came too late is handed to abort
