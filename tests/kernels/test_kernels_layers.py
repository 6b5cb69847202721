"""Triton RMSNorm, rotary and SiLU-and-mul against the torch path (kernels.ref_layers)."""

from __future__ import annotations

import pytest
import torch
from paged_cases import DEVICE, assert_close

from kernels.ref_layers import rms_norm_torch, rotary_torch, silu_and_mul_torch
from kernels.triton_layers import rms_norm_triton, rotary_triton, silu_and_mul_triton

DTYPES = [torch.float32, torch.bfloat16]


def _randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype).to(DEVICE)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm(dtype: torch.dtype, with_residual: bool) -> None:
    h = 576  # SmolLM2's hidden size: not a power of two
    x = 3.0 * _randn(7, h, dtype=dtype, seed=1)
    w = _randn(h, dtype=dtype, seed=2)
    res = _randn(7, h, dtype=dtype, seed=3) if with_residual else None
    x_before = x.clone()
    out, new_res = rms_norm_triton(x, w, 1e-5, res)
    ref, ref_res = rms_norm_torch(x.cpu(), w.cpu(), 1e-5, None if res is None else res.cpu())
    assert out.dtype == ref.dtype
    assert_close(out, ref, dtype)
    if with_residual:
        assert new_res is not None and ref_res is not None
        assert torch.equal(new_res.cpu(), ref_res)  # the sum is rounded the same way
    else:
        assert new_res is None
    assert torch.equal(x, x_before)


def test_rms_norm_fp32_weight_promotes_and_3d_input() -> None:
    x = _randn(2, 5, 64, dtype=torch.bfloat16, seed=4)
    w = _randn(64, seed=5)
    out, _ = rms_norm_triton(x, w, 1e-6)
    ref, _ = rms_norm_torch(x.cpu(), w.cpu(), 1e-6)
    assert out.shape == (2, 5, 64) and out.dtype == torch.float32 == ref.dtype
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary(dtype: torch.dtype, d: int) -> None:
    t, hq, hkv, max_pos = 9, 6, 2, 4096
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)  # (max_pos, D)
    qkv = _randn(t, (hq + 2 * hkv) * d, dtype=dtype, seed=d)
    q = qkv[:, : hq * d].view(t, hq, d)  # strided views, as in the engine
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    gen = torch.Generator().manual_seed(1)
    positions = torch.randint(0, max_pos, (t,), generator=gen).to(DEVICE)
    before = qkv.clone()
    q_out, k_out = rotary_triton(q, k, positions, cos_sin)
    q_ref, k_ref = rotary_torch(q.cpu(), k.cpu(), positions.cpu(), cos_sin.cpu())
    assert_close(q_out, q_ref, dtype)
    assert_close(k_out, k_ref, dtype)
    assert torch.equal(qkv, before)  # inputs untouched, like the torch path


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul(dtype: torch.dtype) -> None:
    x = 4.0 * _randn(3, 5, 2 * 1536, dtype=dtype, seed=6)  # > one program per row
    out = silu_and_mul_triton(x)
    assert out.shape == (3, 5, 1536)
    assert_close(out, silu_and_mul_torch(x.cpu()), dtype)


def test_rejects_bad_inputs() -> None:
    x, w = _randn(4, 8), _randn(8)
    q, k = _randn(3, 4, 16), _randn(3, 2, 16)
    pos = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    cs = _randn(10, 16)
    cases = [
        lambda: rms_norm_triton(x, w[:4], 1e-5),
        lambda: rms_norm_triton(x, w, 1e-5, residual=x[:2]),
        lambda: rms_norm_triton(x.long(), w, 1e-5),
        lambda: rotary_triton(q, k[:2], pos, cs),  # token counts differ
        lambda: rotary_triton(q, k, pos.float(), cs),
        lambda: rotary_triton(q, k, pos, cs.double()),
        lambda: rotary_triton(q, k, pos, cs[:, :8]),  # table width != head_dim
        lambda: rotary_triton(q[..., :15], k[..., :15], pos, cs[:, :15]),  # odd head_dim
        lambda: silu_and_mul_triton(_randn(4, 7)),  # odd last dim
        lambda: silu_and_mul_triton(x.long()),
    ]
    for i, call in enumerate(cases):
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"case {i} was accepted")
