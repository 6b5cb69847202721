"""The prefix cache's spill tier: median TTFT with the tier vs without, side by side.

Workload: ``--prefixes`` distinct 512-token documents (SmolLM2's tokenizer on seeded
topic text), each asked ``--rounds`` times a run with a short question, cycling
round robin over the documents; one request at a time (TTFT is the prefill, not a
queue). The KV pool holds ``--pool-prefixes`` of the documents, fewer than there are, so
round-robin order evicts every document before it comes back: without a tier each
request recomputes its document; with one, its 31 full blocks come back from host
memory and only the question is computed.

Three engines in this process, same weights (the embedded SmolLM2-135M, fp32) and
pool: no tier, an int8 tier (CPU's default) and a lossless tier ("same"). One pass
over the documents warms all three (not measured); then each run measures the rounds,
the three engines taking turns request by request so the machine's load hits them
alike. ``--runs`` runs; medians of the per-run medians, and their ratio.

Also reported: how the tiers' answers compare with the no-tier engine's (greedy, 4
tokens): tokens identical, first divergence, max |delta logprob| before it.

    python bench/spill.py [--runs 3] [--threads 2] [--out bench/results/spill-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workloads import TOPICS
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

DOC_TOKENS = 512  # 32 blocks of 16
PARAMS = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=0)
TIERS = {"none": 0, "int8": 1 << 30, "same": 1 << 30}  # spill_memory_bytes; 1 GiB holds all


def documents(engine: LLMEngine, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        ids = engine.tokenize(f"Document {i}.")
        while len(ids) < DOC_TOKENS:  # section by section: tokenizing is not free
            topic = rng.choice(TOPICS)
            ids += engine.tokenize(f" Section on {topic}: a note about {topic}, number "
                                   f"{rng.randrange(1000)}.")
        docs.append(ids[:DOC_TOKENS])
    return docs


def build(tier: str, pool_blocks: int, threads: int) -> LLMEngine:
    cache = CacheConfig(num_blocks=pool_blocks + 1, spill_memory_bytes=TIERS[tier],
                        spill_dtype="int8" if tier == "int8" else "same")
    return LLMEngine(EngineConfig(cache=cache, num_threads=threads,
                                  scheduler=SchedulerConfig(max_num_seqs=4)),
                     detokenize=False)


def ask(engine: LLMEngine, prompt: list[int]) -> tuple[float, list[int], list[float], int]:
    """(TTFT seconds, tokens, chosen logprobs, cached prompt tokens) of one request."""
    t0 = time.perf_counter()
    engine.add_request(prompt, PARAMS)
    ttft = None
    while engine.has_unfinished():
        for out in engine.step():
            if ttft is None and out.token_ids:
                ttft = time.perf_counter() - t0
            if out.finish_reason is not None:
                engine.audit()
                assert ttft is not None
                return (ttft, out.token_ids, [lp.logprob for lp in out.logprobs],
                        out.num_cached_tokens)
    raise RuntimeError("the request did not finish")


def warm(engines: dict[str, LLMEngine], docs: list[list[int]]) -> None:
    """Every document computed once (and, but for the pool's last few, evicted): the
    round-robin order keeps it so from one run to the next."""
    for e in engines.values():
        for d in docs:
            ask(e, [*d, *e.tokenize(" Warm-up.")])


def one_run(engines: dict[str, LLMEngine], docs: list[list[int]], rounds: int
            ) -> dict[str, Any]:
    questions = [engines["none"].tokenize(f" Question: what does section {j} say?")
                 for j in range(rounds)]
    res: dict[str, Any] = {t: {"ttft": [], "cached": [], "answers": []} for t in engines}
    for r in range(rounds):
        for d in docs:
            for tier, e in engines.items():
                ttft, toks, lps, cached = ask(e, [*d, *questions[r]])
                res[tier]["ttft"].append(ttft)
                res[tier]["cached"].append(cached)
                res[tier]["answers"].append((toks, lps))
    return res


def agreement(ref: list[tuple[list[int], list[float]]],
              got: list[tuple[list[int], list[float]]]) -> dict[str, Any]:
    same, first_div, max_dlp = 0, [], 0.0
    for (rt, rl), (gt, gl) in zip(ref, got, strict=True):
        n = next((i for i, (a, b) in enumerate(zip(rt, gt, strict=True)) if a != b), len(rt))
        same += n == len(rt)
        first_div.append(n)
        max_dlp = max([max_dlp, *(abs(a - b) for a, b in zip(rl[:n], gl[:n], strict=True))])
    return {"identical_answers": same, "answers": len(ref), "min_first_divergence": min(first_div),
            "max_abs_delta_logprob": max_dlp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefixes", type=int, default=4)
    ap.add_argument("--pool-prefixes", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default="bench/results/spill-cpu.json")
    a = ap.parse_args()
    pool_blocks = a.pool_prefixes * (DOC_TOKENS // 16 + 2)  # a document, a question, room
    engines = {t: build(t, pool_blocks, a.threads) for t in TIERS}
    docs = documents(engines["none"], a.prefixes)
    warm(engines, docs)
    runs = []
    for i in range(a.runs):
        res = one_run(engines, docs, a.rounds)
        med = {t: statistics.median(r["ttft"]) for t, r in res.items()}
        print(f"run {i + 1}: median TTFT " + ", ".join(f"{t} {v * 1000:.1f} ms"
                                                        for t, v in med.items()), flush=True)
        runs.append({"median_ttft_s": med,
                     "cached_tokens": {t: r["cached"] for t, r in res.items()},
                     "agreement": {t: agreement(res["none"]["answers"], res[t]["answers"])
                                   for t in ("int8", "same")}})
    medians = {t: statistics.median(r["median_ttft_s"][t] for r in runs) for t in TIERS}
    stats = {t: dataclass_dict(e.stats()) for t, e in engines.items()}
    result = {
        "bench": "spill", "command": "python bench/spill.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared and contended "
                   "(other engineers' tests and a soak benchmark ran beside it)",
        "model": "smollm2-135m (embedded), fp32 pool", "threads": a.threads,
        "workload": {"documents": a.prefixes, "document_tokens": DOC_TOKENS,
                     "pool_holds_documents": a.pool_prefixes, "pool_blocks": pool_blocks,
                     "rounds": a.rounds, "max_tokens": PARAMS.max_tokens},
        "median_ttft_s": medians,
        "ttft_ratio_none_over": {t: medians["none"] / medians[t] for t in ("int8", "same")},
        "runs": runs, "engine_stats": stats,
    }
    print(json.dumps({k: result[k] for k in ("median_ttft_s", "ttft_ratio_none_over")},
                     indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


def dataclass_dict(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj)


if __name__ == "__main__":
    main()
