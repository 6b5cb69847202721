"""``ray+collective``: what ``--kv-transfer auto`` runs on CPU -- chosen per pair.

A prefill worker sends to a decode worker on its own Ray node through the object store
(``ray``), and to one on another node through gloo (``collective``). Measured on this
project's CPU machine (docs/benchmarks.md, bench/results/transfer-cpu.json): within a
node the object store is as fast as gloo at 1 MiB and faster for large KV (one copy into
shared memory, mapped by the reader), and it frees the sender's blocks without waiting
for the receiver; across nodes gloo moves 1-8 MiB (prompts of tens to hundreds of
tokens) 2-3x faster than Ray's pull between object stores.

The decode worker's endpoint carries its node id and its collective address; every
handle names the backend that sent it, so the receiver hands it to that one. Both
sub-backends run their sends off the engine thread on CPU.
"""

from __future__ import annotations

import ray
import torch

from kvtransfer.addresses import PerPairAddress
from kvtransfer.base import Endpoint, KVReceiver, KVSender, KVSpec, TransferHandle
from kvtransfer.collective import CollectiveReceiver, CollectiveSender
from kvtransfer.peer import PeerMessage
from kvtransfer.ray_backend import RayReceiver, RaySender

BACKEND = "ray+collective"


def _node_id() -> str:
    return str(ray.get_runtime_context().get_node_id())


def sub_endpoint(dest: Endpoint) -> Endpoint:
    """The collective endpoint inside a ray+collective one."""
    addr = dest.address
    assert isinstance(addr, PerPairAddress), addr
    return Endpoint("collective", dest.worker_id, dest.spec, addr.collective)


class PerPairReceiver(KVReceiver):
    backend = BACKEND

    def __init__(self) -> None:
        self.ray = RayReceiver()
        self.collective = CollectiveReceiver()

    def endpoint(self, cache: torch.Tensor, worker_id: str, spec: KVSpec) -> Endpoint:
        coll = self.collective.endpoint(cache, worker_id, spec)
        return Endpoint(self.backend, worker_id, spec, PerPairAddress(_node_id(), coll.address))

    async def fetch(self, handle: TransferHandle, timeout_s: float) -> torch.Tensor | None:
        rx: KVReceiver = self.collective if handle.backend == "collective" else self.ray
        return await rx.fetch(handle, timeout_s)

    def cancel(self, request_id: str) -> None:
        self.collective.cancel(request_id)

    async def on_peer_message(self, message: PeerMessage) -> None:
        await self.collective.on_peer_message(message)


class PerPairSender(KVSender):
    backend = BACKEND
    send_off_engine_thread = True  # both paths are, on CPU

    def __init__(self, worker_id: str = "prefill") -> None:
        self.ray = RaySender()
        self.collective = CollectiveSender(worker_id)
        self._node: str | None = None

    def same_node(self, dest: Endpoint) -> bool:
        if self._node is None:
            self._node = _node_id()
        addr = dest.address
        return isinstance(addr, PerPairAddress) and addr.node_id == self._node

    async def prepare(self, dest: Endpoint, device: torch.device, timeout_s: float) -> None:
        if not self.same_node(dest):
            await self.collective.prepare(sub_endpoint(dest), device, timeout_s)

    def send(
        self, cache: torch.Tensor, src_block_ids: list[int], dest: Endpoint,
        dest_block_ids: list[int], request_id: str,
    ) -> TransferHandle:
        if self.same_node(dest):
            return self.ray.send(cache, src_block_ids, dest, dest_block_ids, request_id)
        return self.collective.send(cache, src_block_ids, sub_endpoint(dest), dest_block_ids,
                                    request_id)
