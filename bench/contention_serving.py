"""Bursts against running streams, as a client sees them: inter-token gap p99.

One deployment (`pdserve serve`, 1 prefill + 1 decode worker with 1 thread each, or a
colocated one of 2 workers), then ``runs`` times, alternating:

    calm    6 greedy streams of 200 tokens (64-token prompts), nothing else
    bursts  the same 6 streams while a 1500-token prompt (8 output tokens, so its KV
            is imported by the decode worker) arrives every 2 s

A message carrying k tokens after a gap g counts as k gaps of g / k (bench/loadgen.py's
convention). The figure is the median over runs of p99(bursts) / p99(calm); the
per-run p50/p99 are kept. Fresh random prompts each time: no prefix-cache hits.

    python -m bench.contention --serving [--mode disaggregated] [--runs 3]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import sys
import time
from pathlib import Path

import grpc

from bench.serving import Deployment, ServerProcess
from proto.pdserve.v1 import generation_pb2 as pb
from proto.pdserve.v1 import generation_pb2_grpc as pb_grpc

STREAMS, STREAM_TOKENS, STREAM_PROMPT = 6, 200, 64
BURST_PROMPT, BURST_TOKENS, BURST_EVERY_S = 1500, 8, 2.0


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 49000) for _ in range(n)]


def _request(rid: str, ids: list[int], max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=rid, token_ids=pb.TokenIds(ids=ids),
                              sampling=pb.SamplingParams(temperature=0.0, ignore_eos=True,
                                                         max_tokens=max_tokens))


async def one_run(target: str, bursts: bool, rng: random.Random, tag: str) -> dict[str, float]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        gaps: list[float] = []

        async def stream(i: int) -> None:
            last: float | None = None
            n = 0
            async for r in stub.Generate(_request(f"{tag}-s{i}", _ids(rng, STREAM_PROMPT),
                                                  STREAM_TOKENS), timeout=600):
                k = len(r.token_ids)
                if not k:
                    continue
                now = time.perf_counter()
                if last is not None:
                    gaps.extend([(now - last) / k] * k)
                last, n = now, n + k
            assert n == STREAM_TOKENS, f"{tag}-s{i}: {n} tokens"

        async def burster(stop: asyncio.Event) -> int:
            sent: list[asyncio.Task[None]] = []

            async def burst(j: int) -> None:
                async for _ in stub.Generate(_request(f"{tag}-b{j}", _ids(rng, BURST_PROMPT),
                                                      BURST_TOKENS), timeout=600):
                    pass

            while not stop.is_set():
                sent.append(asyncio.get_running_loop().create_task(burst(len(sent))))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), BURST_EVERY_S)
            # Bursts come faster than one prefill thread serves them: those still queued
            # when the streams end are cancelled (aborted on the server), not waited for.
            for t in sent:
                t.cancel()
            await asyncio.gather(*sent, return_exceptions=True)
            return len(sent)

        stop = asyncio.Event()
        b = asyncio.get_running_loop().create_task(burster(stop)) if bursts else None
        if b is not None:
            await asyncio.sleep(0.5)  # the first burst prompt is in prefill
        await asyncio.gather(*(stream(i) for i in range(STREAMS)))
        stop.set()
        n_bursts = await b if b is not None else 0
    s = sorted(gaps)
    return {"p50_ms": 1e3 * statistics.median(s), "p99_ms": 1e3 * s[int(0.99 * (len(s) - 1))],
            "gaps": len(s), "bursts": n_bursts}


def measure(dep: Deployment, runs: int, log_dir: Path) -> dict[str, object]:
    from bench.loadgen import wait_ready

    rng = random.Random(0)
    rows: list[dict[str, object]] = []
    with ServerProcess(dep, log_dir) as target:
        asyncio.run(wait_ready(target, timeout_s=600))
        asyncio.run(one_run(target, True, rng, "warm"))  # both paths warm
        for r in range(runs):
            calm = asyncio.run(one_run(target, False, rng, f"calm{r}"))
            burst = asyncio.run(one_run(target, True, rng, f"burst{r}"))
            rows.append({"calm": calm, "bursts": burst,
                         "p99_ratio": burst["p99_ms"] / calm["p99_ms"]})
            print(f"[contention] {dep.name} run {r + 1}: ITL p99 calm {calm['p99_ms']:.1f} ms, "
                  f"bursts {burst['p99_ms']:.1f} ms ({burst['bursts']} bursts), ratio "
                  f"{rows[-1]['p99_ratio']:.2f}", file=sys.stderr, flush=True)
    return {"deployment": " ".join(dep.args()), "runs": rows,
            "median_p99_ratio": statistics.median(float(r["p99_ratio"])  # type: ignore[arg-type]
                                                  for r in rows)}


def main(mode: str, runs: int, out: str | None) -> int:
    from bench.offline import machine

    dep = (Deployment("itl-disaggregated", prefill_workers=1, decode_workers=1, threads=1)
           if mode == "disaggregated" else
           Deployment("itl-colocated", mode="colocated", workers=2, threads=1))
    out_path = Path(out or f"bench/results/contention-serving-{mode}.json")
    result = {"command": "python -m bench.contention " + " ".join(sys.argv[1:]),
              "machine": machine(),
              "setup": f"{STREAMS} greedy streams of {STREAM_TOKENS} tokens; bursts: a "
                       f"{BURST_PROMPT}-token prompt ({BURST_TOKENS} output tokens) every "
                       f"{BURST_EVERY_S:g} s; client inter-token gaps",
              **measure(dep, runs, out_path.parent / "contention" / "logs")}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"median_p99_ratio": result["median_p99_ratio"]}))
    return 0
