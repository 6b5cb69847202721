"""The engine against Hugging Face transformers: greedy tokens must match exactly.

The reference is a plain greedy loop over transformers' model with its own KV cache,
one prompt at a time (no padding), so any difference is ours. The engine runs all
prompts in one batch (continuous batching, chunked prefill, paged KV).
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.weights import load_model_config, load_state_dict, resolve_model
from tests.helpers_hf import hf_model_from

CHATS = [
    "What is the capital of France?",
    "Write a short poem about autumn leaves.",
    "Explain photosynthesis to a ten year old.",
    "List three prime numbers and explain why they are prime.",
    "How do I reverse a list in Python?",
    "Translate 'good morning' into Spanish and German.",
    "What's 17 times 23? Show your work.",
    "Give me a recipe idea for a quick vegetarian dinner.",
]
N_TOKENS = 48


def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    out: list[int] = []
    with torch.inference_mode():
        res = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            res = model(torch.tensor([[tok]]), past_key_values=res.past_key_values, use_cache=True)
    return out


def hf_reference(model_name: str) -> torch.nn.Module:
    src = resolve_model(model_name)
    cfg = load_model_config(src)
    return hf_model_from(cfg, load_state_dict(src, cfg, torch.float32))


@pytest.fixture(scope="module")
def smollm() -> LLM:
    return LLM(model="smollm2-135m", max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def smollm_hf() -> torch.nn.Module:
    return hf_reference("smollm2-135m")


GREEDY = SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True)


def test_smollm2_batch_matches_transformers(smollm: LLM, smollm_hf: torch.nn.Module) -> None:
    prompts = [smollm.encode_chat([{"role": "user", "content": c}]) for c in CHATS]
    outs = smollm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(smollm_hf, prompt, N_TOKENS)
        assert out.finish_reason == "length"
        assert out.text == smollm.tokenizer.decode(out.token_ids)


@pytest.mark.parametrize("preset", ["tiny-llama3", "tiny-qwen2"])
def test_random_weights_match_transformers(preset: str) -> None:
    name = f"dummy:{preset}"
    llm = LLM(model=name, max_num_batched_tokens=64, block_size=16)
    ref = hf_reference(name)
    g = torch.Generator().manual_seed(1)
    vocab = llm.engine.model_config.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 17, 40, 90)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    for p, o in zip(prompts, outs, strict=True):
        assert o.token_ids == hf_greedy(ref, p, 24)


def test_prefix_cache_hit_gives_same_tokens(smollm: LLM) -> None:
    system = "You are a meticulous assistant who answers briefly and precisely. " * 4
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Name a color."}]
    prompt = smollm.encode_chat(msgs)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    pool = smollm.engine.pool
    smollm.engine.kv.reset_prefix_cache()
    miss = smollm.generate([prompt], params)[0]
    assert miss.num_cached_tokens == 0
    hits_before = pool.prefix_hits
    hit = smollm.generate([prompt], params)[0]
    assert hit.num_cached_tokens >= 16 * (len(prompt) // 16 - 1)
    assert pool.prefix_hits > hits_before
    assert hit.token_ids == miss.token_ids


def test_forced_preemption_gives_same_tokens(smollm: LLM) -> None:
    prompts = [smollm.encode_chat([{"role": "user", "content": c}]) for c in CHATS[:6]]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = [o.token_ids for o in smollm.generate(prompts, params)]
    # Room for ~2.5 requests at a time: the scheduler must preempt and recompute.
    tight = LLM(model="smollm2-135m", num_kv_blocks=16, block_size=16,
                enable_prefix_caching=False, max_num_batched_tokens=128)
    outs = tight.generate(prompts, params)
    assert [o.token_ids for o in outs] == expected
    assert sum(o.num_preemptions for o in outs) > 0
    assert tight.engine.pool.num_free_blocks == tight.engine.pool.num_usable_blocks
