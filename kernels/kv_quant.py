"""Quantized KV rows: int8 (CPU and GPU) or fp8 e4m3 (GPU) values with their fp32 scale.

A quantized cache keeps engine.kv_layout's block-major shape, only its last dimension
grows from ``head_dim`` to ``head_dim + SCALE_BYTES``: each (block, layer, K/V,
token slot, kv head) row is ``head_dim`` one-byte values followed by the 4 bytes of
the row's fp32 scale. So a block's scales lie inside the block, and everything that
moves whole blocks (gather/scatter, every kvtransfer backend, a spill tier) moves the
scales with them without knowing they exist.

Scales are dynamic and per row (absmax of the row / the format's largest value): a
token is quantized once, when it is stored, and never again -- a per-block scale would
have to re-quantize the block whenever a later token raises its absmax. The cost is
4 bytes per head_dim values: 6.25 % at head_dim 64, 3.1 % at 128 (docs/kernels.md).

Row ``x`` of D values is stored as ``q = round(x / s)`` (int8, clamped to +-127) or
``q = fp8(x / s)`` with ``s = absmax(x) / QMAX``; it reads back as ``q * s``. An
all-zero row has ``s = 0`` and reads back as zeros. The native CPU kernel
(cpu_native.c) does the same arithmetic in the same order, so both paths store the
same bytes.
"""

from __future__ import annotations

import torch

SCALE_BYTES = 4  # one fp32 scale after each row of values
SCALE_LAYOUT = "fp32-per-token-head"  # what KVSpec.scales says of a quantized cache
QUANT_DTYPES: tuple[torch.dtype, ...] = (torch.int8, torch.float8_e4m3fn)
_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def is_quantized(dtype: torch.dtype) -> bool:
    """Whether a cache of this storage dtype holds quantized rows with trailing scales."""
    return dtype in QUANT_DTYPES


def row_len(head_dim: int, dtype: torch.dtype) -> int:
    """Elements of one (token, head) row of a cache of this storage dtype."""
    return head_dim + SCALE_BYTES if is_quantized(dtype) else head_dim


def head_dim_of(cache: torch.Tensor) -> int:
    """head_dim of a cache (or staging buffer) whose last dimension is its rows."""
    return cache.shape[-1] - (SCALE_BYTES if is_quantized(cache.dtype) else 0)


def scales(rows: torch.Tensor) -> torch.Tensor:
    """(..., 1) fp32 view of the scales of quantized rows (..., D + SCALE_BYTES): a
    view, so writing it writes the rows."""
    return rows[..., rows.shape[-1] - SCALE_BYTES:].view(torch.float32)


def values(rows: torch.Tensor) -> torch.Tensor:
    """(..., D) view of the quantized values of rows (..., D + SCALE_BYTES)."""
    return rows[..., : rows.shape[-1] - SCALE_BYTES]


def quantize(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows (..., D) of any float dtype -> (..., D + SCALE_BYTES) rows of ``dtype``."""
    qmax = _QMAX[dtype]
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True) / qmax  # (..., 1) fp32
    # Division (not a multiply by 1/s): what the native kernel does, bit for bit.
    y = xf / torch.where(s > 0, s, torch.ones_like(s))
    out = torch.empty((*x.shape[:-1], x.shape[-1] + SCALE_BYTES), dtype=dtype, device=x.device)
    if dtype is torch.int8:
        values(out).copy_(y.round().clamp_(-qmax, qmax))
    else:
        values(out).copy_(y.clamp_(-qmax, qmax))
    scales(out).copy_(s)
    return out


def dequantize(rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Quantized rows (..., D + SCALE_BYTES) -> (..., D) values of ``dtype``."""
    return (values(rows).float() * scales(rows)).to(dtype)


def read_rows(cache: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A cache's rows as ``dtype`` values: dequantized if quantized, else as they are."""
    return dequantize(cache, dtype) if is_quantized(cache.dtype) else cache
