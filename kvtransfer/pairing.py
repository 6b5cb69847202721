"""Which way a prefill worker's KV reaches a decode worker: CUDA IPC, or NCCL.

Ray gives each GPU actor a ``CUDA_VISIBLE_DEVICES`` with only its own GPU. A prefill
worker can open the decode worker's cache through CUDA IPC only if that GPU is one of
its visible devices -- in practice only when both hold a share of the same GPU. A
prefill on GPU 0 and a decode on GPU 1 (which Ray's packing produces with 2P+2D at 0.5
GPU on two GPUs) cannot see each other's device: for them the ``cuda-ipc`` backend
falls back to NCCL point-to-point, which needs two different GPUs -- exactly that case.
Torch-free: decisions on device UUID strings, tested on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from messages.transfer import KVTransferError

Path = Literal["ipc", "nccl"]


def visible_index(local_uuids: Sequence[str], remote_uuid: str) -> int | None:
    """The index, in this process's numbering, of the GPU with ``remote_uuid``, or None
    when this process cannot see it."""
    for i, uuid in enumerate(local_uuids):
        if uuid == remote_uuid:
            return i
    return None


def transfer_path(local_uuids: Sequence[str], remote_uuid: str, has_peer: bool,
                  worker_id: str) -> tuple[Path, int | None]:
    """('ipc', device index) when the decode worker's GPU is visible here; ('nccl',
    None) when it is not and its endpoint offers the NCCL fallback (``has_peer``);
    KVTransferError otherwise."""
    idx = visible_index(local_uuids, remote_uuid)
    if idx is not None:
        return "ipc", idx
    if has_peer:
        return "nccl", None
    raise KVTransferError(f"cuda-ipc: decode worker {worker_id}'s GPU ({remote_uuid}) is not "
                          "visible here and its endpoint offers no NCCL fallback")
