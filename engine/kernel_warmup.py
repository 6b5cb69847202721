"""Compile, before serving, every Triton kernel variant an eager step can launch.

Triton compiles a kernel once per combination of its compile-time constants (and of
the integer arguments it specializes on). The model fixes nearly all of them (head_dim,
heads, block size, dtypes); what moves with the batch is the decode attention's split
count, which is always a power of two up to kernels.triton_attention.MAX_SPLITS and,
for sequences of up to max_model_len tokens, up to the count that length picks. So an
eager prefill, an eager decode and a mixed step, plus the decode kernel at each of
those split counts, compile everything; a worker does this before it reports ready, and the first
requests never wait on the compiler (bench/gpu_decode.py counts what compiles later).
The steps store nothing (slot -1) and attend to the null block only.
"""

from __future__ import annotations

import torch

from engine.kv_layout import layer_view
from engine.model import ForwardContext, LlamaModel
from kernels import AttentionMetadata


@torch.inference_mode()
def warm_up_kernels(model: LlamaModel, kv_cache: torch.Tensor, block_size: int,
                    max_model_len: int) -> None:
    from kernels.triton_attention import decode_attention, split_counts

    dev = kv_cache.device
    for query_lens in ([2], [1], [1, 2]):  # prefill, decode, both in one step
        n = sum(query_lens)
        meta = AttentionMetadata.build(query_lens, query_lens, [[0]] * len(query_lens),
                                       block_size, dev)
        ctx = ForwardContext(positions=torch.zeros(n, dtype=torch.long, device=dev),
                             slot_mapping=torch.full((n,), -1, dtype=torch.long, device=dev),
                             attn=meta, kv_cache=kv_cache)
        model.compute_logits(model(torch.zeros(n, dtype=torch.long, device=dev), ctx))
    cfg = model.config
    dtype = model.embed_tokens.weight.dtype
    q = torch.zeros((1, cfg.num_attention_heads, cfg.head_dim), dtype=dtype, device=dev)
    out = torch.empty_like(q)
    meta = AttentionMetadata.build([1], [1], [[0]], block_size, dev)
    for splits in split_counts(max_model_len):
        decode_attention(q, layer_view(kv_cache, 0), meta, cfg.head_dim**-0.5, out, splits)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
