"""Attention and KV store over an int8 cache (kernels/kv_quant.py rows: int8 values, then
their fp32 scale) on CPU: the native kernel, the torch path and the naive reference.

The naive reference dequantizes each row exactly, so the native kernel (which dequantizes
16-key tiles in its loops) must agree with it to fp32 rounding; against the fp32 cache
the int8 cache must stay within quantization error, and a cache whose scales are wrong
must not.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from paged_cases import PagedCase, make_case

from kernels import cpu_native
from kernels.kv_quant import SCALE_BYTES, dequantize, quantize, scales
from kernels.ops import paged_attention, rotary, rotary_store_kv
from kernels.ref_attention import paged_attention_naive, paged_attention_torch
from kernels.ref_cache import gather_blocks_torch, scatter_blocks_torch, store_kv_torch

if shutil.which(os.environ.get("CC", "cc")) is None:
    pytest.skip("no C compiler: the engine uses the torch path here", allow_module_level=True)

I8 = torch.int8
# Decode rows, a prefill chunk on a cached prefix, a fresh prefill; lengths off the
# block size so partial blocks are read.
LENS = ([1, 1, 9, 21], [37, 70, 41, 21])


def _case(group: int, d: int, bs: int, seed: int) -> tuple[PagedCase, torch.Tensor]:
    case = make_case(*LENS, hkv=2, group=group, d=d, bs=bs, dtype=torch.float32, seed=seed)
    full = case.full.cpu()
    return case, quantize(full, I8)  # the same KV, int8 rows with their scales


def _native(case: PagedCase, cache: torch.Tensor) -> torch.Tensor:
    q = case.q.cpu()
    assert cpu_native.supports(q, cache, case.cpu_meta)
    out = torch.full_like(q, float("nan"))  # every row must be written
    cpu_native.paged_attention_native(q, cache, case.cpu_meta, case.scale, out)
    return out


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_native_int8_equals_exact_dequantization(group: int, d: int) -> None:
    case, full_q = _case(group, d, 16, seed=group * 7 + d)
    cache = full_q[:, case.layer]
    assert cache.shape[-1] == d + SCALE_BYTES and cache.dtype is I8
    native = _native(case, cache)
    naive = paged_attention_naive(case.q.cpu(), cache, case.cpu_meta, case.scale)
    torch_path = paged_attention_torch(case.q.cpu(), cache, case.cpu_meta, case.scale,
                                       native=False)
    torch.testing.assert_close(native, naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch_path, naive, rtol=1e-5, atol=1e-5)
    # ops.paged_attention dispatches an int8 cache to the native kernel too
    torch.testing.assert_close(paged_attention(case.q.cpu(), cache, case.cpu_meta, case.scale),
                               native, rtol=0, atol=0)


@pytest.mark.parametrize("bs", [16, 32])
def test_int8_close_to_fp32_and_broken_scales_are_not(bs: int) -> None:
    case, full_q = _case(3, 64, bs, seed=bs)
    fp32 = paged_attention_naive(case.q.cpu(), case.full.cpu()[:, case.layer], case.cpu_meta,
                                 case.scale)
    err = (_native(case, full_q[:, case.layer]) - fp32).abs().max().item()
    assert err < 0.05, err  # int8 with per-row scales: ~1 % of the values' range
    broken = full_q.clone()
    scales(broken).mul_(2.0)  # a scale off by 2x
    bad = (_native(case, broken[:, case.layer]) - fp32).abs().max().item()
    assert bad > 10 * err, (bad, err)


def test_rotary_store_int8_native_equals_torch_and_skips_padding() -> None:
    gen = torch.Generator().manual_seed(3)
    t, hq, hkv, d, bs = 40, 6, 2, 64, 16
    q = torch.randn(t, hq, d, generator=gen)
    k = torch.randn(t, hkv, d, generator=gen) * 3
    v = torch.randn(t, hkv, d, generator=gen)
    v[5] = 0.0  # an all-zero row: scale 0, reads back as zeros
    pos = torch.randint(0, 200, (t,), generator=gen)
    cos_sin = torch.randn(256, d, generator=gen)
    slots = torch.randperm(6 * bs, generator=gen)[:t] + bs
    slots[7] = -1  # padding: not stored
    native = torch.zeros(8, 2, 2, bs, hkv, d + SCALE_BYTES, dtype=I8)
    ref = native.clone()
    assert cpu_native.supports_rotary_store(q, k, v, pos, cos_sin, native[:, 1], slots)
    rq, rk = rotary_store_kv(q.clone(), k.clone(), v.clone(), pos, cos_sin, native[:, 1], slots)
    tq, tk = rotary(q, k, pos, cos_sin)
    store_kv_torch(tk, v, ref[:, 1], slots)
    assert torch.equal(native, ref)  # the same bytes, scales included
    assert torch.equal(rq, tq) and torch.equal(rk, tk)
    layer = native[:, 1]  # (blocks, K/V, slot in block, head, row)

    def row(slot: int, kv: int) -> torch.Tensor:
        return layer[slot // bs, kv, slot % bs]

    # every token but the padding one wrote its K rows (no zero row among them)
    assert int(layer[:, 0].reshape(-1, hkv * (d + SCALE_BYTES)).any(-1).sum()) == t - 1
    assert torch.equal(dequantize(row(int(slots[5]), 1)), torch.zeros(hkv, d))
    got_k = dequantize(row(int(slots[0]), 0))
    torch.testing.assert_close(got_k, tk[0], rtol=0, atol=tk[0].abs().max().item() / 254 + 1e-6)

def test_gather_scatter_move_scales_with_blocks() -> None:
    case, full_q = _case(3, 64, 16, seed=11)
    dst = torch.zeros_like(full_q)
    ids = torch.arange(1, full_q.shape[0])
    staging = gather_blocks_torch(full_q, ids)
    scatter_blocks_torch(dst, ids, staging)
    assert torch.equal(dst[1:], full_q[1:])  # block 0 (the null block) not copied
    torch.testing.assert_close(_native(case, dst[:, case.layer]),
                               _native(case, full_q[:, case.layer]), rtol=0, atol=0)
