"""``cuda-ipc``: the prefill worker writes blocks straight into the decode worker's cache.

The decode worker exports its engine's own KV cache (the caching allocator's dedicated
allocation for it, found in torch's memory snapshot, with the cache's offset inside it)
through a CUDA IPC memory handle once: no second pool. A prefill worker whose GPU is the
decode worker's opens the handle once (kvtransfer/ipc_mappings.py closes mappings of
replaced or long-idle workers) and, per transfer, runs one kernel that copies its
blocks into the reserved ones (kvtransfer/block_copy.py: no staging tensor), on a
stream of its own that first waits for the engine's stream, then waits for that copy's
event only -- not for the whole device. ``send`` returning means the data is in place
and the sender's blocks may be freed; the receiver has nothing left to fetch.

Ray gives each actor only its own GPU, so a prefill and a decode worker placed on two
GPUs cannot see each other's device (kvtransfer/pairing.py): for those pairs the backend
falls back to NCCL (kvtransfer/nccl.py) through the decode actor carried in the
endpoint, and the handle says ``nccl``. A visible but different GPU (no Ray isolation)
is copied through a staging tensor with the scatter launched on the remote device.
Not verified on hardware in this repository yet (see docs/kernels.md).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from kernels import gather_blocks, scatter_blocks
from kvtransfer.addresses import IpcAddress, NcclAddress
from kvtransfer.base import (
    Endpoint,
    KVReceiver,
    KVSender,
    KVSpec,
    KVTransferError,
    TransferHandle,
    check_counts,
    check_spec,
    torch_dtype,
)
from kvtransfer.block_copy import copy_blocks
from kvtransfer.ipc_mappings import IpcMappings
from kvtransfer.nccl import NcclReceiver, NcclSender
from kvtransfer.pairing import transfer_path
from kvtransfer.peer import PeerMessage
from kvtransfer.peer_sweep import own_actor


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - GPU machines only
        raise KVTransferError("the cuda-ipc backend needs cupy (cupy-cuda13x)") from e
    return cupy


def _as_torch(cupy: Any, ptr: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...],
              device: int) -> torch.Tensor:
    mem = cupy.cuda.UnownedMemory(ptr, nbytes, None, device)
    arr = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
    return torch.as_tensor(arr, device=f"cuda:{device}").view(dtype).view(shape)


def _device_uuid(device: int) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def allocation_of(ptr: int, device: int, segments: list[dict[str, Any]]) -> tuple[int, int]:
    """(base address, size) of the caching-allocator segment holding ``ptr``: IPC
    exports whole allocations, so the importer needs the tensor's offset in its own."""
    for seg in segments:
        base = seg["address"]
        if seg.get("device", device) == device and base <= ptr < base + seg["total_size"]:
            if seg.get("is_expandable"):  # virtual memory: cudaIpcGetMemHandle refuses it
                break
            return base, seg["total_size"]
    raise KVTransferError("cuda-ipc: the KV cache is not in a plain allocation of torch's "
                          "caching allocator (expandable segments?); it cannot be exported")


def _export(cache: torch.Tensor) -> tuple[bytes, int]:
    """The IPC handle of the allocation holding ``cache``, and the cache's offset in it."""
    if "expandable_segments:true" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").lower():
        raise KVTransferError("cuda-ipc cannot export memory of expandable segments: unset "
                              "expandable_segments in PYTORCH_CUDA_ALLOC_CONF")
    dev = cache.device.index if cache.device.index is not None else torch.cuda.current_device()
    base, _ = allocation_of(cache.data_ptr(), dev, torch.cuda.memory_snapshot())
    cupy = _cupy()
    with cupy.cuda.Device(dev):
        handle = cupy.cuda.runtime.ipcGetMemHandle(base)
    return bytes(handle), cache.data_ptr() - base


class CudaIpcReceiver(KVReceiver):
    backend = "cuda-ipc"

    def __init__(self) -> None:
        self.fallback = NcclReceiver()  # senders on another GPU push through NCCL

    def endpoint(self, cache: torch.Tensor, worker_id: str, spec: KVSpec) -> Endpoint:
        handle, offset = _export(cache)
        dev = cache.device.index if cache.device.index is not None else 0
        self.fallback.bind(cache.device, spec)
        return Endpoint(self.backend, worker_id, spec,
                        IpcAddress(handle, dev, _device_uuid(dev), cache.shape[0], offset,
                                   own_actor()))

    async def fetch(self, handle: TransferHandle, timeout_s: float) -> torch.Tensor | None:
        if handle.backend == "nccl":  # a sender on another GPU
            return await self.fallback.fetch(handle, timeout_s)
        return None  # the sender already wrote the blocks in place

    async def on_peer_message(self, message: PeerMessage) -> None:
        await self.fallback.on_peer_message(message)

    def cancel(self, request_id: str) -> None:
        self.fallback.cancel(request_id)


@dataclass(frozen=True)
class _Remote:
    cache: torch.Tensor  # the decode worker's cache, in this process
    base: int  # what ipcOpenMemHandle returned (closed with it)
    device: int


def _open(arg: tuple[IpcAddress, KVSpec, int]) -> _Remote:
    addr, spec, dev = arg
    cupy = _cupy()
    with cupy.cuda.Device(dev):
        base = cupy.cuda.runtime.ipcOpenMemHandle(addr.handle)
    shape = (addr.num_blocks, *spec.block_shape)
    nbytes = addr.num_blocks * spec.block_nbytes()
    return _Remote(_as_torch(cupy, base + addr.offset, nbytes, torch_dtype(spec), shape, dev),
                   base, dev)


def _close(remote: _Remote) -> None:
    cupy = _cupy()
    with cupy.cuda.Device(remote.device):
        cupy.cuda.runtime.ipcCloseMemHandle(remote.base)


class CudaIpcSender(KVSender):
    backend = "cuda-ipc"

    def __init__(self, worker_id: str = "prefill") -> None:
        self.worker_id = worker_id
        self.mappings: IpcMappings[_Remote] = IpcMappings(_open, _close)
        self._uuids: list[str] | None = None
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._nccl: NcclSender | None = None
        self.last_path: str | None = None  # "ipc" or "nccl" (the kit records it)

    def _path(self, dest: Endpoint) -> tuple[str, int | None]:
        if self._uuids is None:
            self._uuids = [_device_uuid(i) for i in range(torch.cuda.device_count())]
        addr: IpcAddress = dest.address
        return transfer_path(self._uuids, addr.device_uuid, addr.peer is not None,
                             dest.worker_id)

    def _fallback(self, dest: Endpoint) -> tuple[NcclSender, Endpoint]:
        if self._nccl is None:
            self._nccl = NcclSender(self.worker_id)
        return self._nccl, Endpoint("nccl", dest.worker_id, dest.spec,
                                    NcclAddress(dest.address.peer))

    async def prepare(self, dest: Endpoint, device: torch.device, timeout_s: float) -> None:
        if self._path(dest)[0] == "nccl":
            sender, nccl_dest = self._fallback(dest)
            await sender.prepare(nccl_dest, device, timeout_s)

    def send(
        self, cache: torch.Tensor, src_block_ids: list[int], dest: Endpoint,
        dest_block_ids: list[int], request_id: str,
    ) -> TransferHandle:
        check_counts(request_id, src_block_ids, dest_block_ids)
        check_spec(request_id, cache, dest)
        path, dev = self._path(dest)
        self.last_path = path
        if path == "nccl":
            sender, nccl_dest = self._fallback(dest)
            return sender.send(cache, src_block_ids, nccl_dest, dest_block_ids, request_id)
        assert dev is not None
        t0 = time.perf_counter()
        addr: IpcAddress = dest.address
        remote = self.mappings.get(dest.worker_id, addr.handle, (addr, dest.spec, dev)).cache
        if remote.device == cache.device:
            done = self._copy_same_gpu(cache, src_block_ids, remote, dest_block_ids)
        else:
            done = self._copy_across(cache, src_block_ids, remote, dest_block_ids)
        done.synchronize()  # this copy only: in place before the router starts decoding
        n = len(src_block_ids)
        # check_spec above: our blocks' spec is the destination's.
        return TransferHandle(request_id=request_id, backend=self.backend, spec=dest.spec,
                              num_blocks=n, nbytes=n * dest.spec.block_nbytes(),
                              send_seconds=time.perf_counter() - t0)

    def _copy_same_gpu(self, cache: torch.Tensor, src: list[int], remote: torch.Tensor,
                       dst: list[int]) -> torch.cuda.Event:
        dev = cache.device
        stream = self._streams.get(dev.index or 0)
        if stream is None:
            stream = self._streams[dev.index or 0] = torch.cuda.Stream(dev)
        # The step that wrote our blocks was queued on the engine's stream.
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            src_ids = torch.tensor(src, dtype=torch.int64, device=dev)
            dst_ids = torch.tensor(dst, dtype=torch.int64, device=dev)
            copy_blocks(cache, src_ids, remote, dst_ids)
            done = torch.cuda.Event()
            done.record(stream)
        return done

    def _copy_across(self, cache: torch.Tensor, src: list[int], remote: torch.Tensor,
                     dst: list[int]) -> torch.cuda.Event:
        staging = gather_blocks(cache, torch.tensor(src, dtype=torch.long, device=cache.device))
        with torch.cuda.device(remote.device):  # launch the scatter where the cache lives
            moved = staging.to(remote.device)
            scatter_blocks(remote, torch.tensor(dst, dtype=torch.long, device=remote.device),
                           moved)
            done = torch.cuda.Event()
            done.record()
        return done
