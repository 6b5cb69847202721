"""``nccl``: NCCL point-to-point send/recv between GPUs (same node or across nodes).

One 2-rank communicator per (prefill, decode) pair, created on first use: the prefill
worker makes a unique id, sends the decode worker a NcclConnect (through its KVPeer
actor handle, carried in the Endpoint; see peer.py) to join as rank 1, and joins as
rank 0. Per transfer (push model, so the two sides' p2p calls can never be issued in
different orders):

    prefill (engine thread)                 decode (actor)
    gather blocks -> staging
    NcclRecv(id, n) to the peer -------->   post recv into a staging buffer on its
                                            stream (before any await: call order is
                                            post order), remember it under id
    send staging on its stream
    wait for the send to complete           ...
    (its blocks may be freed now)
                                            start(id): fetch() waits for the recv
                                            (timeout), returns the staging buffer, the
                                            worker scatters it into reserved blocks

NCCL cannot put two ranks on one GPU, so this backend needs two GPUs; one GPU uses
cuda-ipc. Not verified on hardware in this repository yet (see docs/kernels.md).
"""

from __future__ import annotations

import asyncio
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
    sent_handle,
    torch_dtype,
)
from kvtransfer.peer import PeerMessage, to_peer


def _nccl() -> Any:
    try:
        from cupy.cuda import nccl
    except ImportError as e:  # pragma: no cover - GPU machines only
        raise KVTransferError("the nccl backend needs cupy with NCCL (cupy-cuda12x)") from e
    return nccl


@dataclass(frozen=True)
class NcclConnect(PeerMessage):
    """Join ``peer_id``'s communicator as rank 1."""

    peer_id: str
    unique_id: tuple[int, ...]


@dataclass(frozen=True)
class NcclRecv(PeerMessage):
    """Post the receive of ``num_blocks`` blocks ``peer_id`` is about to send."""

    request_id: str
    peer_id: str
    num_blocks: int


class NcclReceiver(KVReceiver):
    backend = "nccl"

    def __init__(self) -> None:
        self._comms: dict[str, Any] = {}  # prefill worker id -> communicator
        self._pending: dict[str, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self._device: torch.device | None = None
        self._stream: torch.cuda.Stream | None = None
        self._spec: KVSpec | None = None

    def endpoint(self, cache: torch.Tensor, worker_id: str, spec: KVSpec) -> Endpoint:
        self._device = cache.device
        self._stream = torch.cuda.Stream(cache.device)
        self._spec = spec
        # Senders reach us through the actor we run in; it must implement KVPeer.
        actor = ray.get_runtime_context().current_actor
        return Endpoint(self.backend, worker_id, spec, NcclAddress(actor))

    async def on_peer_message(self, message: PeerMessage) -> None:
        if isinstance(message, NcclRecv):  # posted before any await: call order is post order
            self.post_recv(message.request_id, message.peer_id, message.num_blocks)
        elif isinstance(message, NcclConnect):  # blocking NCCL init, off the event loop
            await asyncio.to_thread(self.connect, message.peer_id, message.unique_id)
        else:
            await super().on_peer_message(message)

    def connect(self, peer_id: str, unique_id: tuple[int, ...]) -> None:
        """Join the pair's communicator as rank 1 (blocks until rank 0 joins)."""
        nccl = _nccl()
        with torch.cuda.device(self._device):
            self._comms[peer_id] = nccl.NcclCommunicator(2, unique_id, 1)

    def post_recv(self, request_id: str, peer_id: str, num_blocks: int) -> None:
        """Post the receive now (stream-ordered); fetch() waits for it."""
        nccl = _nccl()
        assert self._stream is not None and self._spec is not None
        buf = torch.empty((num_blocks, *self._spec.block_shape), dtype=torch_dtype(self._spec),
                          device=self._device)
        comm = self._comms[peer_id]
        comm.recv(buf.data_ptr(), buf.numel() * buf.element_size(),
                  getattr(nccl, "NCCL_UINT8", 1), 0, self._stream.cuda_stream)
        done = torch.cuda.Event()
        done.record(self._stream)
        self._pending[request_id] = (buf, done)

    async def fetch(self, handle: TransferHandle, timeout_s: float) -> torch.Tensor:
        item = self._pending.pop(handle.request_id, None)
        if item is None:
            raise KVTransferError(f"request {handle.request_id}: no NCCL receive was posted")
        buf, done = item
        deadline = time.monotonic() + timeout_s
        while not done.query():  # poll: a blocked event loop would stall every request
            if time.monotonic() > deadline:
                raise KVTransferTimeout(f"request {handle.request_id}: NCCL receive did not "
                                        f"complete within {timeout_s}s")
            await asyncio.sleep(0.0005)
        return buf


class NcclSender(KVSender):
    backend = "nccl"

    def __init__(self, worker_id: str = "prefill") -> None:
        self.worker_id = worker_id
        self._comms: dict[str, Any] = {}
        self._stream: torch.cuda.Stream | None = None

    def _comm(self, dest: Endpoint, device: torch.device) -> Any:
        comm = self._comms.get(dest.worker_id)
        if comm is not None:
            return comm
        nccl = _nccl()
        uid = nccl.get_unique_id()
        joined = to_peer(dest.address.peer, NcclConnect(self.worker_id, uid))
        with torch.cuda.device(device):
            comm = nccl.NcclCommunicator(2, uid, 0)  # returns once rank 1 joined too
        ray.get(joined)
        self._comms[dest.worker_id] = comm
        return comm

    def send(
        self, cache: torch.Tensor, src_block_ids: list[int], dest: Endpoint,
        dest_block_ids: list[int], request_id: str,
    ) -> TransferHandle:
        check_counts(request_id, src_block_ids, dest_block_ids)
        nccl = _nccl()
        t0 = time.perf_counter()
        comm = self._comm(dest, cache.device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(cache.device)
        ids = torch.tensor(src_block_ids, dtype=torch.long, device=cache.device)
        staging = gather_blocks(cache, ids)
        # The receive must be posted before our send can complete; the call returns once
        # it is posted (the decode worker does it before its first await).
        ray.get(to_peer(dest.address.peer,
                        NcclRecv(request_id, self.worker_id, len(src_block_ids))))
        self._stream.wait_stream(torch.cuda.current_stream(cache.device))
        comm.send(staging.data_ptr(), staging.numel() * staging.element_size(),
                  getattr(nccl, "NCCL_UINT8", 1), 1, self._stream.cuda_stream)
        self._stream.synchronize()  # sent: staging and the source blocks may be reused
        return sent_handle(request_id, self.backend, dest, staging, t0)
