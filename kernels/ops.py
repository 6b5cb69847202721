"""Device dispatch for the kernels: Triton on CUDA, the torch path elsewhere.

Wrappers check shapes and dtypes here, once, so both implementations can assume them.
"""

from __future__ import annotations

import torch

from kernels import cpu_native
from kernels.kv_quant import is_quantized, row_len
from kernels.metadata import AttentionMetadata
from kernels.ref_attention import paged_attention_torch
from kernels.ref_cache import gather_blocks_torch, scatter_blocks_torch, store_kv_torch
from kernels.ref_layers import rms_norm_torch, rotary_torch, silu_and_mul_torch


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda


def _check_cache(kv_cache: torch.Tensor, hkv: int, d: int, dtype: torch.dtype) -> None:
    """A quantized cache (kernels.kv_quant) passes for any ``dtype``: its rows are
    head_dim values plus their scale, read back in the activations' dtype."""
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2:
        raise ValueError(f"kv_cache must be (num_blocks, 2, block_size, Hkv, D), got "
                         f"{tuple(kv_cache.shape)}")
    row = row_len(d, kv_cache.dtype)
    if kv_cache.shape[3] != hkv or kv_cache.shape[4] != row:
        raise ValueError(f"kv_cache heads/row {tuple(kv_cache.shape[3:])} != ({hkv}, {row})")
    if kv_cache.dtype != dtype and not is_quantized(kv_cache.dtype):
        raise ValueError(f"kv_cache dtype {kv_cache.dtype} != {dtype}")


def paged_attention(
    q: torch.Tensor,  # (T, Hq, D)
    kv_cache: torch.Tensor,  # (num_blocks, 2, block_size, Hkv, D), one layer's view
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # (T, Hq, D)
    """Attention of this step's queries over paged KV (see kernels.metadata)."""
    if q.dim() != 3:
        raise ValueError(f"q must be (T, Hq, D), got {tuple(q.shape)}")
    _check_cache(kv_cache, kv_cache.shape[3], q.shape[2], q.dtype)
    if q.shape[1] % kv_cache.shape[3]:
        raise ValueError(f"Hq={q.shape[1]} is not a multiple of Hkv={kv_cache.shape[3]}")
    if _use_triton(q):
        from kernels.triton_attention import paged_attention_triton

        return paged_attention_triton(q, kv_cache, meta, scale, out)
    return paged_attention_torch(q, kv_cache, meta, scale, out)


def store_kv(
    k: torch.Tensor,  # (T, Hkv, D)
    v: torch.Tensor,  # (T, Hkv, D)
    kv_cache: torch.Tensor,  # (num_blocks, 2, block_size, Hkv, D)
    slot_mapping: torch.Tensor,  # (T,) int, -1 = skip
) -> None:
    """Write this step's K/V into the cache at their slots."""
    if k.shape != v.shape or k.dim() != 3 or slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"store_kv shapes k={tuple(k.shape)} v={tuple(v.shape)} "
                         f"slots={tuple(slot_mapping.shape)}")
    _check_cache(kv_cache, k.shape[1], k.shape[2], kv_cache.dtype)
    if _use_triton(k):
        from kernels.triton_cache import store_kv_triton

        store_kv_triton(k, v, kv_cache, slot_mapping)
        return
    store_kv_torch(k, v, kv_cache, slot_mapping)


def rotary_store_kv(
    q: torch.Tensor,  # (T, Hq, D)
    k: torch.Tensor,  # (T, Hkv, D)
    v: torch.Tensor,  # (T, Hkv, D)
    positions: torch.Tensor,  # (T,) int
    cos_sin: torch.Tensor,  # (max_pos, D)
    kv_cache: torch.Tensor,  # (num_blocks, 2, block_size, Hkv, D)
    slot_mapping: torch.Tensor,  # (T,) int, -1 = skip
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary`` then ``store_kv`` of the rotated k: returns the rotated (q, k).

    On CPU fp32 one native call does both, rotating q and k **in place** (pass tensors
    the caller owns, such as views of the qkv projection's output); elsewhere the two
    ops run and return new tensors. The results are bit-identical either way.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be (T, Hq, D), got {tuple(q.shape)}")
    t, _, d = q.shape
    if (k.shape != v.shape or k.dim() != 3 or k.shape[0] != t or k.shape[2] != d
            or positions.shape != (t,) or slot_mapping.shape != (t,)
            or cos_sin.shape[1] != d):
        raise ValueError(f"rotary_store_kv shapes q={tuple(q.shape)} k={tuple(k.shape)} "
                         f"v={tuple(v.shape)} positions={tuple(positions.shape)} "
                         f"slots={tuple(slot_mapping.shape)} cos_sin={tuple(cos_sin.shape)}")
    _check_cache(kv_cache, k.shape[1], d, kv_cache.dtype)
    if cpu_native.supports_rotary_store(q, k, v, positions, cos_sin, kv_cache, slot_mapping):
        cpu_native.rotary_store_native(q, k, v, positions, cos_sin, kv_cache, slot_mapping)
        return q, k
    q, k = rotary(q, k, positions, cos_sin)
    store_kv(k, v, kv_cache, slot_mapping)
    return q, k


def gather_blocks(
    cache: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Copy whole blocks (all layers, K and V) into a contiguous (n, ...) staging buffer."""
    if out is not None and (out.shape[1:] != cache.shape[1:] or out.shape[0] != len(block_ids)):
        raise ValueError(f"staging buffer {tuple(out.shape)} does not fit {len(block_ids)} blocks "
                         f"of {tuple(cache.shape[1:])}")
    if _use_triton(cache):
        from kernels.triton_cache import gather_blocks_triton

        return gather_blocks_triton(cache, block_ids, out)
    return gather_blocks_torch(cache, block_ids, out)


def scatter_blocks(cache: torch.Tensor, block_ids: torch.Tensor, src: torch.Tensor) -> None:
    """Copy a staging buffer of n whole blocks into the cache at block_ids."""
    if src.shape[1:] != cache.shape[1:] or src.shape[0] != len(block_ids):
        raise ValueError(f"source {tuple(src.shape)} does not fit {len(block_ids)} blocks "
                         f"of {tuple(cache.shape[1:])}")
    if _use_triton(cache):
        from kernels.triton_cache import scatter_blocks_triton

        scatter_blocks_triton(cache, block_ids, src)
        return
    scatter_blocks_torch(cache, block_ids, src)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm of x (+ residual first when given); returns (normed, x + residual)."""
    if _use_triton(x):
        from kernels.triton_layers import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_torch(x, weight, eps, residual)


def rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding of q (T, Hq, D) and k (T, Hkv, D) at positions (T,)."""
    if _use_triton(q):
        from kernels.triton_layers import rotary_triton

        return rotary_triton(q, k, positions, cos_sin)
    return rotary_torch(q, k, positions, cos_sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """(T, 2I) [gate | up] -> (T, I)."""
    if _use_triton(x):
        from kernels.triton_layers import silu_and_mul_triton

        return silu_and_mul_triton(x)
    return silu_and_mul_torch(x)
