"""Offline throughput: pdserve's LLM.generate against transformers' static batching.

Both run in this process, same weights (the embedded SmolLM2, fp32), same thread count,
alternating, several runs each. The workload is 32 chat prompts whose requested output
lengths are spread evenly over 16..160 tokens (ignore_eos, greedy). Transformers gets
one left-padded batch with max_new_tokens = the largest asked, the way static batching
is used; only the tokens each prompt asked for count as useful for both.

    python bench/offline.py [--runs 3] [--threads 2] [--out bench/results/offline-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workloads import TOPICS
from engine import LLM, SamplingParams
from engine.weights import load_model_config, load_state_dict, resolve_model


def workload(n: int = 32) -> tuple[list[list[dict[str, str]]], list[int]]:
    chats = [[{"role": "user", "content": f"Tell me about {t}."}] for t in TOPICS[:n]]
    lengths = [round(16 + i * (160 - 16) / (n - 1)) for i in range(n)]
    # Interleave long and short so neither system benefits from a sorted order.
    order = [i // 2 if i % 2 == 0 else n - 1 - i // 2 for i in range(n)]
    return chats, [lengths[i] for i in order]


def hf_model(model: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    src = resolve_model(model)
    cfg = load_model_config(src)
    hf_cfg = AutoConfig.for_model(**cfg.to_hf_dict())
    m = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa",
                                         dtype=torch.float32)
    m.load_state_dict(load_state_dict(src, cfg, torch.float32), strict=False)
    m.tie_weights()
    return m.eval()


def run_pdserve(llm: LLM, prompts: list[list[int]], lengths: list[int]) -> float:
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    llm.engine.kv.reset_prefix_cache()  # every run starts cold
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    assert [len(o.token_ids) for o in outs] == lengths
    return dt


def run_hf(model: torch.nn.Module, prompts: list[list[int]], lengths: list[int], pad: int) -> float:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(lengths),
                             min_new_tokens=max(lengths), do_sample=False, pad_token_id=pad)
    dt = time.perf_counter() - t0
    assert out.shape[1] == width + max(lengths)
    return dt


def machine() -> dict[str, object]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/offline-cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    llm = LLM(model=args.model, max_num_seqs=64, max_num_batched_tokens=512)
    hf = hf_model(args.model)
    chats, lengths = workload()
    prompts = [llm.encode_chat(c) for c in chats]
    useful = sum(lengths)
    pad = llm.tokenizer.eos_token_id if llm.tokenizer and llm.tokenizer.eos_token_id else 0

    run_pdserve(llm, prompts[:4], lengths[:4])  # warm-up both (allocator, thread pools)
    run_hf(hf, prompts[:4], [8] * 4, pad)
    times: dict[str, list[float]] = {"pdserve": [], "transformers": []}
    for r in range(args.runs):
        times["pdserve"].append(run_pdserve(llm, prompts, lengths))
        times["transformers"].append(run_hf(hf, prompts, lengths, pad))
        print(f"run {r + 1}/{args.runs}: pdserve {times['pdserve'][-1]:.2f}s  "
              f"transformers {times['transformers'][-1]:.2f}s", flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: useful / v for k, v in med.items()}
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": machine(),
        "threads": args.threads,
        "workload": {"prompts": len(prompts), "prompt_tokens": sum(map(len, prompts)),
                     "useful_output_tokens": useful, "output_lengths": "16..160 even spread",
                     "transformers_generated_tokens": len(prompts) * max(lengths)},
        "seconds": times,
        "median_seconds": med,
        "useful_tokens_per_s": tps,
        "ratio_pdserve_over_transformers": tps["pdserve"] / tps["transformers"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"pdserve {tps['pdserve']:.1f} tok/s, transformers {tps['transformers']:.1f} tok/s, "
          f"ratio {result['ratio_pdserve_over_transformers']:.2f}x  -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
