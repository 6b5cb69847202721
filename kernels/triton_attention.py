"""Triton paged attention over one layer's view of the block-major cross-layer KV cache.

Two kernels share a step, each taking the sequences it is built for and leaving the rest:

- decode (query_len == 1): grid (seq, kv_head, split). One program holds all G = Hq/Hkv
  query heads of one KV head as the rows of a (G, D) tile, so each KV block is read
  once per group, not once per query head. Long contexts are cut into splits
  (flash-decoding): each split writes a partial output and its log-sum-exp, and
  ``_decode_reduce_kernel`` merges them. With one split the partials are skipped.
- prefill (query_len > 1): grid (seq, kv_head, row tile). The rows of a tile are the
  chunk's (query token, group head) pairs laid end to end, so GQA again shares every K/V
  tile across the group; query i of a chunk sits at position seq_len - query_len + i and
  sees KV positions 0..that position (the cached prefix plus its own chunk, causally).

Both walk KV in tiles of BLOCK_N tokens and look up each token's page in the block table,
so any power-of-two block size works, larger or smaller than the tile. Softmax runs in
the exp2 domain (scale * log2(e) is folded into the scores); statistics are fp32.

A quantized cache (kernels/kv_quant.py: int8 or fp8 rows of D values, then their fp32
scale) is read in registers: a tile's values convert exactly to the activations' dtype
(through fp32, which is free on a GPU and what the interpreter converts right) for the
dot products, each key's scale multiplies its column of scores and each value's
scale its column of softmax weights (s_k (q . k) = q . (s_k k)); no dequantized copy of
the cache exists. QUANT is a constexpr, so the unquantized kernels are unchanged.

A mixed batch launches both kernels over all sequences; a program whose sequence belongs
to the other kernel does no work. No host syncs: grids come from the metadata's host
ints (max_query_len, max_seq_len, query_lens_host).

Compiled variants: the split count is a compile-time constant, so it is always a power
of two up to MAX_SPLITS (``split_counts``: at most seven variants; those a model's
longest sequence can reach are compiled before a worker serves, by
engine/kernel_warmup.py); the block table's row stride, which moves with the batch's
longest table, is not specialized on. Nothing else a kernel is compiled
for changes between steps of one model, so nothing compiles while serving.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.metadata import AttentionMetadata

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_QUANT = (torch.int8, torch.float8_e4m3fn)  # kernels/kv_quant.py rows: D values + fp32 scale
_LOG2E = 1.4426950408889634
# Fewest KV tokens worth a split of their own: below this the partial write and the
# reduction cost more than the parallelism buys.
_MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 64  # a power of two


@triton.jit(do_not_specialize=["s_bt"])
def _decode_split_kernel(
    q_ptr, cache_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    scale_log2e,
    s_qt, s_qh,  # q (T, Hq, D): token, head strides (D is contiguous)
    s_cb, s_ckv, s_ct, s_ch,  # cache (nb, 2, bs, Hkv, D): block, k/v, token, head strides
    s_bt,  # block table row stride
    s_ot, s_oh,  # out (T, Hq, D)
    tokens_per_split,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PREC: tl.constexpr,
    QUANT: tl.constexpr,
):
    b = tl.program_id(0)
    h_kv = tl.program_id(1)
    split = tl.program_id(2)
    q_row = tl.load(qsl_ptr + b)
    is_decode = (tl.load(qsl_ptr + b + 1) - q_row) == 1
    seq_len = tl.load(seq_lens_ptr + b)
    kv_lo = split * tokens_per_split
    kv_hi = tl.minimum(kv_lo + tokens_per_split, seq_len)
    kv_hi = tl.where(is_decode, kv_hi, 0)  # prefill sequences: the loop below is empty

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    g_mask = offs_g < G
    # Rows stored: all G heads of a decode sequence, none of a prefill one.
    store_mask = offs_g < tl.where(is_decode, G, 0)
    heads = h_kv * G + offs_g  # (BLOCK_G,) query heads of this group; rows >= G are padding
    q = tl.load(q_ptr + q_row.to(tl.int64) * s_qt + heads[:, None] * s_qh + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)  # (BLOCK_G, D)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * s_bt
    for start in range(kv_lo, kv_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < kv_hi
        page = tl.load(bt_row + offs_n // BS, mask=n_mask, other=0).to(tl.int64)
        tok = page * s_cb + (offs_n % BS) * s_ct + h_kv * s_ch  # (BLOCK_N,)
        kv_off = tok[:, None] + offs_d[None, :]  # (BLOCK_N, D)
        k = tl.load(cache_ptr + kv_off, mask=n_mask[:, None], other=0.0)
        v = tl.load(cache_ptr + s_ckv + kv_off, mask=n_mask[:, None], other=0.0)
        if QUANT:  # one-byte values, exact in the activations' dtype
            k = k.to(tl.float32).to(q.dtype)
            v = v.to(tl.float32).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2e  # (BLOCK_G, BLOCK_N)
        if QUANT:
            s = s * _row_scales(cache_ptr, tok, n_mask, D)[None, :]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # Every tile has a visible token (start < kv_hi), so m_new is finite.
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        if QUANT:  # (names bound under a constexpr if do not outlive it: load here)
            p = p * _row_scales(cache_ptr + s_ckv, tok, n_mask, D)[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m = m_new

    # An empty split (short sequence, or not a decode sequence) has l_sum == 0.
    l_safe = tl.where(l_sum > 0.0, l_sum, 1.0)
    o = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        o_ptrs = out_ptr + q_row.to(tl.int64) * s_ot + heads[:, None] * s_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=store_mask[:, None])
    else:
        # part_o (B, Hq, S, D) fp32, part_lse (B, Hq, S) fp32, both contiguous.
        row = (b.to(tl.int64) * (tl.num_programs(1) * G) + heads) * NUM_SPLITS + split
        lse = tl.where(l_sum > 0.0, m + tl.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=store_mask)
        tl.store(part_o_ptr + row[:, None] * D + offs_d[None, :], o, mask=store_mask[:, None])


@triton.jit
def _row_scales(base_ptr, tok, n_mask, D: tl.constexpr):
    """The fp32 scales of the rows at ``base_ptr + tok`` (BLOCK_N,) -- K rows from the
    cache pointer, V rows from it + the K/V stride: the 4 bytes after each row's D
    one-byte values; 0 for masked tokens."""
    return tl.load((base_ptr + tok + D).to(tl.pointer_type(tl.float32)), mask=n_mask,
                   other=0.0)


@triton.jit
def _decode_reduce_kernel(
    part_o_ptr, part_lse_ptr, qsl_ptr, out_ptr,
    s_ot, s_oh,
    HQ: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    q_row = tl.load(qsl_ptr + b)
    is_decode = (tl.load(qsl_ptr + b + 1) - q_row) == 1
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    s_mask = offs_s < tl.where(is_decode, NUM_SPLITS, 0)
    row = (b.to(tl.int64) * HQ + h) * NUM_SPLITS + offs_s  # (BLOCK_S,)
    lse = tl.load(part_lse_ptr + row, mask=s_mask, other=float("-inf"))
    # Split 0 always holds token 0, so lse_max is finite for a decode sequence; the
    # guard only keeps skipped (prefill) programs from computing -inf - -inf.
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w = tl.exp2(lse - lse_max)  # (BLOCK_S,), 0 for empty splits
    o = tl.load(part_o_ptr + row[:, None] * D + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    w_sum = tl.sum(w, 0)
    o = tl.sum(o * w[:, None], 0) / tl.where(w_sum > 0.0, w_sum, 1.0)  # (D,)
    o_ptrs = out_ptr + q_row.to(tl.int64) * s_ot + h * s_oh + offs_d
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=offs_d < tl.where(is_decode, D, 0))


@triton.jit(do_not_specialize=["s_bt"])
def _prefill_kernel(
    q_ptr, cache_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr,
    scale_log2e,
    s_qt, s_qh,
    s_cb, s_ckv, s_ct, s_ch,
    s_bt,
    s_ot, s_oh,
    G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    QUANT: tl.constexpr,
):
    b = tl.program_id(0)
    h_kv = tl.program_id(1)
    pid_m = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - q_len  # KV tokens before this chunk

    # Rows are (token, head) pairs of this chunk and KV head: row r = token * G + head.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // G
    heads = h_kv * G + rows % G
    active = q_len > 1  # decode sequences belong to the decode kernel
    row_mask = tok < tl.where(active, q_len, 0)
    qpos = prefix + tok  # (BLOCK_M,) absolute position of each row's query
    offs_d = tl.arange(0, D)
    q_off = (q_start + tok).to(tl.int64) * s_qt + heads * s_qh
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=row_mask[:, None],
                other=0.0)  # (BLOCK_M, D)

    # KV this tile can see: up to its last valid query's position (inclusive).
    last_tok = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, q_len - 1)
    kv_hi = tl.where(pid_m * BLOCK_M < tl.where(active, q_len * G, 0), prefix + last_tok + 1, 0)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * s_bt
    for start in range(0, kv_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < kv_hi
        page = tl.load(bt_row + offs_n // BS, mask=n_mask, other=0).to(tl.int64)
        kv_tok = page * s_cb + (offs_n % BS) * s_ct + h_kv * s_ch
        kv_off = kv_tok[:, None] + offs_d[None, :]  # (BLOCK_N, D)
        k = tl.load(cache_ptr + kv_off, mask=n_mask[:, None], other=0.0)
        v = tl.load(cache_ptr + s_ckv + kv_off, mask=n_mask[:, None], other=0.0)
        if QUANT:
            k = k.to(tl.float32).to(q.dtype)
            v = v.to(tl.float32).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2e  # (BLOCK_M, BLOCK_N)
        if QUANT:
            s = s * _row_scales(cache_ptr, kv_tok, n_mask, D)[None, :]
        visible = (offs_n[None, :] <= qpos[:, None]) & n_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
        # Position 0 is visible to every row (padding rows included) and lies in the
        # first tile, so m is finite from then on and no row computes -inf - -inf.
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        if QUANT:
            p = p * _row_scales(cache_ptr + s_ckv, kv_tok, n_mask, D)[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m = m_new

    o = acc / tl.where(l_sum > 0.0, l_sum, 1.0)[:, None]
    o_off = (q_start + tok).to(tl.int64) * s_ot + heads * s_oh
    tl.store(out_ptr + o_off[:, None] + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None])


def paged_attention_triton(
    q: torch.Tensor,  # (T, Hq, D)
    kv_cache: torch.Tensor,  # (num_blocks, 2, block_size, Hkv, D), one layer's strided view
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,  # (T, Hq, D), written in place when given
) -> torch.Tensor:  # (T, Hq, D)
    """Paged attention of this step's queries (decode rows and prefill chunks, mixed)."""
    _check_inputs(q, kv_cache, meta, out)
    if not scale > 0.0:
        raise ValueError(f"scale must be positive, got {scale}")
    if out is None:
        out = torch.empty_like(q)
    if meta.num_seqs == 0 or q.shape[0] == 0:
        return out
    if meta.max_query_len == 1 or 1 in meta.query_lens_host:
        splits = choose_num_splits(meta.num_seqs, kv_cache.shape[3], meta.max_seq_len, q.device)
        decode_attention(q, kv_cache, meta, scale, out, splits)
    if meta.max_query_len > 1:
        prefill_attention(q, kv_cache, meta, scale, out)
    return out


def choose_num_splits(num_seqs: int, hkv: int, max_seq_len: int, device: torch.device) -> int:
    """Splits per sequence so that (seq, kv_head, split) programs fill the GPU about
    twice: a power of two (one of ``split_counts(max_seq_len)``)."""
    sms = _sm_count(device)
    want = -(-2 * sms // max(1, num_seqs * hkv))
    by_len = -(-max_seq_len // _MIN_TOKENS_PER_SPLIT)
    return min(triton.next_power_of_2(max(1, min(want, by_len))), MAX_SPLITS)


def split_counts(max_seq_len: int) -> list[int]:
    """Every split count ``choose_num_splits`` can pick for sequences of up to
    ``max_seq_len`` tokens: 1, 2, 4, ... (at most MAX_SPLITS)."""
    top = min(triton.next_power_of_2(max(1, -(-max_seq_len // _MIN_TOKENS_PER_SPLIT))),
              MAX_SPLITS)
    return [1 << i for i in range(top.bit_length())]


class TileConfig(NamedTuple):
    block_m: int  # query rows per program (prefill only)
    block_n: int  # KV tokens per loop step
    num_warps: int


def decode_config(dtype: torch.dtype, d: int) -> TileConfig:
    """Decode tiles. Picked from ptxas reports for sm_90 (no spills, <= ~120 registers so
    two or more programs share an SM and one's loads overlap another's maths); never
    timed on a GPU yet: bench/kernels.py --sweep times the alternatives."""
    if dtype == torch.float32:
        return TileConfig(16, 16, 8)
    return TileConfig(16, 32, 8)


def prefill_config(dtype: torch.dtype, d: int) -> TileConfig:
    """Prefill tiles: the largest without register spills on sm_90 (ptxas -v)."""
    if dtype == torch.float32:
        return TileConfig(32, 32, 8) if d <= 128 else TileConfig(16, 16, 8)
    return TileConfig(128, 64, 8) if d <= 128 else TileConfig(32, 32, 8)


def decode_attention(
    q: torch.Tensor,  # (T, Hq, D)
    kv_cache: torch.Tensor,  # (num_blocks, 2, block_size, Hkv, D)
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,  # (T, Hq, D); only rows of decode sequences are written
    num_splits: int,
    config: TileConfig | None = None,
) -> None:
    """Launch the decode kernel (+ the split reduction) for the query_len == 1 sequences."""
    _, _, bs, hkv, _ = kv_cache.shape
    d = q.shape[2]
    hq = q.shape[1]
    g = hq // hkv
    cfg = config or decode_config(q.dtype, d)
    # A power of two (a compile-time constant: see the module's docstring), cut in whole
    # tiles so no tile straddles two splits; splits past a sequence's end find no tokens
    # and weigh 0 in the reduction.
    num_splits = min(triton.next_power_of_2(max(1, num_splits)), MAX_SPLITS)
    per_split = -(-max(1, meta.max_seq_len) // num_splits)
    per_split = -(-per_split // cfg.block_n) * cfg.block_n
    b = meta.num_seqs
    if num_splits > 1:
        part_o = torch.empty((b, hq, num_splits, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((b, hq, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused by the kernel when NUM_SPLITS == 1
    _decode_split_kernel[(b, hkv, num_splits)](
        q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, out,
        part_o, part_lse,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        meta.block_tables.stride(0),
        out.stride(0), out.stride(1),
        per_split,
        G=g, BLOCK_G=max(16, triton.next_power_of_2(g)), D=d, BS=bs,
        BLOCK_N=cfg.block_n, NUM_SPLITS=num_splits, DOT_PREC=_dot_precision(q.dtype),
        QUANT=kv_cache.dtype in _QUANT, num_warps=cfg.num_warps,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(b, hq)](
            part_o, part_lse, meta.query_start_loc, out,
            out.stride(0), out.stride(1),
            HQ=hq, D=d, NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits),
            num_warps=4,
        )


def prefill_attention(
    q: torch.Tensor,  # (T, Hq, D)
    kv_cache: torch.Tensor,  # (num_blocks, 2, block_size, Hkv, D)
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,  # (T, Hq, D); only rows of query_len > 1 sequences are written
    config: TileConfig | None = None,
) -> None:
    """Launch the varlen prefill kernel for the query_len > 1 sequences."""
    _, _, bs, hkv, _ = kv_cache.shape
    d = q.shape[2]
    g = q.shape[1] // hkv
    cfg = config or prefill_config(q.dtype, d)
    grid = (meta.num_seqs, hkv, triton.cdiv(meta.max_query_len * g, cfg.block_m))
    _prefill_kernel[grid](
        q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, out,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        meta.block_tables.stride(0),
        out.stride(0), out.stride(1),
        G=g, D=d, BS=bs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        DOT_PREC=_dot_precision(q.dtype), QUANT=kv_cache.dtype in _QUANT,
        num_warps=cfg.num_warps,
    )


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise run as tf32 on tensor cores (10-bit mantissa).
    return "ieee" if dtype == torch.float32 else "tf32"


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None
                              else torch.cuda.current_device())
    return 16  # the interpreter: any value works, this one keeps grids small


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _check_inputs(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, out: torch.Tensor | None
) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be (T, Hq, D), got {tuple(q.shape)}")
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2:
        raise ValueError(f"kv_cache must be (num_blocks, 2, block_size, Hkv, D), got "
                         f"{tuple(kv_cache.shape)}")
    t, hq, d = q.shape
    bs, hkv = kv_cache.shape[2], kv_cache.shape[3]
    quant = kv_cache.dtype in _QUANT
    if kv_cache.shape[4] != d + (4 if quant else 0):
        raise ValueError(f"kv_cache rows of {kv_cache.shape[4]} do not fit q head_dim {d}"
                         + (" + a 4-byte scale" if quant else ""))
    if hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")
    if q.dtype not in _DTYPES or (kv_cache.dtype != q.dtype and not quant):
        raise ValueError(f"q/kv_cache dtypes {q.dtype}/{kv_cache.dtype}: need one of {_DTYPES}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {d}")
    if bs & (bs - 1):
        raise ValueError(f"block_size must be a power of two, got {bs}")
    if bs != meta.block_size:
        raise ValueError(f"kv_cache block_size {bs} != metadata block_size {meta.block_size}")
    if q.stride(2) != 1 or kv_cache.stride(4) != 1:
        raise ValueError("q and kv_cache need a contiguous last (head_dim) dimension")
    if q.device != kv_cache.device:
        raise ValueError(f"q on {q.device} but kv_cache on {kv_cache.device}")
    for name in ("query_start_loc", "seq_lens", "block_tables"):
        tensor: torch.Tensor = getattr(meta, name)
        if tensor.device != q.device or tensor.dtype != torch.int32:
            raise ValueError(f"meta.{name} must be int32 on {q.device}, got "
                             f"{tensor.dtype} on {tensor.device}")
    if meta.block_tables.dim() != 2 or meta.block_tables.stride(1) != 1:
        raise ValueError("meta.block_tables must be a (B, max_blocks) row-major tensor")
    if meta.query_start_loc.shape != (meta.num_seqs + 1,) or meta.seq_lens.shape != (
        meta.num_seqs,
    ):
        raise ValueError("meta tensors do not match meta.num_seqs")
    if sum(meta.query_lens_host) != t:
        raise ValueError(f"q has {t} rows but the metadata schedules "
                         f"{sum(meta.query_lens_host)} query tokens")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype
                            or out.device != q.device or out.stride(2) != 1):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device} with a "
                         f"contiguous last dimension")
