"""Triton KV-cache ops: store this step's K/V by slot, copy whole blocks to/from staging.

Slot s lives at block s // block_size, offset s % block_size of one layer's view
(num_blocks, 2, block_size, Hkv, D), whatever its strides. A block of the full
cross-layer cache (num_blocks, num_layers, 2, block_size, Hkv, D) is one contiguous
region, so gather/scatter are flat copies of ``block_numel`` elements per block id.

A quantized cache (kernels/kv_quant.py: int8 or fp8 rows of D values then their fp32
scale, so the last dimension is D + 4) is quantized on write by the store kernel (per
(token, head) absmax, the torch path's arithmetic, round half to even for int8); gather
and scatter copy its bytes, scales included.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_QUANT = (torch.int8, torch.float8_e4m3fn)
_BLOCK_DTYPES = _DTYPES + _QUANT  # what gather/scatter copy
_COPY_CHUNK = 4096  # elements per gather/scatter program


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr,
    s_kt, s_kh, s_kd,  # k (T, Hkv, D)
    s_vt, s_vh, s_vd,  # v (T, Hkv, D)
    s_cb, s_ckv, s_ct, s_ch, s_cd,  # cache (nb, 2, bs, Hkv, D)
    num_slots,
    HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr, IS_INT8: tl.constexpr, QMAX: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    # -1 marks padding; a slot past the cache is skipped too rather than corrupting memory.
    ok = (slot >= 0) & (slot < num_slots)
    slot = tl.where(ok, slot, 0)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < tl.where(ok, HKV, 0)) & (offs_d[None, :] < D)  # (BLOCK_H, BLOCK_D)
    k = tl.load(k_ptr + t * s_kt + offs_h[:, None] * s_kh + offs_d[None, :] * s_kd, mask=mask)
    v = tl.load(v_ptr + t * s_vt + offs_h[:, None] * s_vh + offs_d[None, :] * s_vd, mask=mask)
    row = cache_ptr + (slot // BS) * s_cb + (slot % BS) * s_ct + offs_h * s_ch  # (BLOCK_H,)
    dst = row[:, None] + offs_d[None, :] * s_cd
    if QUANT:
        h_mask = offs_h < tl.where(ok, HKV, 0)
        _store_quantized(dst, row + D, k.to(tl.float32), mask, h_mask, IS_INT8, QMAX)
        _store_quantized(dst + s_ckv, row + s_ckv + D, v.to(tl.float32), mask, h_mask,
                         IS_INT8, QMAX)
    else:
        tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + s_ckv, v.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_quantized(dst, scale_at, x, mask, h_mask, IS_INT8: tl.constexpr,
                     QMAX: tl.constexpr):
    """Rows x (BLOCK_H, BLOCK_D) fp32 -> values at dst, fp32 scales at scale_at (bytes
    after each row's values): s = absmax / QMAX, q = x / s (int8: rounded half to even,
    as torch.round; fp8: the conversion's own rounding), an all-zero row s = 0."""
    x = tl.where(mask, x, 0.0)
    s = tl.max(tl.abs(x), 1) / QMAX  # (BLOCK_H,)
    y = x / tl.where(s > 0.0, s, 1.0)[:, None]
    if IS_INT8:
        r = tl.floor(y + 0.5)
        tie_to_odd = ((r - y) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) == 1.0)
        y = tl.minimum(tl.maximum(tl.where(tie_to_odd, r - 1.0, r), -QMAX), QMAX)
    else:
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    tl.store(dst, y.to(dst.dtype.element_ty), mask=mask)
    tl.store(scale_at.to(tl.pointer_type(tl.float32)), s, mask=h_mask)


@triton.jit
def _copy_blocks_kernel(
    src_ptr, dst_ptr, ids_ptr,
    s_src, s_dst,  # stride between blocks of src / dst
    block_numel, num_blocks,
    GATHER: tl.constexpr, CHUNK: tl.constexpr,
):
    # One program copies CHUNK elements of one block; a 1-D grid avoids the 65535 limit
    # of the other grid axes.
    pid = tl.program_id(0)
    chunks = tl.cdiv(block_numel, CHUNK)
    i = (pid // chunks).to(tl.int64)  # index into block_ids and the staging buffer
    offs = (pid % chunks) * CHUNK + tl.arange(0, CHUNK)
    blk = tl.load(ids_ptr + i).to(tl.int64)
    ok = (blk >= 0) & (blk < num_blocks)
    mask = offs < tl.where(ok, block_numel, 0)
    if GATHER:  # cache[blk] -> staging[i]
        src = src_ptr + blk * s_src + offs
        dst = dst_ptr + i * s_dst + offs
    else:  # staging[i] -> cache[blk]
        src = src_ptr + i * s_src + offs
        dst = dst_ptr + blk * s_dst + offs
    x = tl.load(src, mask=mask)
    tl.store(dst, x.to(dst_ptr.dtype.element_ty), mask=mask)


def store_kv_triton(
    k: torch.Tensor,  # (T, Hkv, D), any strides
    v: torch.Tensor,  # (T, Hkv, D), any strides
    kv_cache: torch.Tensor,  # (num_blocks, 2, block_size, Hkv, D), one layer's strided view
    slot_mapping: torch.Tensor,  # (T,) int32/int64, -1 = skip
) -> None:
    """Write K/V rows into the cache at their slots (cast to the cache dtype)."""
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must both be (T, Hkv, D), got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    quant = kv_cache.dtype in _QUANT
    row = k.shape[2] + (4 if quant else 0)  # a quantized row: D values, then an fp32 scale
    if (kv_cache.dim() != 5 or kv_cache.shape[1] != 2 or kv_cache.shape[3] != k.shape[1]
            or kv_cache.shape[4] != row):
        raise ValueError(f"kv_cache {tuple(kv_cache.shape)} is not (num_blocks, 2, block_size, "
                         f"{k.shape[1]}, {row})")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be ({k.shape[0]},) int32/int64, got "
                         f"{tuple(slot_mapping.shape)} {slot_mapping.dtype}")
    if (kv_cache.dtype not in _BLOCK_DTYPES or k.dtype not in _DTYPES
            or v.dtype not in _DTYPES):
        raise ValueError(f"unsupported dtypes k={k.dtype} v={v.dtype} cache={kv_cache.dtype}")
    _same_device(kv_cache, k, v, slot_mapping)
    if quant and kv_cache.stride(4) != 1:
        raise ValueError("a quantized cache needs contiguous rows (values, then the scale)")
    nb, _, bs, hkv, _ = kv_cache.shape
    d = k.shape[2]
    if bs & (bs - 1):
        raise ValueError(f"block_size must be a power of two, got {bs}")
    if k.shape[0] == 0:
        return
    _store_kv_kernel[(k.shape[0],)](
        k, v, kv_cache, slot_mapping,
        *k.stride(), *v.stride(), *kv_cache.stride(),
        nb * bs,
        HKV=hkv, D=d, BS=bs,
        BLOCK_H=triton.next_power_of_2(hkv), BLOCK_D=triton.next_power_of_2(d),
        QUANT=quant, IS_INT8=kv_cache.dtype == torch.int8,
        QMAX=127.0 if kv_cache.dtype == torch.int8 else 448.0,
    )


def gather_blocks_triton(
    cache: torch.Tensor,  # (num_blocks, *block_shape): the full cross-layer cache
    block_ids: torch.Tensor,  # (n,) int
    out: torch.Tensor | None = None,  # (n, *block_shape), contiguous
) -> torch.Tensor:  # (n, *block_shape)
    """Copy whole blocks into a contiguous staging buffer (for shipping them)."""
    ids = _check_blocks(cache, block_ids)
    if out is None:
        out = torch.empty((ids.shape[0], *cache.shape[1:]), dtype=cache.dtype, device=cache.device)
    elif (out.shape != (ids.shape[0], *cache.shape[1:]) or out.dtype != cache.dtype
          or out.device != cache.device or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {(ids.shape[0], *cache.shape[1:])} "
                         f"{cache.dtype} tensor on {cache.device}, got {tuple(out.shape)} "
                         f"{out.dtype} on {out.device}")
    _copy(cache, out, ids, gather=True)
    return out


def scatter_blocks_triton(
    cache: torch.Tensor,  # (num_blocks, *block_shape)
    block_ids: torch.Tensor,  # (n,) int
    src: torch.Tensor,  # (n, *block_shape), contiguous
) -> None:
    """Copy a staging buffer of n whole blocks into the cache at block_ids."""
    ids = _check_blocks(cache, block_ids)
    if src.shape != (ids.shape[0], *cache.shape[1:]) or not src.is_contiguous():
        raise ValueError(f"src must be a contiguous {(ids.shape[0], *cache.shape[1:])} tensor, "
                         f"got {tuple(src.shape)}")
    if src.dtype not in _BLOCK_DTYPES or src.device != cache.device:
        raise ValueError(f"src must be a KV dtype on {cache.device}, got {src.dtype} on "
                         f"{src.device}")
    _copy(src, cache, ids, gather=False)


def _copy(src: torch.Tensor, dst: torch.Tensor, ids: torch.Tensor, gather: bool) -> None:
    n = ids.shape[0]
    numel = (src if gather else dst)[0].numel() if n else 0
    if n == 0 or numel == 0:
        return
    cache = src if gather else dst
    grid = (n * triton.cdiv(numel, _COPY_CHUNK),)
    _copy_blocks_kernel[grid](
        src, dst, ids, src.stride(0), dst.stride(0), numel, cache.shape[0],
        GATHER=gather, CHUNK=_COPY_CHUNK,
    )


def _check_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Validate the cache and ids; returns the ids on the cache's device."""
    if cache.dim() < 2 or cache.dtype not in _BLOCK_DTYPES:
        raise ValueError(f"cache must be a KV (num_blocks, *block_shape) tensor, got "
                         f"{tuple(cache.shape)} {cache.dtype}")
    if not cache[0].is_contiguous():
        raise ValueError("each block of the cache must be one contiguous region "
                         "(the block-major cross-layer layout)")
    if block_ids.dim() != 1 or block_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_ids must be a 1-D int tensor, got {tuple(block_ids.shape)} "
                         f"{block_ids.dtype}")
    if block_ids.device.type == "cpu" and block_ids.numel():
        # Host ids can be checked for free; device ids cannot without a sync, and the
        # kernel skips out-of-range ones instead of touching memory outside the cache.
        lo, hi = int(block_ids.min()), int(block_ids.max())
        if lo < 0 or hi >= cache.shape[0]:
            raise ValueError(f"block ids must be in [0, {cache.shape[0]}), got {lo}..{hi}")
    return block_ids.to(cache.device, non_blocking=True)


def _same_device(ref: torch.Tensor, *others: torch.Tensor) -> None:
    for t in others:
        if t.device != ref.device:
            raise ValueError(f"tensor on {t.device} but kv_cache on {ref.device}")
