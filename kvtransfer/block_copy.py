"""Copy whole KV blocks from one cache straight into another: ``dst[dst_ids] = src[src_ids]``.

The cuda-ipc sender writes the prefill worker's blocks into the decode worker's cache
(opened through CUDA IPC, on the same GPU) with this one kernel: no staging tensor, one
pass over the bytes. Both caches are in engine.kv_layout's layout, so a block is one
contiguous region of ``block_numel`` elements and block ``i`` starts at ``i *
block_numel``. On CPU tensors (tests, the kit's dry run) a torch index_select /
index_copy_ does the same.

Quantized caches (``--kv-cache-dtype int8``/``fp8``, kernels/kv_quant.py): each (token,
head) row is head_dim one-byte values followed by its fp32 scale, inside the block. So
this copy, ``kernels.gather_blocks``/``scatter_blocks``, every backend and any other
mover of whole blocks (the prefix cache's spill tier, a collective backend) carry the
scales with the blocks as long as they copy whole blocks byte for byte: never slice a
quantized block to head_dim, never cast it (``.to(float)`` of int8 values drops the
scales' meaning); dequantize with ``kv_quant.dequantize`` when float values are needed.
Both ends' caches must have the same KVSpec (dtype and scale layout): senders call
``kvtransfer.base.check_spec`` before moving anything.
"""

from __future__ import annotations

from typing import Any

import torch

_CHUNK = 4096  # elements per program: 8 KiB of bf16, enough to keep loads 16 bytes wide


def copy_blocks(src: torch.Tensor, src_ids: torch.Tensor, dst: torch.Tensor,
                dst_ids: torch.Tensor) -> None:
    """Copy blocks ``src_ids`` of ``src`` into blocks ``dst_ids`` of ``dst`` (same block
    shape and dtype; ids int32/int64 on the caches' device). Ids out of range are
    skipped by the GPU kernel rather than written outside a cache (checking them on
    the host would cost a sync)."""
    if src.shape[1:] != dst.shape[1:] or src.dtype != dst.dtype:
        raise ValueError(f"caches differ: {tuple(src.shape)} {src.dtype} vs "
                         f"{tuple(dst.shape)} {dst.dtype}")
    if src_ids.shape != dst_ids.shape or src_ids.dim() != 1:
        raise ValueError(f"block id lists differ: {tuple(src_ids.shape)} vs "
                         f"{tuple(dst_ids.shape)}")
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError("both caches must be contiguous (block-major layout)")
    if src.device != dst.device or src_ids.device != src.device or dst_ids.device != src.device:
        raise ValueError(f"caches and ids must share a device: {src.device}, {dst.device}, "
                         f"{src_ids.device}, {dst_ids.device}")
    n = src_ids.shape[0]
    if n == 0:
        return
    if not src.is_cuda and not _interpreted():
        dst.index_copy_(0, dst_ids.long(), src.index_select(0, src_ids.long()))
        return
    import triton

    numel = src[0].numel()
    grid = (n * triton.cdiv(numel, _CHUNK),)
    _kernel()[grid](src, dst, src_ids, dst_ids, numel, src.shape[0], dst.shape[0],
                    CHUNK=_CHUNK)


def gather_request(cache: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
    """A request's blocks, gathered into one contiguous (n, *block_shape) buffer: what
    the staging backends (collective) send in one operation. One place, so a change to
    what a block carries reaches every backend that stages."""
    from kernels import gather_blocks

    return gather_blocks(cache, torch.tensor(block_ids, dtype=torch.long, device=cache.device))


def _interpreted() -> bool:
    """CPU tensors go through the Triton kernel only under the interpreter (tests)."""
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


_compiled = None


def _kernel() -> Any:  # a triton JITFunction
    """The kernel, defined on first use: triton reads TRITON_INTERPRET when ``jit``
    wraps the function, and importing this module must not need triton at all."""
    global _compiled
    if _compiled is not None:
        return _compiled
    import triton
    import triton.language as tl

    @triton.jit
    def copy_blocks_kernel(src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr, block_numel,
                           src_blocks, dst_blocks, CHUNK: tl.constexpr):
        # One program copies CHUNK elements of one block; a 1-D grid stays clear of the
        # 65535 limit of the other grid axes for large transfers.
        pid = tl.program_id(0)
        chunks = tl.cdiv(block_numel, CHUNK)
        i = (pid // chunks).to(tl.int64)
        offs = (pid % chunks).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
        s = tl.load(src_ids_ptr + i).to(tl.int64)
        d = tl.load(dst_ids_ptr + i).to(tl.int64)
        ok = (s >= 0) & (s < src_blocks) & (d >= 0) & (d < dst_blocks)
        mask = offs < tl.where(ok, block_numel, 0)
        s = tl.where(ok, s, 0)
        d = tl.where(ok, d, 0)
        x = tl.load(src_ptr + s * block_numel + offs, mask=mask)
        tl.store(dst_ptr + d * block_numel + offs, x, mask=mask)

    _compiled = copy_blocks_kernel
    return _compiled
