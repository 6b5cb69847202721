"""Triton kernels over a quantized cache (kernels/kv_quant.py rows: int8 values, then their
fp32 scale), under the interpreter on CPU or for real on a GPU (fp8 too, where the GPU
has it).

Attention must match the naive reference on the same quantized cache (which dequantizes
each row exactly), for decode (split or not), varlen prefill on a cached prefix, and a
mixed step; the store kernel must write the torch path's bytes, scales included.
"""

from __future__ import annotations

import pytest
import torch
from paged_cases import DEVICE, PagedCase, make_case

from kernels.kv_quant import SCALE_BYTES, quantize, scales
from kernels.ref_attention import paged_attention_naive
from kernels.ref_cache import store_kv_torch
from kernels.triton_attention import decode_attention, paged_attention_triton
from kernels.triton_cache import gather_blocks_triton, scatter_blocks_triton, store_kv_triton

QDTYPES = [torch.int8]
if DEVICE.type == "cuda" and torch.cuda.get_device_capability() >= (8, 9):
    QDTYPES.append(torch.float8_e4m3fn)


def _quantized(case: PagedCase, qdtype: torch.dtype) -> torch.Tensor:
    return quantize(case.full.cpu(), qdtype).to(DEVICE)  # (nb, L, 2, bs, Hkv, D + 4)


def _naive(case: PagedCase, full_q: torch.Tensor) -> torch.Tensor:
    return paged_attention_naive(case.q.cpu().float(), full_q.cpu()[:, case.layer],
                                 case.cpu_meta, case.scale)


def _close(out: torch.Tensor, ref: torch.Tensor, act: torch.dtype) -> None:
    tol = 1e-5 if act == torch.float32 else 2e-2
    torch.testing.assert_close(out.float().cpu(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("qdtype", QDTYPES, ids=str)
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16], ids=str)
def test_mixed_step_decode_and_prefill_on_cached_prefix(act: torch.dtype,
                                                        qdtype: torch.dtype) -> None:
    # two decode rows, a chunk on a 40-token cached prefix, a fresh prompt
    case = make_case([1, 1, 12, 19], [37, 70, 52, 19], hkv=2, group=3, d=64, bs=16,
                     dtype=act, seed=5)
    full_q = _quantized(case, qdtype)
    out = paged_attention_triton(case.q, full_q[:, case.layer], case.meta, case.scale)
    _close(out, _naive(case, full_q), act)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_splits_and_broken_scales_show(num_splits: int) -> None:
    case = make_case([1] * 3, [300, 5, 129], hkv=1, group=8, d=128, bs=32,
                     dtype=torch.float32, seed=9)
    full_q = _quantized(case, torch.int8)
    out = torch.full_like(case.q, float("nan"))
    decode_attention(case.q, full_q[:, case.layer], case.meta, case.scale, out, num_splits)
    ref = _naive(case, full_q)
    _close(out, ref, torch.float32)
    scales(full_q).mul_(2.0)
    decode_attention(case.q, full_q[:, case.layer], case.meta, case.scale, out, num_splits)
    assert (out.cpu() - ref).abs().max() > 0.1


@pytest.mark.parametrize("qdtype", QDTYPES, ids=str)
def test_store_quantizes_like_the_torch_path_and_blocks_copy_with_scales(
        qdtype: torch.dtype) -> None:
    nb, bs, hkv, d, t = 6, 16, 2, 64, 21
    gen = torch.Generator().manual_seed(1)
    full = torch.zeros((nb, 3, 2, bs, hkv, d + SCALE_BYTES), dtype=qdtype, device=DEVICE)
    expected = full.clone()
    qkv = torch.randn((t, 6 * hkv * d), generator=gen).to(DEVICE) * 4
    qkv[3] = 0.0  # all-zero rows: scale 0
    k = qkv[:, 4 * hkv * d : 5 * hkv * d].view(t, hkv, d)
    v = qkv[:, 5 * hkv * d :].view(t, hkv, d)
    slots = torch.randperm(nb * bs, generator=gen)[:t]
    slots[[0, 9]] = -1
    slots = slots.to(torch.int32).to(DEVICE)
    store_kv_triton(k, v, full[:, 1], slots)
    store_kv_torch(k, v, expected[:, 1], slots)
    assert torch.equal(full.view(torch.uint8), expected.view(torch.uint8))
    ids = torch.tensor([5, 2, 3], device=DEVICE)
    staging = gather_blocks_triton(full, ids)
    copy = torch.zeros_like(full)
    scatter_blocks_triton(copy, ids, staging)
    assert torch.equal(copy[ids].view(torch.uint8), full[ids].view(torch.uint8))
