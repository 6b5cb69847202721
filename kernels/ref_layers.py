"""Torch path of the small fused ops: RMSNorm (+residual), rotary embedding, SiLU-and-mul.

Numerics mirror Hugging Face transformers (norm statistics in fp32, then cast), so
greedy outputs match it token for token in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_torch(
    x: torch.Tensor,  # (T, H)
    weight: torch.Tensor,  # (H,)
    eps: float,
    residual: torch.Tensor | None = None,  # (T, H); when given, x + residual is normed
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (normed, new_residual); new_residual is x + residual (None if not given)."""
    if residual is not None:
        x = x + residual
        residual = x
    if x.dtype == torch.float32:  # one fused op; bit-identical to the formula below in fp32
        return F.rms_norm(x, (x.shape[-1],), weight, eps), residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), residual


def rotary_torch(
    q: torch.Tensor,  # (T, Hq, D)
    k: torch.Tensor,  # (T, Hkv, D)
    positions: torch.Tensor,  # (T,) int
    cos_sin: torch.Tensor,  # (max_pos, D) fp32: [cos(pos*f) | sin(pos*f)], f of size D/2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (rotate_half) RoPE as in HF Llama; returns new tensors.

    Written on the two halves directly (x1*cos - x2*sin | x2*cos + x1*sin): the same
    IEEE operations as HF's ``x*cos + rotate_half(x)*sin`` without building the
    duplicated cos/sin tables and the rotated copy.
    """
    cs = cos_sin.index_select(0, positions.long())  # (T, D)
    half = cs.shape[-1] // 2
    cos = cs[:, None, :half].to(q.dtype)  # (T, 1, D/2)
    sin = cs[:, None, half:].to(q.dtype)

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)

    return rot(q), rot(k)


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """(T, 2I) [gate | up] -> (T, I) silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
