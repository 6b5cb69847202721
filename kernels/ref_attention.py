"""Torch path of paged attention (the CPU implementation and the kernels' reference).

Decode sequences are batched into one SDPA call over their gathered blocks; each
prefill chunk gets its own call. The gather indices come from the step's CpuPlan, so
per layer this is one gather plus a few SDPA calls.

On CPU fp32 (the engine's CPU path) the native kernel (kernels/cpu_native.py) computes
the whole step instead, decode rows and prefill chunks in one call, reading the blocks
in place (2.5-7x faster than the code below at every size measured, see
docs/kernels.md). ``native=False`` forces the torch code, which is also what runs when
the kernel cannot be built or does not take the shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import cpu_native
from kernels.kv_quant import read_rows
from kernels.metadata import AttentionMetadata, _plan_cpu


def paged_attention_torch(
    q: torch.Tensor,  # (T, Hq, D)
    kv_cache: torch.Tensor,  # (num_blocks, 2, block_size, Hkv, D), any strides
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,
    native: bool = True,
) -> torch.Tensor:  # (T, Hq, D)
    if native and cpu_native.supports(q, kv_cache, meta) and (out is None or out.stride(2) == 1):
        out = torch.empty_like(q) if out is None else out
        cpu_native.paged_attention_native(q, kv_cache, meta, scale, out)
        return out
    plan = meta.cpu_plan
    if plan is None:  # metadata built for CUDA but run on the torch path (tests)
        starts = [0]
        for ql in meta.query_lens_host:
            starts.append(starts[-1] + ql)
        bts = meta.block_tables.tolist()
        plan = _plan_cpu(starts, meta.query_lens_host, meta.seq_lens_host, bts, meta.block_size)
        plan.decode_rows = plan.decode_rows.to(q.device)
        plan.decode_block_tables = plan.decode_block_tables.to(q.device)
        plan.decode_mask = plan.decode_mask.to(q.device)
    if out is None:
        out = torch.empty_like(q)
    _, _, bs, hkv, _ = kv_cache.shape
    d = q.shape[2]
    gqa = q.shape[1] != hkv
    if plan.decode_rows.numel():
        bd, nb = plan.decode_block_tables.shape
        # Gather K and V separately so each comes out contiguous and the reshape is a view.
        # index_select, not advanced indexing: ~8x faster on CPU for this gather.
        flat = plan.decode_block_tables.view(-1)
        k = read_rows(kv_cache[:, 0].index_select(0, flat), q.dtype).view(bd, nb * bs, hkv, d)
        v = read_rows(kv_cache[:, 1].index_select(0, flat), q.dtype).view(bd, nb * bs, hkv, d)
        # (Bd, Lk, Hkv, D) each; a quantized cache is dequantized as gathered
        all_decode = bd == q.shape[0]  # rows are 0..T-1 in order: no row gather/scatter
        qd = (q if all_decode else q[plan.decode_rows]).unsqueeze(2)  # (Bd, Hq, 1, D)
        o = F.scaled_dot_product_attention(
            qd, k.transpose(1, 2), v.transpose(1, 2), attn_mask=plan.decode_mask, scale=scale,
            enable_gqa=gqa,
        )
        if all_decode:
            out.copy_(o.squeeze(2))
        else:
            out[plan.decode_rows] = o.squeeze(2)
    for start, ql, ids, sl, causal in plan.prefills:
        ids = ids.to(q.device)
        k = read_rows(kv_cache[:, 0].index_select(0, ids), q.dtype)
        k = k.reshape(-1, hkv, d)[:sl].transpose(0, 1)  # (Hkv, sl, D) each
        v = read_rows(kv_cache[:, 1].index_select(0, ids), q.dtype)
        v = v.reshape(-1, hkv, d)[:sl].transpose(0, 1)
        qp = q[start : start + ql].transpose(0, 1)  # (Hq, ql, D)
        if causal is None:
            o = F.scaled_dot_product_attention(qp, k, v, is_causal=True, scale=scale,
                                               enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(qp, k, v, attn_mask=causal.to(q.device),
                                               scale=scale, enable_gqa=gqa)
        out[start : start + ql] = o.transpose(0, 1)
    return out


def paged_attention_naive(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Slow, obviously correct reference: explicit softmax per sequence, fp32 maths."""
    out = torch.empty_like(q)
    bs = kv_cache.shape[2]
    hq, hkv = q.shape[1], kv_cache.shape[3]
    starts = meta.query_start_loc.tolist()
    bts = meta.block_tables.tolist()
    for b, (ql, sl) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host, strict=True)):
        slots = [bts[b][p // bs] * bs + p % bs for p in range(sl)]
        flat = kv_cache.reshape(-1, *kv_cache.shape[1:])  # keep (blk, 2, bs, H, D)
        k = torch.stack([flat[s // bs, 0, s % bs] for s in slots])  # (sl, Hkv, row)
        v = torch.stack([flat[s // bs, 1, s % bs] for s in slots])
        k, v = read_rows(k, torch.float32).float(), read_rows(v, torch.float32).float()
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
        qs = q[starts[b] : starts[b] + ql].float()  # (ql, Hq, D)
        scores = torch.einsum("qhd,khd->hqk", qs, k) * scale
        qpos = torch.arange(sl - ql, sl).unsqueeze(1)
        scores = scores.masked_fill(torch.arange(sl).unsqueeze(0) > qpos, float("-inf"))
        o = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        out[starts[b] : starts[b] + ql] = o.to(q.dtype)
    return out
