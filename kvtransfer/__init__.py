"""Moving KV blocks between workers: one interface (base.py), three backends.

- ``ray``: through the Ray object store (CPU, any node).
- ``cuda-ipc``: the decode worker's cache is opened by the prefill worker through CUDA
  IPC and written in place (same node, same or different GPU).
- ``nccl``: NCCL point-to-point send/recv between GPUs (any node).
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
)


def make_sender(backend: str, worker_id: str = "prefill") -> KVSender:
    if backend == "ray":
        from kvtransfer.ray_backend import RaySender

        return RaySender()
    if backend == "cuda-ipc":
        from kvtransfer.cuda_ipc import CudaIpcSender

        return CudaIpcSender()
    if backend == "nccl":
        from kvtransfer.nccl import NcclSender

        return NcclSender(worker_id)
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
    raise ValueError(f"unknown KV transfer backend {backend!r}")


__all__ = [
    "Endpoint",
    "KVReceiver",
    "KVSender",
    "KVSpec",
    "KVTransferError",
    "KVTransferTimeout",
    "TransferHandle",
    "check_handle",
    "make_receiver",
    "make_sender",
]
