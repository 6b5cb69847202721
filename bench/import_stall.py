"""What a KV import costs the streams already decoding, with nothing else running.

One decode engine (SmolLM2 fp32, 1 thread, as a decode worker runs it) decodes 6
streams; every 20 steps a 1500-token prompt's KV (~69 MB) arrives and is imported:

    whole    the old path: all its blocks scattered in one go between two steps, then
             the join (what DecodeWorker.start did before decode_worker/staged_import.py)
    staged   StagedImports: one slice before each step, sized to a share of the step

The figure is the gap between consecutive step ends (a stream's inter-token time on
the worker), p99 and max, against the same engine with no imports (calm); the modes
take turns on one engine, ``--rounds`` times, and the ratio is the median over rounds. No prefill
runs beside it, so this isolates the import itself; bench/contention_serving.py measures
what a client sees with the prefill worker's contention included.

    python -m bench.import_stall [--imports 6] [--rounds 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from decode_worker.staged_import import StagedImport, StagedImports
from engine.config import CacheConfig, EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

CFG = EngineConfig(num_threads=1, cache=CacheConfig(memory_bytes=640 << 20,
                                                    enable_prefix_caching=False))
STREAMS, PROMPT, EVERY = 6, 1500, 20
MODES = ("calm", "whole", "staged")


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 49000) for _ in range(n)]


def segment(e: LLMEngine, staged: StagedImports, mode: str, imports: int,
            rng: random.Random) -> list[float]:
    """Gaps between step ends (s) over ``imports`` * EVERY steps of one mode."""
    block_shape = e.layout.block_shape
    gaps: list[float] = []
    last = time.perf_counter()
    for step in range(imports * EVERY):
        if mode != "calm" and step % EVERY == EVERY // 2:
            rid = f"imp-{mode}-{rng.random()}"
            params = SamplingParams(max_tokens=8, ignore_eos=True)
            blocks = e.reserve(_ids(rng, PROMPT), params, rid)
            assert blocks is not None
            kv = torch.randn(len(blocks), *block_shape) * 0.1  # what the transfer brought

            def join(eng: LLMEngine, rid: str = rid) -> RequestOutput | None:
                return eng.start_prefilled(rid, 1000)

            if mode == "whole":
                e.import_kv(blocks, kv)
                join(e)
            else:
                staged.add(StagedImport(rid, blocks, kv, join))
        if staged.pending():
            staged.run(e)
        e.step()
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    return gaps


def run(imports: int, rounds: int) -> tuple[dict[str, list[float]], list[dict[str, float]]]:
    """One engine; the modes interleaved round by round (the streams' contexts grow and
    a shared machine's load drifts: both hit every mode alike). Returns every mode's
    gaps and each round's p99 per mode."""
    rng = random.Random(0)
    e = LLMEngine(CFG, detokenize=False)
    for i in range(STREAMS):
        e.add_request(_ids(rng, 64), SamplingParams(max_tokens=4000, ignore_eos=True), f"s{i}")
    for _ in range(20):  # prefill the streams, warm up
        e.step()
    staged = StagedImports()
    gaps: dict[str, list[float]] = {m: [] for m in MODES}
    per_round = []
    for _ in range(rounds):
        row = {}
        for m in MODES:
            g = segment(e, staged, m, imports, rng)
            gaps[m] += g
            row[m] = summary(g)["p99_ms"]
        per_round.append(row)
    return gaps, per_round


def summary(gaps: list[float]) -> dict[str, float]:
    s = sorted(gaps)
    return {"median_ms": 1e3 * statistics.median(s), "p99_ms": 1e3 * s[int(0.99 * (len(s) - 1))],
            "max_ms": 1e3 * s[-1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--imports", type=int, default=6, help="imports per mode and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench/results/import-stall-cpu.json")
    args = ap.parse_args()
    from bench.offline import machine

    gaps, per_round = run(args.imports, args.rounds)
    res = {m: summary(gaps[m]) for m in MODES}
    ratios = {m: statistics.median(r[m] / r["calm"] for r in per_round) for m in MODES}
    result = {"command": "python -m bench.import_stall " + " ".join(sys.argv[1:]),
              "machine": machine(),
              "setup": f"{STREAMS} decoding streams, 1 thread; a {PROMPT}-token prompt's KV "
                       f"imported every {EVERY} steps; modes interleaved, {args.rounds} rounds",
              **res, "p99_ms_per_round": per_round,
              "median_p99_over_calm": {m: round(v, 3) for m, v in ratios.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
