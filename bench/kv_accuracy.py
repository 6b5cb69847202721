"""Accuracy of a quantized KV cache against the model-dtype cache, on the same prompts.

Three measures, each int8 (or fp8) cache vs the fp32 cache of the embedded SmolLM2-135M:

- greedy agreement: 8+ chat prompts x 128 generated tokens (LLM.generate, greedy,
  ignore_eos) with each cache; per prompt the first position where the two outputs
  differ (128 = identical);
- |delta logprob| of the chosen tokens: the fp32 cache's greedy continuation of each
  prompt, teacher-forced through the model with each cache; mean and max over all
  generated positions of |logprob_q - logprob_fp32| of the token fp32 chose;
- perplexity of the model on a fixed text (bench/kv_accuracy_text.txt, public domain,
  ~2.1k tokens), fed in chunks so later chunks read the earlier ones from the cache.

Teacher forcing runs the model directly on one cache tensor (``chosen_logprobs``): the
same weights, a cache of either dtype, the engine's own kernels (native CPU attention
and rotary + store). tests/unit/test_kv_quant_accuracy.py uses it with tolerances.

    python bench/kv_accuracy.py [--kv-dtype int8] [--prompts 8] [--tokens 128]
        [--out bench/results/kv-accuracy-cpu.json]
    python bench/kv_accuracy.py --granularity --out bench/results/kv-accuracy-cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workloads import TOPICS
from engine import LLM, SamplingParams
from engine.kv_layout import KVLayout
from engine.model import ForwardContext, LlamaModel
from kernels import AttentionMetadata
from kernels.kv_quant import dequantize, quantize

TEXT = Path(__file__).with_name("kv_accuracy_text.txt")
KV_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def cache_for(model: LlamaModel, num_tokens: int, kv_dtype: torch.dtype | None,
              block_size: int = 16) -> torch.Tensor:
    """A zeroed cache of blocks 0..n for ``num_tokens`` tokens (block 0: the null block)."""
    cfg = model.config
    dev = model.cos_sin.device
    n = -(-num_tokens // block_size) + 1
    return KVLayout(n, cfg.num_hidden_layers, block_size, cfg.num_key_value_heads,
                    cfg.head_dim, model.embed_tokens.weight.dtype, kv_dtype).allocate(dev)


@torch.inference_mode()
def chosen_logprobs(model: LlamaModel, cache: torch.Tensor, tokens: Sequence[int],
                    chunk: int = 128,
                    after_chunk: Callable[[int, torch.Tensor], None] | None = None,
                    ) -> torch.Tensor:
    """(len(tokens) - 1,) log-probabilities of tokens[1:] given what precedes them,
    computed chunk by chunk: each chunk's K/V is stored into ``cache`` (quantized if the
    cache is) and its queries read the whole prefix back from it. ``after_chunk(i,
    cache)`` runs after chunk i (tests use it to corrupt what a transfer would ship)."""
    bs = cache.shape[3]
    dev = cache.device
    table = list(range(1, cache.shape[0]))
    out = []
    for i, start in enumerate(range(0, len(tokens), chunk)):
        ids = list(tokens[start : start + chunk])
        end = start + len(ids)
        pos = torch.arange(start, end, device=dev)
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(start, end)],
                             device=dev)
        meta = AttentionMetadata.build([len(ids)], [end], [table[: -(-end // bs)]], bs, dev)
        ctx = ForwardContext(positions=pos, slot_mapping=slots, attn=meta, kv_cache=cache)
        hidden = model(torch.tensor(ids, device=dev), ctx)
        out.append(model.compute_logits(hidden).log_softmax(-1))
        if after_chunk is not None:
            after_chunk(i, cache)
    lp = torch.cat(out)[:-1]
    target = torch.tensor(list(tokens[1:]), device=lp.device)
    return lp.gather(1, target[:, None]).squeeze(1).float().cpu()


def granularity_errors(cache: torch.Tensor, num_tokens: int) -> dict[str, float]:
    """Relative round-trip error (||x - deq(q(x))|| / ||x||, K and V of every layer) of
    the real KV in an fp32 ``cache`` holding ``num_tokens`` tokens from block 1 on, for
    int8 scales per (token, head) row -- what kernels.kv_quant stores -- and per
    (block, layer, K/V, head) absmax, the coarser alternative."""
    bs = cache.shape[3]
    n = num_tokens // bs  # whole blocks only, so no zero padding dilutes a block's absmax
    x = cache[1 : 1 + n].float()  # (n, L, 2, bs, Hkv, D)
    per_row = dequantize(quantize(x, torch.int8))
    s_blk = x.abs().amax(dim=(3, 5), keepdim=True) / 127.0  # (n, L, 2, 1, Hkv, 1)
    per_block = (x / torch.where(s_blk > 0, s_blk, 1.0)).round().clamp(-127, 127) * s_blk

    def rel(y: torch.Tensor) -> float:
        return ((y - x).norm() / x.norm()).item()

    return {"per_token_head": rel(per_row), "per_block_head": rel(per_block)}


def perplexity(logprobs: torch.Tensor) -> float:
    return math.exp(-logprobs.double().mean().item())


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def run(kv_name: str, n_prompts: int, n_tokens: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    kv = KV_DTYPES[kv_name]
    params = SamplingParams(temperature=0.0, max_tokens=n_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    base = LLM(num_threads=threads)
    quant = LLM(num_threads=threads, kv_cache_dtype=kv_name)
    chats = [[{"role": "user", "content": f"Tell me about {t}."}] for t in TOPICS[:n_prompts]]
    prompts = [base.encode_chat(c) for c in chats]
    ref = [o.token_ids for o in base.generate(prompts, params)]
    got = [o.token_ids for o in quant.generate(prompts, params)]
    diverge = [first_divergence(a, b) for a, b in zip(ref, got, strict=True)]
    del quant
    model = base.engine.runner.model
    deltas = []
    for p, r in zip(prompts, ref, strict=True):
        seq = p + r
        lp = {}
        for name, dt in (("fp32", None), (kv_name, kv)):
            lp[name] = chosen_logprobs(model, cache_for(model, len(seq), dt), seq)
        gen = slice(len(p) - 1, len(seq) - 1)  # positions that predict the generated tokens
        deltas.append((lp[kv_name][gen] - lp["fp32"][gen]).abs())
    delta = torch.cat(deltas)
    text = base.engine.tokenize(TEXT.read_text())
    ppl = {}
    for name, dt in (("fp32", None), (kv_name, kv)):
        ppl[name] = perplexity(chosen_logprobs(model, cache_for(model, len(text), dt), text,
                                               chunk=256))
    return {
        "kv_dtype": kv_name,
        "model": base.engine.source.name,
        "prompts": n_prompts,
        "tokens_per_prompt": n_tokens,
        "greedy_first_divergence": diverge,
        "greedy_identical_prompts": sum(d == n_tokens for d in diverge),
        "greedy_mean_first_divergence": sum(diverge) / len(diverge),
        "abs_delta_logprob_mean": delta.mean().item(),
        "abs_delta_logprob_max": delta.max().item(),
        "abs_delta_logprob_p99": delta.quantile(0.99).item(),
        "text_tokens": len(text),
        "perplexity_fp32": ppl["fp32"],
        f"perplexity_{kv_name}": ppl[kv_name],
        "perplexity_ratio": ppl[kv_name] / ppl["fp32"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def granularity(threads: int) -> dict:
    """One fp32 pass over the text, then both scale granularities' error on its KV."""
    torch.set_num_threads(threads)
    llm = LLM(num_threads=threads, num_kv_blocks=2)
    model = llm.engine.runner.model
    text = llm.engine.tokenize(TEXT.read_text())
    cache = cache_for(model, len(text), None)
    chosen_logprobs(model, cache, text, chunk=256)
    return {"text_tokens": len(text), "int8_relative_rms_error": granularity_errors(
        cache, len(text))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kv-dtype", choices=sorted(KV_DTYPES), default="int8")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--granularity", action="store_true",
                   help="only measure the round-trip error of per-(token, head) vs "
                        "per-(block, head) int8 scales on the model's KV of the text, and "
                        "add it to --out if that file exists")
    a = p.parse_args(argv)
    if a.granularity:
        g = granularity(a.threads)
        g["command"] = "python bench/kv_accuracy.py " + " ".join(argv or sys.argv[1:])
        print(json.dumps(g, indent=2))
        if a.out and a.out.exists():
            res = json.loads(a.out.read_text())
            res["granularity"] = g
            a.out.write_text(json.dumps(res, indent=2) + "\n")
        return
    res = run(a.kv_dtype, a.prompts, a.tokens, a.threads)
    res["command"] = "python bench/kv_accuracy.py " + " ".join(argv or sys.argv[1:])
    res["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                      "torch": torch.__version__, "threads": a.threads}
    print(json.dumps(res, indent=2))
    if a.out:
        a.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
