"""Moving KV blocks between workers: one interface (base.py), four backends and a per-pair
choice of two of them.

- ``ray``: through the Ray object store (CPU, any node).
- ``cuda-ipc``: the decode worker's cache is opened by the prefill worker through CUDA
  IPC and written in place when both share a GPU; pairs on different GPUs fall back to
  NCCL (pairing.py).
- ``nccl``: NCCL point-to-point send/recv between GPUs (any node); its handshake goes
  through the receiving worker's KVPeer interface (peer.py). cupy; cuda-ipc's fallback.
- ``collective``: torch.distributed point-to-point send/recv over one 2-rank process
  group per (prefill, decode) pair -- gloo for CPU caches (CI runs it, across Ray
  actors and nodes), NCCL for CUDA caches: one code path (collective.py).
- ``ray+collective``: ``--kv-transfer auto`` on CPU, chosen per pair: ``ray`` within a
  Ray node, ``collective`` (gloo) across nodes (collective_auto.py says why).

Importing this package does not import torch; a backend's module loads with the
first make_sender / make_receiver for it.
"""

from __future__ import annotations

from kvtransfer.base import (
    Endpoint,
    KVReceiver,
    KVSender,
    KVSpec,
    KVTransferError,
    KVTransferTimeout,
    TransferHandle,
    check_handle,
    check_spec,
    sent_handle,
    spec_of,
    spec_of_blocks,
    torch_dtype,
)
from kvtransfer.peer import KVPeer, PeerMessage


def make_sender(backend: str, worker_id: str = "prefill") -> KVSender:
    if backend == "ray":
        from kvtransfer.ray_backend import RaySender

        return RaySender()
    if backend == "cuda-ipc":
        from kvtransfer.cuda_ipc import CudaIpcSender

        return CudaIpcSender(worker_id)  # its NCCL fallback names itself to the peer
    if backend == "nccl":
        from kvtransfer.nccl import NcclSender

        return NcclSender(worker_id)
    if backend == "collective":
        from kvtransfer.collective import CollectiveSender

        return CollectiveSender(worker_id)
    if backend == "ray+collective":
        from kvtransfer.collective_auto import PerPairSender

        return PerPairSender(worker_id)
    raise ValueError(f"unknown KV transfer backend {backend!r}")


def make_receiver(backend: str) -> KVReceiver:
    if backend == "ray":
        from kvtransfer.ray_backend import RayReceiver

        return RayReceiver()
    if backend == "cuda-ipc":
        from kvtransfer.cuda_ipc import CudaIpcReceiver

        return CudaIpcReceiver()
    if backend == "nccl":
        from kvtransfer.nccl import NcclReceiver

        return NcclReceiver()
    if backend == "collective":
        from kvtransfer.collective import CollectiveReceiver

        return CollectiveReceiver()
    if backend == "ray+collective":
        from kvtransfer.collective_auto import PerPairReceiver

        return PerPairReceiver()
    raise ValueError(f"unknown KV transfer backend {backend!r}")


__all__ = [
    "Endpoint",
    "KVPeer",
    "KVReceiver",
    "KVSender",
    "KVSpec",
    "KVTransferError",
    "KVTransferTimeout",
    "PeerMessage",
    "TransferHandle",
    "check_handle",
    "check_spec",
    "make_receiver",
    "make_sender",
    "sent_handle",
    "spec_of",
    "spec_of_blocks",
    "torch_dtype",
]
