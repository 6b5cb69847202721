"""Step c: the engine on the GPU against transformers with identical random weights.

For the tiny Llama-3 and Qwen2 presets (dummy weights: the engine and the reference get
the very same tensors, drawn on the GPU from the run's seed), four prompts of 5-90
random tokens, 24 greedy tokens each, the engine batching them through the Triton
kernels:

- fp32: the engine's tokens must equal transformers' greedy loop (fp32 on the GPU) token
  for token, as they do on CPU (tests/unit/test_engine_hf.py);
- bf16 (the GPU default): free-running token equality with transformers in bf16 is
  reported, and the verdict is teacher-forced: transformers in fp32 scores the engine's
  own bf16 tokens, and every one of them must be the fp32 argmax or within
  ``tol`` (2% of that row's logit standard deviation) of it -- a near-tie that bf16
  rounding may flip, not a wrong token.
"""

from __future__ import annotations

from typing import Any

from bench.gpu_common import StepContext
from bench.gpu_plan import NUM

PRESETS = ("tiny-llama3", "tiny-qwen2")
PROMPT_LENS = (5, 17, 40, 90)
NEW_TOKENS = 24
TOL_FRACTION_OF_STD = 0.02

_CASE = {"preset": str, "dtype": str, "tokens": NUM, "equal_to_hf_same_dtype": NUM,
         "prompts_identical": NUM, "teacher_forced_agree": NUM, "max_margin": NUM,
         "tolerance": NUM, "within_tolerance": bool, "seconds": NUM}
SCHEMA: dict[str, Any] = {"cases": [_CASE]}
FAKE: dict[str, Any] = {"cases": [
    {"preset": "tiny-llama3", "dtype": "float32", "tokens": 96, "equal_to_hf_same_dtype": 96,
     "prompts_identical": 4, "teacher_forced_agree": 96, "max_margin": 0.0,
     "tolerance": 0.002, "within_tolerance": True, "seconds": 1.2},
    {"preset": "tiny-llama3", "dtype": "bfloat16", "tokens": 96,
     "equal_to_hf_same_dtype": 80, "prompts_identical": 3, "teacher_forced_agree": 95,
     "max_margin": 0.0004, "tolerance": 0.002, "within_tolerance": True, "seconds": 0.9},
]}


def headline(r: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in r["cases"]:
        k = f"{c['preset']}_{'fp32' if c['dtype'] == 'float32' else 'bf16'}"
        out[f"{k}_agree"] = f"{c['teacher_forced_agree']}/{c['tokens']}"
    return out


def _hf_model(cfg: Any, sd: dict[str, Any], dtype: Any, device: str) -> Any:
    """transformers' *ForCausalLM for ``cfg`` holding exactly ``sd`` (strict load)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = cfg.to_hf_dict()
    d.setdefault("sliding_window", None)
    hf_cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype)
    sd = {k: v.detach().to(dtype=dtype) for k, v in sd.items()}
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval()


def _hf_greedy(model: Any, prompt: list[int], n: int, device: str) -> list[int]:
    import torch

    out: list[int] = []
    with torch.inference_mode():
        res = model(torch.tensor([prompt], device=device), use_cache=True)
        for _ in range(n):
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            res = model(torch.tensor([[tok]], device=device), past_key_values=res.past_key_values,
                        use_cache=True)
    return out


def _teacher_forced(model: Any, prompt: list[int], tokens: list[int], device: str
                    ) -> tuple[int, float, float]:
    """(positions where ``tokens`` is the model's argmax, the largest logit gap to the
    argmax where it is not, the tolerance for this prompt)."""
    import torch

    with torch.inference_mode():
        ids = torch.tensor([prompt + tokens[:-1]], device=device)
        logits = model(ids).logits[0, len(prompt) - 1:].float()  # (n, V)
    chosen = logits.gather(1, torch.tensor(tokens, device=device)[:, None])[:, 0]
    best = logits.max(dim=1).values
    gap = (best - chosen).clamp_min(0)
    tol = TOL_FRACTION_OF_STD * float(logits.std(dim=1).mean())
    return int((gap == 0).sum()), float(gap.max()), tol


def _case(preset: str, dtype_name: str, device: str, prompt_lens: tuple[int, ...], n: int
          ) -> dict[str, Any]:
    import time

    import torch

    from engine import LLM, SamplingParams
    from engine.weights import load_state_dict, resolve_model

    t0 = time.perf_counter()
    name = f"dummy:{preset}"
    dtype = getattr(torch, dtype_name)
    llm = LLM(model=name, dtype=dtype_name, device=device, max_num_batched_tokens=64,
              block_size=16)
    cfg = llm.engine.model_config
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, cfg.vocab_size, (k,), generator=g).tolist() for k in prompt_lens]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    del llm
    # The engine drew its dummy weights from the same seed on the same device and dtype.
    src = resolve_model(name)
    same = _hf_model(cfg, load_state_dict(src, cfg, dtype, torch.device(device), 0), dtype,
                     device)
    ref = same if dtype == torch.float32 else _hf_model(
        cfg, load_state_dict(src, cfg, dtype, torch.device(device), 0), torch.float32, device)
    equal = identical = agree = 0
    margin, tol = 0.0, float("inf")
    for p, o in zip(prompts, outs, strict=True):
        hf = _hf_greedy(same, p, n, device)
        eq = sum(a == b for a, b in zip(o.token_ids, hf, strict=True))
        equal += eq
        identical += eq == n
        a, m, t = _teacher_forced(ref, p, o.token_ids, device)
        agree, margin, tol = agree + a, max(margin, m), min(tol, t)
    total = n * len(prompts)
    return {"preset": preset, "dtype": dtype_name, "tokens": total,
            "equal_to_hf_same_dtype": equal, "prompts_identical": identical,
            "teacher_forced_agree": agree, "max_margin": margin, "tolerance": tol,
            "within_tolerance": margin <= tol, "seconds": time.perf_counter() - t0}


def run(ctx: StepContext) -> None:
    presets = PRESETS[:1] if ctx.toy else PRESETS
    dtypes = ("float32",) if ctx.toy else ("float32", "bfloat16")
    lens, n = ((5, 17), 4) if ctx.toy else (PROMPT_LENS, NEW_TOKENS)
    cases: list[dict[str, Any]] = []
    for preset in presets:
        for dt in dtypes:
            if not ctx.has_time(8):
                break
            c = _case(preset, dt, ctx.device, lens, n)
            cases.append(c)
            ctx.record("cases", cases)
            tag = f"{preset}_{'fp32' if dt == 'float32' else 'bf16'}"
            if dt == "float32":
                ctx.check(f"{tag}_tokens_equal", c["prompts_identical"] == len(lens))
            else:
                ctx.check(f"{tag}_within_tolerance", c["within_tolerance"])
