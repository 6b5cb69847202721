"""``cuda-ipc``: the prefill worker writes blocks straight into the decode worker's cache.

The decode worker allocates its KV cache as one dedicated cudaMalloc (through cupy, not
torch's caching allocator, so the IPC handle's base address is the cache's first byte)
and publishes a CUDA IPC memory handle once. Each prefill worker opens it once and, per
transfer, copies its blocks into the reserved ones: ``remote[dest] = local[src]`` (one
gather/scatter on the GPU), then synchronizes, so ``send`` returning means the data is
in place and the sender's blocks may be freed. The receiver has nothing left to fetch.
Works on one node, whether the two workers share a GPU (fractional num_gpus) or not
(peer access). Not verified on hardware in this repository yet (see docs/kernels.md).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from engine.kv_layout import KVLayout
from kernels import gather_blocks, scatter_blocks
from kvtransfer.addresses import IpcAddress
from kvtransfer.base import (
    Endpoint,
    KVReceiver,
    KVSender,
    KVSpec,
    KVTransferError,
    TransferHandle,
    check_counts,
    sent_handle,
    torch_dtype,
)


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - GPU machines only
        raise KVTransferError("the cuda-ipc backend needs cupy (pip install cupy-cuda12x)") from e
    return cupy


def _as_torch(cupy: Any, ptr: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...],
              device: int, owner: Any) -> torch.Tensor:
    mem = cupy.cuda.UnownedMemory(ptr, nbytes, owner)
    arr = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
    return torch.as_tensor(arr, device=f"cuda:{device}").view(dtype).view(shape)


def _device_uuid(device: int) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


class CudaIpcReceiver(KVReceiver):
    backend = "cuda-ipc"

    def __init__(self) -> None:
        self._memory: Any = None  # keeps the cudaMalloc alive as long as the worker

    def allocate(self, layout: KVLayout, device: torch.device) -> torch.Tensor:
        """The decode worker's KV cache, in memory that can be exported through IPC."""
        cupy = _cupy()
        dev = device.index if device.index is not None else torch.cuda.current_device()
        nbytes = layout.num_blocks * layout.bytes_per_block
        with cupy.cuda.Device(dev):
            self._memory = cupy.cuda.Memory(nbytes)  # a plain cudaMalloc
            cupy.cuda.runtime.memset(self._memory.ptr, 0, nbytes)
        return _as_torch(cupy, self._memory.ptr, nbytes, layout.dtype, layout.shape, dev,
                         self._memory)

    def endpoint(self, cache: torch.Tensor, worker_id: str, spec: KVSpec) -> Endpoint:
        if self._memory is None or cache.data_ptr() != self._memory.ptr:
            raise KVTransferError("cuda-ipc: the cache was not allocated by CudaIpcReceiver")
        cupy = _cupy()
        handle = cupy.cuda.runtime.ipcGetMemHandle(self._memory.ptr)
        dev = cache.device.index or 0
        return Endpoint(self.backend, worker_id, spec,
                        IpcAddress(bytes(handle), dev, _device_uuid(dev), cache.shape[0]))

    async def fetch(self, handle: TransferHandle, timeout_s: float) -> None:
        return None  # the sender already wrote the blocks in place


class CudaIpcSender(KVSender):
    backend = "cuda-ipc"

    def __init__(self) -> None:
        self._opened: dict[str, torch.Tensor] = {}  # worker_id -> its cache, opened once

    def _remote_cache(self, dest: Endpoint, local: torch.Tensor) -> torch.Tensor:
        cached = self._opened.get(dest.worker_id)
        if cached is not None:
            return cached
        addr: IpcAddress = dest.address
        cupy = _cupy()
        # The decode worker's GPU as this process numbers it (CUDA_VISIBLE_DEVICES differs).
        dev = next((i for i in range(torch.cuda.device_count())
                    if _device_uuid(i) == addr.device_uuid), None)
        if dev is None:
            raise KVTransferError(f"cuda-ipc: decode worker {dest.worker_id}'s GPU is not "
                                  "visible here; use the nccl backend across nodes")
        with cupy.cuda.Device(dev):
            ptr = cupy.cuda.runtime.ipcOpenMemHandle(addr.handle)
        shape = (addr.num_blocks, *dest.spec.block_shape)
        nbytes = addr.num_blocks * dest.spec.block_nbytes()
        remote = _as_torch(cupy, ptr, nbytes, torch_dtype(dest.spec), shape, dev, None)
        self._opened[dest.worker_id] = remote
        return remote

    def send(
        self, cache: torch.Tensor, src_block_ids: list[int], dest: Endpoint,
        dest_block_ids: list[int], request_id: str,
    ) -> TransferHandle:
        check_counts(request_id, src_block_ids, dest_block_ids)
        t0 = time.perf_counter()
        remote = self._remote_cache(dest, cache)
        src = torch.tensor(src_block_ids, dtype=torch.long, device=cache.device)
        dst = torch.tensor(dest_block_ids, dtype=torch.long, device=remote.device)
        staging = gather_blocks(cache, src)
        scatter_blocks(remote, dst, staging.to(remote.device, non_blocking=True))
        torch.cuda.synchronize(cache.device)  # in place before the router starts decoding
        return sent_handle(request_id, self.backend, dest, staging, t0)
