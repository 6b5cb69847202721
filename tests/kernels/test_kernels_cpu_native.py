"""The native CPU attention kernel (kernels/cpu_native.py) against the naive reference.

Cases come from paged_cases (strided per-layer views of a 3-layer cache, shuffled
blocks, lengths that are not multiples of the block size) and run on CPU tensors
whatever device the other kernel tests use. On a machine with a C compiler the kernel
must build: a broken build fails here instead of quietly falling back.
"""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
from paged_cases import PagedCase, assert_close, make_case, random_lengths

from kernels import cpu_native
from kernels.metadata import AttentionMetadata
from kernels.ops import rotary_store_kv
from kernels.ref_attention import paged_attention_naive, paged_attention_torch
from kernels.ref_cache import store_kv_torch
from kernels.ref_layers import rotary_torch

GROUPS = [1, 3, 4, 8]  # Hq / Hkv
F32 = torch.float32

if shutil.which(os.environ.get("CC", "cc")) is None:
    pytest.skip("no C compiler: the engine uses the torch path here", allow_module_level=True)


def _cpu(case: PagedCase) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    return case.q.cpu(), case.full.cpu()[:, case.layer], case.cpu_meta


def _native(case: PagedCase, out: torch.Tensor | None = None) -> torch.Tensor:
    q, cache, meta = _cpu(case)
    assert cpu_native.supports(q, cache, meta)
    out = torch.full_like(q, float("nan")) if out is None else out  # every row must be written
    cpu_native.paged_attention_native(q, cache, meta, case.scale, out)
    return out


def _naive(case: PagedCase) -> torch.Tensor:
    q, cache, meta = _cpu(case)
    return paged_attention_naive(q, cache, meta, case.scale)


def test_builds_and_loads() -> None:
    assert cpu_native.available()
    path = cpu_native.build()  # cached: the same file, not rebuilt
    assert path.exists() and cpu_native.build() == path
    assert not path.is_relative_to(cpu_native.SOURCE.parent.parent)  # never in the repo


@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("group", GROUPS)
def test_decode(group: int, bs: int) -> None:
    seed = 200 * group + bs
    gen = torch.Generator().manual_seed(seed)
    # A one-token context, a whole block plus one, and ragged ones past several blocks.
    seq_lens = [1, bs + 1, *random_lengths(gen, 4, 2, 300, avoid_multiple_of=bs)]
    hkv = 1 if group == 8 else 2
    d = 64 if group in (1, 3) else 128
    case = make_case([1] * len(seq_lens), seq_lens, hkv=hkv, group=group, d=d, bs=bs,
                     dtype=F32, seed=seed)
    assert_close(_native(case), _naive(case), F32)


@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("group", GROUPS)
def test_prefill_and_chunks(group: int, bs: int) -> None:
    seed = 3000 + 10 * group + bs
    gen = torch.Generator().manual_seed(seed)
    q1, q2 = random_lengths(gen, 2, 2, 70, avoid_multiple_of=bs)
    prefix = int(torch.randint(1, 90, (1,), generator=gen))
    # A whole prompt, a chunk on a cached prefix, a two-token chunk, a decode row, and
    # a chunk longer than the kernel's 8-token query tile.
    query_lens = [q1, q2, 2, 1, 21]
    seq_lens = [q1, prefix + q2, 2 + bs, 40, 21 + 2 * bs + 5]
    hkv = 1 if group == 8 else 2
    case = make_case(query_lens, seq_lens, hkv=hkv, group=group, d=64, bs=bs, dtype=F32,
                     seed=seed)
    assert_close(_native(case), _naive(case), F32)


@pytest.mark.parametrize("seed", range(12))
def test_random_batches(seed: int) -> None:
    # Mixed steps over block sizes below and above the kernel's 16-key step, and every
    # head size it takes (multiples of 16).
    gen = torch.Generator().manual_seed(20_000 + seed)

    def pick(options: list) -> object:
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    group, hkv = pick(GROUPS), pick([1, 2, 3])
    bs, d = pick([1, 8, 16, 32, 64]), pick([16, 32, 64, 128, 256])
    query_lens, seq_lens = [], []
    for _ in range(int(torch.randint(1, 7, (1,), generator=gen))):
        kind = pick(["decode", "decode", "prompt", "chunk"])
        ql = 1 if kind == "decode" else int(torch.randint(2, 48, (1,), generator=gen))
        prefix = 0 if kind == "prompt" else int(torch.randint(0, 400, (1,), generator=gen))
        query_lens.append(ql)
        seq_lens.append(max(ql + prefix, 1))
    case = make_case(query_lens, seq_lens, hkv=hkv, group=group, d=d, bs=bs, dtype=F32,
                     seed=seed)
    assert_close(_native(case), _naive(case), F32)


def test_matches_torch_path_on_the_engine_shape() -> None:
    # SmolLM2's attention (9 query heads over 3 KV heads, head_dim 64) at a decode batch
    # of the offline benchmark's size, against the SDPA code it replaces.
    gen = torch.Generator().manual_seed(77)
    seq_lens = random_lengths(gen, 16, 30, 200)
    case = make_case([1] * 16, seq_lens, hkv=3, group=3, d=64, bs=16, dtype=F32, seed=77,
                     num_layers=4, layer=2)
    q, cache, meta = _cpu(case)
    assert_close(_native(case), paged_attention_torch(q, cache, meta, case.scale, native=False),
                 F32)


def test_strided_q_and_out() -> None:
    # q as the engine has it: a view into the fused qkv projection output.
    case = make_case([1, 12], [33, 12], hkv=2, group=4, d=64, bs=32, dtype=F32, seed=3)
    q, cache, meta = _cpu(case)
    t, hq, d = q.shape
    qkv = torch.zeros((t, (hq + 4) * d))
    qkv[:, : hq * d] = q.reshape(t, hq * d)
    q_view = qkv[:, : hq * d].view(t, hq, d)
    out_buf = torch.zeros((t, hq + 1, d))
    out = out_buf[:, 1:]
    assert cpu_native.supports(q_view, cache, meta)
    cpu_native.paged_attention_native(q_view, cache, meta, case.scale, out)
    assert_close(out, _naive(case), F32)
    assert (out_buf[:, 0] == 0).all()


def test_never_reads_past_seq_len() -> None:
    # Poison every slot that holds no live token (the null block, spare blocks, the tail
    # of each last block, the other layers): one stray read turns the output NaN.
    case = make_case([1, 1, 7, 19], [37, 700, 23, 19], hkv=2, group=4, d=64, bs=16,
                     dtype=F32, seed=4)
    expected = _naive(case)
    full = case.full.cpu()
    nb, _, _, bs = full.shape[:4]
    live = torch.zeros(nb * bs, dtype=torch.bool)
    live[case.used_slots] = True
    poisoned = torch.full_like(full, float("nan"))
    poisoned[:, case.layer] = torch.where(live.view(nb, bs)[:, None, :, None, None],
                                          full[:, case.layer], float("nan"))
    out = torch.empty_like(expected)
    cpu_native.paged_attention_native(case.q.cpu(), poisoned[:, case.layer], case.cpu_meta,
                                      case.scale, out)
    assert_close(out, expected, F32)


def test_engine_path_uses_native_and_falls_back() -> None:
    case = make_case([1, 5], [50, 21], hkv=2, group=3, d=64, bs=16, dtype=F32, seed=8)
    q, cache, meta = _cpu(case)
    expected = _naive(case)
    assert_close(paged_attention_torch(q, cache, meta, case.scale), expected, F32)
    # Shapes the kernel does not take go to the torch code: bf16, head_dim 40.
    assert not cpu_native.supports(q.bfloat16(), cache.bfloat16(), meta)
    odd = make_case([1, 5], [50, 21], hkv=2, group=3, d=40, bs=16, dtype=F32, seed=8)
    oq, ocache, ometa = _cpu(odd)
    assert not cpu_native.supports(oq, ocache, ometa)
    assert_close(paged_attention_torch(oq, ocache, ometa, odd.scale), _naive(odd), F32)


def test_failed_build_logs_once_and_uses_torch_path(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> None:
        raise RuntimeError("cc failed: simulated\nsecond line")

    case = make_case([1, 5], [50, 21], hkv=2, group=3, d=64, bs=16, dtype=F32, seed=9)
    q, cache, meta = _cpu(case)
    monkeypatch.setattr(cpu_native, "build", broken)
    cpu_native._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="kernels.cpu_native"):
            assert not cpu_native.available()
            out = paged_attention_torch(q, cache, meta, case.scale)
            paged_attention_torch(q, cache, meta, case.scale)
        warnings = [r for r in caplog.records if r.name == "kernels.cpu_native"]
        assert len(warnings) == 1 and "simulated" in warnings[0].getMessage()
        assert "\n" not in warnings[0].getMessage()
        assert_close(out, _naive(case), F32)
    finally:
        monkeypatch.undo()
        cpu_native._library.cache_clear()
    assert cpu_native.available()


def test_empty_step_is_a_no_op() -> None:
    """A step with no query rows returns without error and writes nothing: not the
    cache, and not the memory just past the empty output."""
    meta = AttentionMetadata.build([], [], [], 16, torch.device("cpu"))
    q = torch.empty((0, 4, 64))
    cache = torch.randn((3, 2, 16, 2, 64))
    before = cache.clone()
    backing = torch.full((1, 4, 64), 7.0)
    out = backing[:0]  # (0, 4, 64), with memory behind it that must stay untouched
    assert cpu_native.supports(q, cache, meta)
    cpu_native.paged_attention_native(q, cache, meta, 0.125, out)
    assert torch.equal(cache, before)
    assert torch.equal(backing, torch.full((1, 4, 64), 7.0))


def _qkv_step(t: int, hq: int, hkv: int, d: int, seed: int) -> tuple[torch.Tensor, ...]:
    """q, k, v as views of one fused projection output, as the engine has them."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn((t, (hq + 2 * hkv) * d), generator=gen)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    return qkv, q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)


@pytest.mark.parametrize("t", [5, 200])  # below and above the parallel threshold
def test_rotary_store_is_bit_identical_to_torch_ops(t: int) -> None:
    hq, hkv, d, bs, nb = 9, 3, 64, 16, 40
    _, q, k, v = _qkv_step(t, hq, hkv, d, seed=t)
    gen = torch.Generator().manual_seed(1)
    pos = torch.randint(0, 4000, (t,), generator=gen)
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.arange(4096, dtype=torch.float32)[:, None] * inv[None, :]
    cos_sin = torch.cat((ang.cos(), ang.sin()), dim=-1)
    slots = torch.randperm(nb * bs, generator=gen)[:t]
    slots[::7] = -1  # padding tokens: not stored
    full = torch.randn((nb, 4, 2, bs, hkv, d), generator=gen)
    want_cache = full.clone()
    want_q, want_k = rotary_torch(q, k, pos, cos_sin)
    store_kv_torch(want_k, v, want_cache[:, 2], slots)
    got_q, got_k = rotary_store_kv(q, k, v, pos, cos_sin, full[:, 2], slots)
    assert cpu_native.supports_rotary_store(q, k, v, pos, cos_sin, full[:, 2], slots)
    assert got_q.data_ptr() == q.data_ptr()  # in place: the native path ran
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert torch.equal(full, want_cache)  # stored slots, skipped slots, other layers


def test_rotary_store_rejects_out_of_range() -> None:
    qkv, q, k, v = _qkv_step(3, 4, 2, 32, seed=0)
    cos_sin = torch.zeros((10, 32))
    cache = torch.zeros((2, 2, 16, 2, 32))
    before = qkv.clone()
    with pytest.raises(IndexError):
        rotary_store_kv(q, k, v, torch.tensor([0, 1, 10]), cos_sin, cache,
                        torch.tensor([0, 1, 2]))
    with pytest.raises(IndexError):
        rotary_store_kv(q, k, v, torch.tensor([0, 1, 2]), cos_sin, cache,
                        torch.tensor([0, 1, 32]))
    assert torch.equal(qkv, before) and not cache.any()  # nothing written
