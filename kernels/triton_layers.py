"""Triton versions of the small fused ops: RMSNorm (+residual), rotary, SiLU-and-mul.

Numerics follow the torch path (kernels.ref_layers): the residual sum is rounded to the
activation dtype before the norm, norm statistics are fp32, and the normed value is
rounded to the activation dtype before the weight multiplies it. Rotary and SiLU compute
in fp32 and round once, which is at least as accurate as the torch path's bf16 steps.
All ops return new tensors and leave their inputs untouched, like the torch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    s_x, s_res, s_out, s_res_out,  # row strides (the hidden dim is contiguous)
    eps,
    H: tl.constexpr, BLOCK_H: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    x = tl.load(x_ptr + row * s_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * s_res + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * s_res_out + offs, x, mask=mask)
    h = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(h * h, 0) / H + eps)
    normed = (h * inv).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * s_out + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    x_ptr, out_ptr, pos_ptr, cs_ptr,
    s_xt, s_xh,  # x (T, H, D); D contiguous
    s_ot, s_oh,
    s_cs,  # cos_sin row stride
    H: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_f = tl.arange(0, BLOCK_HALF)
    f_mask = offs_f < HALF
    cos = tl.load(cs_ptr + pos * s_cs + offs_f, mask=f_mask, other=0.0)[None, :]  # (1, HALF)
    sin = tl.load(cs_ptr + pos * s_cs + HALF + offs_f, mask=f_mask, other=0.0)[None, :]
    mask = (offs_h[:, None] < H) & f_mask[None, :]  # (BLOCK_H, BLOCK_HALF)
    src = x_ptr + t * s_xt + offs_h[:, None] * s_xh + offs_f[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    # rotate_half: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]
    dst = out_ptr + t * s_ot + offs_h[:, None] * s_oh + offs_f[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, s_x, s_out, inter,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(x_ptr + row * s_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * s_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * s_out + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor,  # (..., H)
    weight: torch.Tensor,  # (H,)
    eps: float,
    residual: torch.Tensor | None = None,  # (..., H); when given, x + residual is normed
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (normed, x + residual or None); normed has the dtype weight * x promotes to."""
    if x.dim() < 1 or x.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise ValueError(f"x must be a float tensor (..., H), got {tuple(x.shape)} {x.dtype}")
    h = x.shape[-1]
    if weight.shape != (h,) or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous ({h},) tensor, got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype}")
    _same_device(x, weight, *(() if residual is None else (residual,)))
    x2 = _rows(x)  # (T, H)
    res2 = _rows(residual) if residual is not None else x2
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res_out = torch.empty_like(x2) if residual is not None else out
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, res2, weight, out, res_out,
            x2.stride(0), res2.stride(0), out.stride(0), res_out.stride(0),
            float(eps),
            H=h, BLOCK_H=triton.next_power_of_2(h), HAS_RESIDUAL=residual is not None,
        )
    new_residual = res_out.view(x.shape) if residual is not None else None
    return out.view(x.shape), new_residual


def rotary_triton(
    q: torch.Tensor,  # (T, Hq, D)
    k: torch.Tensor,  # (T, Hkv, D)
    positions: torch.Tensor,  # (T,) int, each < cos_sin.shape[0]
    cos_sin: torch.Tensor,  # (max_pos, D) fp32: [cos | sin]
) -> tuple[torch.Tensor, torch.Tensor]:  # new (T, Hq, D), (T, Hkv, D)
    """Neox-style (rotate_half) rotary embedding; returns new tensors."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q (T, Hq, D) and k (T, Hkv, D) do not match: {tuple(q.shape)} "
                         f"{tuple(k.shape)}")
    d = q.shape[2]
    if d % 2:
        raise ValueError(f"head_dim must be even, got {d}")
    if q.dtype not in _DTYPES or k.dtype not in _DTYPES:
        raise ValueError(f"q/k dtypes {q.dtype}/{k.dtype} not supported")
    if positions.shape != (q.shape[0],) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be ({q.shape[0]},) int, got "
                         f"{tuple(positions.shape)} {positions.dtype}")
    if cos_sin.dim() != 2 or cos_sin.shape[1] != d or cos_sin.dtype != torch.float32:
        raise ValueError(f"cos_sin must be (max_pos, {d}) fp32, got {tuple(cos_sin.shape)} "
                         f"{cos_sin.dtype}")
    if q.stride(2) != 1 or k.stride(2) != 1 or cos_sin.stride(1) != 1:
        raise ValueError("q, k and cos_sin need a contiguous last dimension")
    _same_device(q, k, positions, cos_sin)
    q_out, k_out = torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format)
    if q.shape[0] == 0:
        return q_out, k_out
    for src, dst in ((q, q_out), (k, k_out)):
        _rotary_kernel[(q.shape[0],)](
            src, dst, positions, cos_sin,
            src.stride(0), src.stride(1), dst.stride(0), dst.stride(1), cos_sin.stride(0),
            H=src.shape[1], HALF=d // 2, BLOCK_H=triton.next_power_of_2(src.shape[1]),
            BLOCK_HALF=triton.next_power_of_2(d // 2),
        )
    return q_out, k_out


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:  # (..., 2I) -> (..., I)
    """silu(gate) * up of x = [gate | up] along the last dimension."""
    if x.dim() < 1 or x.shape[-1] % 2 or x.dtype not in _DTYPES:
        raise ValueError(f"x must be a float (..., 2I) tensor, got {tuple(x.shape)} {x.dtype}")
    x2 = _rows(x)  # (T, 2I)
    inter = x.shape[-1] // 2
    out = torch.empty((x2.shape[0], inter), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(max(1, inter)))
    if x2.shape[0] and inter:
        grid = (x2.shape[0], triton.cdiv(inter, block))
        _silu_and_mul_kernel[grid](x2, out, x2.stride(0), out.stride(0), inter, BLOCK=block)
    return out.view(*x.shape[:-1], inter)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., H) as (T, H) with a contiguous last dim (a view when the strides allow)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _same_device(ref: torch.Tensor, *others: torch.Tensor) -> None:
    for t in others:
        if t.device != ref.device:
            raise ValueError(f"tensor on {t.device} but input on {ref.device}")
