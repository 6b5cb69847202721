"""Disaggregated runtime costs on CPU: KV transfer against prefill, and stream overhead.

One prefill and one decode worker (SmolLM2, fp32, 1 torch thread each, ray backend).
Requests run one at a time so each measurement is clean:

- per prompt length: the prefill time on the prefill worker, the KV hand-over
  (gather + put into the object store, on the prefill worker), the decode worker's
  import (fetch + scatter + join, as the router's ``start`` call sees it), and the bytes;
- per output token: the gap between tokens as the client sees it, against the decode
  worker's own step time; the difference is what the router and the Ray stream add.

    python bench/runtime.py [--lengths 128 512 1024 2048] [--reps 3] [--out ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.offline import machine
from engine.config import CacheConfig, EngineConfig
from engine.sampling_params import SamplingParams
from router.config import RouterConfig
from router.core import Router
from router.request_state import Delta, RouterRequest


async def one(router: Router, prompt: list[int], max_tokens: int) -> dict[str, float]:
    done: dict[str, RouterRequest] = {}
    router.on_finish.append(lambda rr, _r: done.setdefault("rr", rr))
    d = next(h for h in router.workers() if h.role == "decode")
    before = await d.actor.stats.remote()
    gaps: list[float] = []
    last = None
    t0 = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    async for item in router.generate(prompt, params):
        now = time.perf_counter()
        if isinstance(item, Delta) and item.token_ids:
            if last is not None:
                gaps.append((now - last) / len(item.token_ids))
            last = now
    total = time.perf_counter() - t0
    after = await d.actor.stats.remote()
    router.on_finish.pop()
    ev = done["rr"].events
    steps = after.steps - before.steps
    step_s = (after.busy_seconds - before.busy_seconds) / max(steps, 1)
    return {
        "prompt_tokens": len(prompt),
        "ttft_s": (ev.first_token or 0) - ev.arrival,
        "prefill_s": ev.prefill_seconds,
        "kv_handover_s": ev.transfer_seconds,
        "kv_import_s": ev.import_seconds,
        "kv_bytes": ev.transfer_bytes,
        "itl_client_s": statistics.median(gaps) if gaps else 0.0,
        "decode_step_s": step_s,
        "e2e_s": total,
    }


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    cfg = RouterConfig(engine=EngineConfig(cache=CacheConfig(memory_bytes=512 << 20,
                                                             enable_prefix_caching=False)))
    router = Router(cfg)
    await router.start()
    vocab = router.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = []
    try:
        await one(router, torch.randint(100, vocab, (64,), generator=g).tolist(), 8)  # warm
        for n in args.lengths:
            for _ in range(args.reps):
                prompt = torch.randint(100, vocab, (n,), generator=g).tolist()
                rows.append(await one(router, prompt, args.max_tokens))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        await router.shutdown()
    return {"rows": rows}


def summarize(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    out = []
    for n in sorted({int(r["prompt_tokens"]) for r in rows}):
        rs = [r for r in rows if r["prompt_tokens"] == n]

        def med(k: str, rs: list[dict[str, float]] = rs) -> float:
            return statistics.median(r[k] for r in rs)

        out.append({
            "prompt_tokens": n,
            "prefill_s": med("prefill_s"),
            "kv_handover_s": med("kv_handover_s"),
            "kv_import_s": med("kv_import_s"),
            "kv_mib": med("kv_bytes") / 2**20,
            "transfer_over_prefill": (med("kv_handover_s") + med("kv_import_s"))
            / med("prefill_s"),
            "ttft_s": med("ttft_s"),
            "itl_client_ms": 1e3 * med("itl_client_s"),
            "decode_step_ms": 1e3 * med("decode_step_s"),
            "stream_overhead_ms": 1e3 * (med("itl_client_s") - med("decode_step_s")),
        })
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default="bench/results/runtime-cpu.json")
    args = ap.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=512 << 20,
             log_to_driver=False)
    res = asyncio.run(main_async(args))
    table = summarize(res["rows"])  # type: ignore[arg-type]
    result = {"command": "python " + " ".join(sys.argv), "machine": machine(),
              "setup": "1 prefill + 1 decode worker, SmolLM2-135M fp32, 1 thread each, ray "
                       "backend, requests one at a time, medians over reps",
              "summary": table, **res}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for row in table:
        print("  ".join(f"{k}={v:.4g}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
