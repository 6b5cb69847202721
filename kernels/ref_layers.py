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
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), residual


def rotary_torch(
    q: torch.Tensor,  # (T, Hq, D)
    k: torch.Tensor,  # (T, Hkv, D)
    positions: torch.Tensor,  # (T,) int
    cos_sin: torch.Tensor,  # (max_pos, D) fp32: [cos(pos*f) | sin(pos*f)], f of size D/2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (rotate_half) RoPE as in HF Llama; returns new tensors."""
    cs = cos_sin[positions]  # (T, D)
    half = cs.shape[-1] // 2
    cos = torch.cat((cs[:, :half], cs[:, :half]), -1).unsqueeze(1).to(q.dtype)  # (T, 1, D)
    sin = torch.cat((cs[:, half:], cs[:, half:]), -1).unsqueeze(1).to(q.dtype)

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return x * cos + torch.cat((-x2, x1), -1) * sin

    return rot(q), rot(k)


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """(T, 2I) [gate | up] -> (T, I) silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
