"""How much a prefill on one core slows a decode step on the other, with nothing else
running: no router, no Ray, no gRPC. Two processes, one torch thread each, the same
SmolLM2 engine a worker runs:

    decode process   a batch of ``--batch`` sequences (64-token prompts) decoding; each
                     engine step is timed, first alone, then while
    prefill process  loops prefilling ``--prompt``-token prompts (max_tokens 1)

The ratio of the step times is the floor under disaggregated TPOT on this machine:
the interference that separate workers cannot remove because they share the socket
(memory bandwidth, caches), whatever the serving system does.

    python -m bench.contention [--batch 8] [--seconds 15] [--out bench/results/...]

``--serving`` measures what a client sees instead (bench/contention_serving.py): inter-
token gap p99 of steady streams on a running deployment, calm vs. while long prompts
arrive in bursts, median of three runs each:

    python -m bench.contention --serving [--mode disaggregated] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import statistics
import time
from pathlib import Path

from engine.config import CacheConfig, EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

CFG = EngineConfig(num_threads=1, cache=CacheConfig(memory_bytes=512 << 20,
                                                    enable_prefix_caching=False))


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 49000) for _ in range(n)]


def prefill_loop(start: mp.Event, stop: mp.Event, prompt: int, done: mp.Value) -> None:
    engine = LLMEngine(CFG, detokenize=False)
    rng = random.Random(1)
    start.wait()
    while not stop.is_set():
        engine.add_request(_ids(rng, prompt), SamplingParams(max_tokens=1, ignore_eos=True))
        while engine.has_unfinished() and not stop.is_set():
            engine.step()
        with done.get_lock():
            done.value += 1


def timed_steps(engine: LLMEngine, seconds: float) -> list[float]:
    out: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        engine.step()
        out.append(time.perf_counter() - t)
    return out


def summary(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"steps": len(s), "median_ms": 1e3 * statistics.median(s),
            "p90_ms": 1e3 * s[int(0.9 * (len(s) - 1))], "mean_ms": 1e3 * statistics.mean(s)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=1536)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--out", default="bench/results/contention-cpu.json")
    ap.add_argument("--serving", action="store_true",
                    help="client ITL p99 under bursts vs calm on a served deployment")
    ap.add_argument("--mode", default="disaggregated", choices=("disaggregated", "colocated"))
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if args.serving:
        from bench.contention_serving import main as serving_main

        out = args.out if args.out != ap.get_default("out") else None
        return serving_main(args.mode, args.runs, out)
    ctx = mp.get_context("spawn")
    start, stop, done = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
    other = ctx.Process(target=prefill_loop, args=(start, stop, args.prompt, done))
    other.daemon = True  # never outlive this process, even on an error
    other.start()
    engine = LLMEngine(CFG, detokenize=False)
    rng = random.Random(0)
    for _ in range(args.batch):
        engine.add_request(_ids(rng, 64), SamplingParams(max_tokens=4000, ignore_eos=True))
    for _ in range(20):  # prefill the batch and warm up
        engine.step()
    alone = timed_steps(engine, args.seconds)
    start.set()
    time.sleep(2.0)  # let the other process get into its prefill
    contended = timed_steps(engine, args.seconds)
    stop.set()
    other.join(60)
    from bench.offline import machine

    result = {"machine": machine(), "command": "python -m bench.contention " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
              "setup": f"decode batch {args.batch} (1 thread) alone, then beside a process "
                       f"prefilling {args.prompt}-token prompts (1 thread)",
              "decode_alone": summary(alone), "decode_beside_prefill": summary(contended),
              "prefills_done": done.value}
    a, c = result["decode_alone"], result["decode_beside_prefill"]
    result["median_slowdown"] = c["median_ms"] / a["median_ms"]
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
