"""Triton KV-cache ops against the torch path: exact equality (they only move values)."""

from __future__ import annotations

import pytest
import torch
from paged_cases import DEVICE

from kernels.ref_cache import gather_blocks_torch, scatter_blocks_torch, store_kv_torch
from kernels.triton_cache import gather_blocks_triton, scatter_blocks_triton, store_kv_triton

LAYERS, HKV, D = 3, 2, 32


def _cache(nb: int, bs: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn((nb, LAYERS, 2, bs, HKV, D), generator=gen).to(dtype)
    return full.to(DEVICE)  # (nb, L, 2, bs, Hkv, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bs", [16, 32])
def test_store_kv(bs: int, dtype: torch.dtype) -> None:
    nb, t = 6, 20
    gen = torch.Generator().manual_seed(bs)
    full = _cache(nb, bs, dtype, seed=bs)
    expected = full.clone()
    # k and v as the engine has them: strided views into one fused qkv output (fp32 here,
    # so the store also casts when the cache is bf16).
    qkv = torch.randn((t, (4 + 2) * HKV * D), generator=gen).to(DEVICE)
    k = qkv[:, 4 * HKV * D : 5 * HKV * D].view(t, HKV, D)
    v = qkv[:, 5 * HKV * D :].view(t, HKV, D)
    slots = torch.randperm(nb * bs, generator=gen)[:t]
    slots[[0, 7, 19]] = -1  # padding tokens: nothing written
    slots = slots.to(torch.int32).to(DEVICE)
    store_kv_triton(k, v, full[:, 1], slots)
    store_kv_torch(k, v, expected[:, 1], slots)
    assert torch.equal(full, expected)  # other layers untouched too
    assert not torch.equal(full, _cache(nb, bs, dtype, seed=bs))  # and something was written


def test_store_kv_skips_all_padding_and_out_of_range() -> None:
    full = _cache(3, 16, torch.float32, seed=1)
    before = full.clone()
    k = torch.randn((4, HKV, D), device=DEVICE)
    slots = torch.tensor([-1, -1, 3 * 16, 10**6], dtype=torch.int64, device=DEVICE)
    store_kv_triton(k, k, full[:, 0], slots)
    assert torch.equal(full, before)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gather_scatter_blocks(dtype: torch.dtype, ids_dtype: torch.dtype) -> None:
    nb, bs = 9, 16
    full = _cache(nb, bs, dtype, seed=2)
    ids = torch.tensor([7, 2, 5, 3], dtype=ids_dtype)  # shuffled, as a request's table is
    staged = gather_blocks_triton(full, ids)
    assert torch.equal(staged, gather_blocks_torch(full, ids))
    out = torch.empty_like(staged)
    assert gather_blocks_triton(full, ids.to(DEVICE), out=out) is out
    assert torch.equal(out, staged)

    dst = _cache(nb, bs, dtype, seed=3)
    expected = dst.clone()
    back = torch.tensor([0, 8, 4, 1], dtype=ids_dtype)
    scatter_blocks_triton(dst, back, staged)
    scatter_blocks_torch(expected, back, staged)
    assert torch.equal(dst, expected)
    assert torch.equal(dst[back.long().to(DEVICE)], full[ids.long().to(DEVICE)])


def test_gather_blocks_larger_than_one_program() -> None:
    # A block of 2 * 3 * 2 * 32 * 4 * 64 elements spans several copy programs.
    full = torch.randn((4, 3, 2, 32, 4, 64), device=DEVICE)
    ids = torch.tensor([3, 1])
    assert torch.equal(gather_blocks_triton(full, ids), full[[3, 1]])
    assert gather_blocks_triton(full, torch.tensor([], dtype=torch.int64)).shape == (0, 3, 2, 32,
                                                                                    4, 64)


def test_rejects_bad_inputs() -> None:
    full = _cache(4, 16, torch.float32, seed=4)
    k = torch.randn((3, HKV, D), device=DEVICE)
    slots = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    ids = torch.tensor([1, 2])
    cases = [
        lambda: store_kv_triton(k, k[:, :1], full[:, 0], slots),  # k/v shapes differ
        lambda: store_kv_triton(k, k, full[:, 0, :, :, :1], slots),  # heads differ
        lambda: store_kv_triton(k, k, full[:, 0], slots.float()),  # slots not int
        lambda: store_kv_triton(k, k, full[:, 0], slots[:2]),  # one slot per token
        lambda: store_kv_triton(k.double(), k.double(), full[:, 0], slots),
        lambda: gather_blocks_triton(full.transpose(1, 2), ids),  # a block is not contiguous
        lambda: gather_blocks_triton(full, torch.tensor([1, 4])),  # id out of range
        lambda: gather_blocks_triton(full, ids.float()),
        lambda: gather_blocks_triton(full, ids, out=torch.empty_like(full[:3])),
        lambda: gather_blocks_triton(full, ids, out=torch.empty_like(full[:2], dtype=torch.half)),
        lambda: scatter_blocks_triton(full, ids, full[:3]),
        lambda: scatter_blocks_triton(full, ids, full[:2].transpose(0, 1).contiguous()
                                      .transpose(0, 1)),  # staging not contiguous
    ]
    for i, call in enumerate(cases):
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"case {i} was accepted")
