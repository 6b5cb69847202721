"""Triton paged attention against the torch path and the naive reference.

Every case uses a strided per-layer view of a 3-layer cross-layer cache, blocks in
shuffled order and lengths that are not multiples of the block size.
"""

from __future__ import annotations

import pytest
import torch
from paged_cases import DEVICE, PagedCase, assert_close, make_case, random_lengths

import kernels
from kernels.metadata import AttentionMetadata
from kernels.triton_attention import (
    TileConfig,
    choose_num_splits,
    decode_attention,
    paged_attention_triton,
    prefill_attention,
    split_counts,
)

GROUPS = [1, 3, 4, 8]  # Hq / Hkv
DTYPES = [torch.float32, torch.bfloat16]


def _check(case: PagedCase, out: torch.Tensor, dtype: torch.dtype) -> None:
    ref_torch, ref_naive = case.references()
    assert_close(out, ref_naive, dtype)
    assert_close(out, ref_torch, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("group", GROUPS)
def test_decode(group: int, bs: int, dtype: torch.dtype) -> None:
    seed = 100 * group + bs
    gen = torch.Generator().manual_seed(seed)
    # A one-token context, short ones and one past several tiles, none block-aligned.
    seq_lens = [1, *random_lengths(gen, 3, 2, 200, avoid_multiple_of=bs)]
    hkv = 1 if group == 8 else 2
    d = 64 if group in (1, 4) else 128
    case = make_case([1] * 4, seq_lens, hkv=hkv, group=group, d=d, bs=bs, dtype=dtype, seed=seed)
    out = paged_attention_triton(case.q, case.cache, case.meta, case.scale)
    _check(case, out, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_splits", [1, 2, 5, 64])
def test_decode_split_k(num_splits: int, dtype: torch.dtype) -> None:
    # Ragged: the short sequences leave most splits empty, which the reduction must ignore.
    seq_lens = [1500, 7, 333, 1]
    case = make_case([1] * 4, seq_lens, hkv=2, group=4, d=64, bs=16, dtype=dtype, seed=7)
    out = torch.full_like(case.q, float("nan"))
    decode_attention(case.q, case.cache, case.meta, case.scale, out, num_splits)
    _check(case, out, dtype)


def test_decode_long_context_uses_splits() -> None:
    seq_lens = [2100, 1000]
    case = make_case([1, 1], seq_lens, hkv=2, group=4, d=128, bs=16, dtype=torch.bfloat16,
                     seed=11)
    assert choose_num_splits(2, 2, 2100, DEVICE) > 1  # the public path below splits
    out = paged_attention_triton(case.q, case.cache, case.meta, case.scale)
    _check(case, out, torch.bfloat16)


def test_choose_num_splits() -> None:
    cpu = torch.device("cpu")
    assert choose_num_splits(64, 8, 4096, cpu) == 1  # already many programs
    assert choose_num_splits(1, 1, 100, cpu) == 1  # too short to split
    assert 1 < choose_num_splits(1, 8, 8192, cpu) <= 32
    assert choose_num_splits(1, 1, 10**6, cpu) <= 64


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("group", GROUPS)
def test_prefill(group: int, bs: int, dtype: torch.dtype) -> None:
    seed = 1000 + 10 * group + bs
    gen = torch.Generator().manual_seed(seed)
    q1, q2 = random_lengths(gen, 2, 2, 70, avoid_multiple_of=bs)
    prefix = int(torch.randint(1, 90, (1,), generator=gen))
    # A whole prompt, a chunk on a cached prefix, and a two-token chunk.
    query_lens = [q1, q2, 2]
    seq_lens = [q1, prefix + q2, 2 + bs]
    hkv = 1 if group == 8 else 2
    d = 64 if group in (1, 3) else 128
    case = make_case(query_lens, seq_lens, hkv=hkv, group=group, d=d, bs=bs, dtype=dtype,
                     seed=seed)
    out = paged_attention_triton(case.q, case.cache, case.meta, case.scale)
    _check(case, out, dtype)


@pytest.mark.parametrize("seed", range(24))
def test_random_batches(seed: int) -> None:
    # Random mixes of decode rows, whole prompts and chunks on cached prefixes, over
    # random GQA ratios, head dims, dtypes and block sizes (pages smaller and larger
    # than the kernels' KV tiles).
    gen = torch.Generator().manual_seed(10_000 + seed)

    def pick(options: list) -> object:
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    group, hkv = pick(GROUPS), pick([1, 2])
    bs, d, dtype = pick([1, 8, 16, 32, 64, 128]), pick([32, 64, 128]), pick(DTYPES)
    query_lens, seq_lens = [], []
    for _ in range(int(torch.randint(1, 6, (1,), generator=gen))):
        kind = pick(["decode", "decode", "prompt", "chunk"])
        ql = 1 if kind == "decode" else int(torch.randint(2, 48, (1,), generator=gen))
        prefix = 0 if kind == "prompt" else int(torch.randint(0, 400, (1,), generator=gen))
        query_lens.append(ql)
        seq_lens.append(max(ql + prefix, 1))
    case = make_case(query_lens, seq_lens, hkv=hkv, group=group, d=d, bs=bs, dtype=dtype,
                     seed=seed)
    out = paged_attention_triton(case.q, case.cache, case.meta, case.scale)
    _check(case, out, dtype)


@pytest.mark.parametrize("group", [3, 8])
def test_small_tiles(group: int) -> None:
    # Tiles smaller than the chunk and the context: several row tiles per chunk (with
    # G=3 a tile boundary falls inside a token's head group) and many KV steps.
    cfg = TileConfig(16, 16, 4)
    query_lens, seq_lens = [1, 23, 1, 17], [70, 60, 33, 17]
    case = make_case(query_lens, seq_lens, hkv=1, group=group, d=32, bs=16,
                     dtype=torch.float32, seed=30 + group)
    out = torch.full_like(case.q, float("nan"))
    decode_attention(case.q, case.cache, case.meta, case.scale, out, 3, cfg)
    prefill_attention(case.q, case.cache, case.meta, case.scale, out, cfg)
    _check(case, out, torch.float32)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16], ids=str)
def test_mixed_batch(dtype: torch.dtype) -> None:
    # Decode rows between prefill chunks: each kernel must take its own and only those.
    query_lens = [1, 9, 1, 40, 1, 3]
    seq_lens = [300, 9, 17, 75, 1, 60]
    case = make_case(query_lens, seq_lens, hkv=2, group=3, d=64, bs=16, dtype=dtype, seed=5)
    out = torch.full_like(case.q, float("nan"))  # every row must be written
    result = paged_attention_triton(case.q, case.cache, case.meta, case.scale, out=out)
    assert result.data_ptr() == out.data_ptr()
    _check(case, out, dtype)


def test_kernels_write_only_their_rows() -> None:
    query_lens, seq_lens = [1, 6, 1], [40, 30, 1]
    case = make_case(query_lens, seq_lens, hkv=1, group=4, d=64, bs=16, dtype=torch.float32,
                     seed=9)
    out = torch.full_like(case.q, float("nan"))
    decode_attention(case.q, case.cache, case.meta, case.scale, out, 2)
    assert out[1:7].isnan().all() and not out[[0, 7]].isnan().any()
    out = torch.full_like(case.q, float("nan"))
    prefill_attention(case.q, case.cache, case.meta, case.scale, out)
    assert out[[0, 7]].isnan().all() and not out[1:7].isnan().any()


@pytest.mark.parametrize("d", [16, 32, 256])
def test_other_head_dims(d: int) -> None:
    query_lens, seq_lens = [1, 5], [50, 21]
    case = make_case(query_lens, seq_lens, hkv=2, group=2, d=d, bs=16, dtype=torch.float32,
                     seed=d)
    out = paged_attention_triton(case.q, case.cache, case.meta, case.scale)
    _check(case, out, torch.float32)


def test_strided_q_and_out() -> None:
    # q as the engine has it: a view into the fused qkv projection output.
    query_lens, seq_lens = [1, 12], [33, 12]
    case = make_case(query_lens, seq_lens, hkv=2, group=4, d=64, bs=32, dtype=torch.float32,
                     seed=3)
    t, hq, d = case.q.shape
    qkv = torch.zeros((t, (hq + 4) * d), device=DEVICE)
    qkv[:, : hq * d] = case.q.reshape(t, hq * d)
    q_view = qkv[:, : hq * d].view(t, hq, d)
    out_buf = torch.zeros((t, hq + 1, d), device=DEVICE)
    out = paged_attention_triton(q_view, case.cache, case.meta, case.scale, out=out_buf[:, 1:])
    _check(case, out, torch.float32)
    assert (out_buf[:, 0] == 0).all()


def test_never_reads_past_seq_len() -> None:
    # Poison every slot that holds no live token (the null block, spare blocks, the tail
    # of each last block, the other layers): one stray read turns the output NaN.
    query_lens, seq_lens = [1, 1, 7], [37, 700, 23]
    case = make_case(query_lens, seq_lens, hkv=2, group=4, d=64, bs=16, dtype=torch.float32,
                     seed=4)
    ref_torch, ref_naive = case.references()  # from the clean cache
    nb, _, _, bs = case.full.shape[:4]
    live = torch.zeros(nb * bs, dtype=torch.bool)
    live[case.used_slots] = True
    poisoned = torch.full_like(case.full, float("nan"))
    slots = live.view(nb, bs).to(DEVICE)
    layer = case.full[:, case.layer]  # (nb, 2, bs, Hkv, D)
    poisoned[:, case.layer] = torch.where(slots[:, None, :, None, None], layer,
                                          float("nan"))
    for splits in (1, 3):
        out = torch.empty_like(case.q)
        decode_attention(case.q, poisoned[:, case.layer], case.meta, case.scale, out, splits)
        prefill_attention(case.q, poisoned[:, case.layer], case.meta, case.scale, out)
        assert_close(out, ref_naive, torch.float32)
        assert_close(out, ref_torch, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 4])
def test_torch_path_matches_naive(group: int, dtype: torch.dtype) -> None:
    # The torch path is what the CPU engine runs; the naive loop is the ground truth.
    query_lens = [1, 13, 1, 5, 30]
    seq_lens = [45, 13, 1, 70, 30]
    case = make_case(query_lens, seq_lens, hkv=2, group=group, d=64, bs=16, dtype=dtype,
                     seed=21 + group)
    ref_torch, ref_naive = case.references()
    assert_close(ref_torch, ref_naive, dtype)


def test_dispatch_through_ops() -> None:
    # On CPU this is the torch path; with PDSERVE_KERNEL_DEVICE=cuda it is Triton.
    case = make_case([1, 6], [29, 40], hkv=2, group=3, d=64, bs=16, dtype=torch.float32, seed=8)
    out = kernels.paged_attention(case.q, case.cache, case.meta, case.scale)
    _check(case, out, torch.float32)


def _bad(case: PagedCase, **changes: object) -> None:
    args = {"q": case.q, "kv_cache": case.cache, "meta": case.meta, "scale": case.scale,
            "out": None}
    args.update(changes)
    with pytest.raises(ValueError):
        paged_attention_triton(**args)  # type: ignore[arg-type]


def test_rejects_bad_inputs() -> None:
    case = make_case([1, 4], [20, 9], hkv=2, group=2, d=32, bs=16, dtype=torch.float32, seed=1)
    q, cache = case.q, case.cache
    _bad(case, q=q[0])  # not (T, Hq, D)
    _bad(case, q=q[:, :3])  # Hq not a multiple of Hkv
    _bad(case, q=q.to(torch.bfloat16))  # dtype differs from the cache
    _bad(case, q=q.double(), kv_cache=cache.double())  # unsupported dtype
    _bad(case, q=q[..., :24], kv_cache=cache[..., :24])  # head_dim not a power of two
    _bad(case, kv_cache=cache[:, 0])  # not a (.., 2, bs, Hkv, D) cache
    _bad(case, kv_cache=cache[:, :, :8])  # block size differs from the metadata
    _bad(case, kv_cache=cache.transpose(3, 4).contiguous().transpose(3, 4))  # D strided
    _bad(case, q=q[:-1])  # rows != scheduled tokens
    _bad(case, scale=0.0)
    _bad(case, out=torch.empty_like(q)[:, :2])
    _bad(case, out=torch.empty_like(q, dtype=torch.bfloat16))
    wrong = AttentionMetadata.build([1, 4], [20, 9], [[1, 2], [3]], 16, DEVICE)
    wrong.seq_lens = wrong.seq_lens.long()
    _bad(case, meta=wrong)


def test_split_counts_cover_every_choice() -> None:
    """What the warm-up compiles (split_counts) holds every count choose_num_splits can
    pick for sequences up to that length, at any batch: nothing compiles while serving."""
    cpu = torch.device("cpu")
    for max_len in (1, 100, 256, 257, 1000, 4096, 8192, 10**6):
        counts = split_counts(max_len)
        assert counts == [1 << i for i in range(len(counts))] and counts[-1] <= 64
        for seqs in (1, 2, 3, 7, 64):
            for length in {1, max_len // 3 + 1, max_len}:
                assert choose_num_splits(seqs, 2, length, cpu) in counts
    assert split_counts(100) == [1]
    assert split_counts(8192) == [1, 2, 4, 8, 16, 32]
