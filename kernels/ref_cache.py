"""Torch path of the KV cache ops: store new K/V by slot, gather/scatter whole blocks.

Slot s of a cache lives at block s // block_size, offset s % block_size. A slot of -1
marks a padding token whose K/V must not be written. A quantized cache
(kernels.kv_quant) is written quantized; gather/scatter move its rows, scales included,
as bytes.
"""

from __future__ import annotations

import torch

from kernels.kv_quant import is_quantized, quantize


def store_kv_torch(
    k: torch.Tensor,  # (T, Hkv, D)
    v: torch.Tensor,  # (T, Hkv, D)
    kv_cache: torch.Tensor,  # (num_blocks, 2, block_size, Hkv, D), any strides
    slot_mapping: torch.Tensor,  # (T,) int, -1 = skip
) -> None:
    bs = kv_cache.shape[2]
    slots = slot_mapping.long()
    if (slots < 0).any():
        keep = slots >= 0
        slots, k, v = slots[keep], k[keep], v[keep]
    idx = (slots // bs, slots % bs)
    # index_put_ on the K and V views: mixed int/tensor indexing of the 5-d strided cache
    # takes a slow generic path (hundreds of times slower on CPU).
    if is_quantized(kv_cache.dtype):  # quantize on write: rows of values + their scale
        k, v = quantize(k, kv_cache.dtype), quantize(v, kv_cache.dtype)
    kv_cache[:, 0].index_put_(idx, k.to(kv_cache.dtype))
    kv_cache[:, 1].index_put_(idx, v.to(kv_cache.dtype))


def gather_blocks_torch(
    cache: torch.Tensor,  # (num_blocks, *block_shape): the full cross-layer cache
    block_ids: torch.Tensor,  # (n,) int
    out: torch.Tensor | None = None,  # (n, *block_shape), contiguous
) -> torch.Tensor:
    ids = block_ids.to(cache.device, torch.long)
    if out is None:
        return cache.index_select(0, ids)
    torch.index_select(cache, 0, ids, out=out)
    return out


def scatter_blocks_torch(
    cache: torch.Tensor,  # (num_blocks, *block_shape)
    block_ids: torch.Tensor,  # (n,) int
    src: torch.Tensor,  # (n, *block_shape)
) -> None:
    cache.index_copy_(0, block_ids.to(cache.device, torch.long), src.to(cache.dtype))
