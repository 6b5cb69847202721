"""Serving at a fixed KV memory budget, per KV dtype: what int8 blocks buy when the pool
is what limits the decode batch.

Two deployments of 1 prefill + 1 decode worker, identical except ``--kv-cache-dtype``
(auto: fp32 on CPU, vs int8), each worker with the same ``--kv-cache-memory`` budget,
small enough that the fp32 decode pool holds only ~10 sequences of the workload. Both
run side by side; the same seeded workload goes to one then the other, the order
alternating run by run (so a machine that gets busier or calmer weighs on both), and
each figure is the median over ``--runs``.

Per dtype: the decode pool (blocks, bytes a block, sequences of the workload it fits),
the decode batch -- running requests on the decode worker, sampled from GetServerInfo
every ``SAMPLE_S`` during the run: a count, so load on a shared machine slows it but
does not bias it -- peak and mean, its preemptions (each a migration: the router
prefills the request again), goodput (requests meeting the serving suite's "stream"
SLO per second of the run, and a relaxed one), throughput, TTFT/TPOT percentiles; then
int8 / fp32. With the defaults (0.08 GiB, 64 + 96 tokens: 10 blocks a sequence) the
fp32 decode pool holds 11 sequences and the int8 one 43.

    python -m bench.kv_budget_serving [--runs 3] [--kv-cache-memory 0.08]
        [--requests 24] [--rate 2] [--prompt-tokens 64] [--output-tokens 96]
        [--out bench/results/kv-budget-serving-cpu.json]
    (or: pdserve bench kv-budget ...)

On CPU, int8 decode attention costs ~1.8x fp32's per call (docs/benchmarks.md section
9), so a larger batch need not mean more goodput there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.loadgen import LoadConfig, run_load, wait_ready
from bench.report import Slo, summarize
from bench.serving import Deployment, ServerProcess
from bench.suite import SLOS, slos_json
from bench.workloads import FIRST_PLAIN_ID, RequestSpec, poisson_arrivals
from proto.pdserve.v1 import generation_pb2 as pb
from proto.pdserve.v1 import generation_pb2_grpc as pb_grpc

DTYPES = ("auto", "int8")  # auto: the model dtype, fp32 on CPU
SAMPLE_S = 0.25  # GetServerInfo poll period during a run
KIND = "stream"  # the serving suite's SLO class for decode streams (bench/suite.py)
# Goodput is also judged against a looser SLO: on the shared 2-core machine a 64-token
# prompt's TTFT alone is ~2.5 s under load, so the suite's SLO may pass nobody, and a
# ratio of zeros says nothing.
RELAXED = Slo(ttft_s=10.0, tpot_s=0.5)
DRAIN_S = 300.0  # after the last arrival: a full fp32 pool drains slowly


@dataclass(frozen=True)
class BudgetDeployment(Deployment):
    """A bench/serving.py deployment with a KV memory budget and a KV dtype."""

    kv_cache_memory_gib: float = 0.08
    kv_cache_dtype: str = "auto"

    def args(self) -> list[str]:
        return [*super().args(), "--kv-cache-memory", f"{self.kv_cache_memory_gib:g}",
                "--kv-cache-dtype", self.kv_cache_dtype]


@dataclass(frozen=True)
class BudgetConfig:
    """The workload: ``requests`` token-id prompts of ``prompt_tokens`` arriving as
    Poisson(``rate``), each decoding exactly ``output_tokens`` (ignore_eos)."""

    runs: int = 3
    kv_cache_memory_gib: float = 0.08
    requests: int = 24
    rate: float = 2.0
    prompt_tokens: int = 64
    output_tokens: int = 96
    seed: int = 0
    model: str | None = None
    out: Path = Path("bench/results/kv-budget-serving-cpu.json")
    log_dir: Path = Path("bench/results/logs")


def workload(cfg: BudgetConfig, vocab_size: int, seed: int) -> list[RequestSpec]:
    """The same for both dtypes within a run; a new seed per run, so no run's prompts
    are prefix-cache hits of an earlier one."""
    rng = random.Random(seed)
    times = poisson_arrivals(rng, cfg.rate, 1e9, cfg.requests)
    return [RequestSpec(i, t, KIND, cfg.output_tokens, prompt_ids=tuple(
        rng.randrange(FIRST_PLAIN_ID, vocab_size) for _ in range(cfg.prompt_tokens)))
        for i, t in enumerate(times)]


def batch_stats(samples: Sequence[int]) -> dict[str, float]:
    """Peak and mean of the decode worker's running requests over a run's samples, and
    the mean over the samples where it ran any (the batch while decoding)."""
    busy = [s for s in samples if s > 0]
    return {"peak": float(max(samples, default=0)),
            "mean": statistics.fmean(samples) if samples else 0.0,
            "mean_busy": statistics.fmean(busy) if busy else 0.0,
            "samples": float(len(samples))}


def decode_info(info: pb.ServerInfo) -> pb.WorkerInfo:
    return next(w for w in info.workers if w.role == pb.WORKER_ROLE_DECODE)


async def server_info(target: str) -> pb.ServerInfo:
    async with grpc.aio.insecure_channel(target) as ch:
        return await pb_grpc.GenerationStub(ch).GetServerInfo(pb.GetServerInfoRequest(),
                                                              timeout=30)


async def sample_batch(target: str, out: list[int]) -> None:
    """Append the decode worker's running requests every SAMPLE_S until cancelled."""
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.GenerationStub(ch)
        while True:
            try:
                info = await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
                out.append(decode_info(info).num_requests_running)
            except grpc.aio.AioRpcError:  # a slow answer on a busy machine: skip it
                pass
            await asyncio.sleep(SAMPLE_S)


async def one_run(target: str, specs: list[RequestSpec], label: str) -> dict[str, object]:
    before = decode_info(await server_info(target))
    samples: list[int] = []
    sampler = asyncio.get_running_loop().create_task(sample_batch(target, samples))
    try:
        records, wall = await run_load(LoadConfig(target, drain_s=DRAIN_S, label=label),
                                       specs, run_id=label)
    finally:
        sampler.cancel()
    after = decode_info(await server_info(target))
    s = summarize(records, wall, SLOS)
    relaxed = summarize(records, wall, {KIND: RELAXED})
    return {"batch": batch_stats(samples),
            "preemptions": after.num_preemptions - before.num_preemptions,
            "goodput_rps": s["goodput_rps"], "slo_attainment": s["slo_attainment"],
            "goodput_relaxed_rps": relaxed["goodput_rps"],
            "slo_attainment_relaxed": relaxed["slo_attainment"],
            "throughput": s["throughput"], "codes": s["codes"],
            "ttft_s": s["ttft_s"], "tpot_s": s["tpot_s"],
            "load_avg_1m": os.getloadavg()[0]}


def pool_json(w: pb.WorkerInfo, cfg: BudgetConfig) -> dict[str, object]:
    per_seq = -(-(cfg.prompt_tokens + cfg.output_tokens) // max(w.kv_block_tokens, 1))
    return {"kv_dtype": w.kv_dtype, "blocks": w.num_kv_blocks,
            "block_bytes": w.kv_block_bytes, "block_tokens": w.kv_block_tokens,
            "blocks_per_sequence": per_seq, "sequences_fit": w.num_kv_blocks // per_seq}


# medians() keys -> where each run's value sits in one_run()'s dict
MEDIANS = {
    "batch_peak": ("batch", "peak"), "batch_mean": ("batch", "mean"),
    "batch_mean_busy": ("batch", "mean_busy"), "preemptions": ("preemptions",),
    "goodput_rps": ("goodput_rps",), "slo_attainment": ("slo_attainment",),
    "goodput_relaxed_rps": ("goodput_relaxed_rps",),
    "slo_attainment_relaxed": ("slo_attainment_relaxed",),
    "requests_per_s": ("throughput", "requests_per_s"),
    "output_tokens_per_s": ("throughput", "output_tokens_per_s"),
    "ttft_p50_s": ("ttft_s", "p50"), "ttft_p99_s": ("ttft_s", "p99"),
    "tpot_p50_s": ("tpot_s", "p50"), "tpot_p99_s": ("tpot_s", "p99"),
}


def medians(runs: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Each figure's median over the runs (None if no run has it: say, no TPOT)."""
    out: dict[str, float | None] = {}
    for key, path in MEDIANS.items():
        xs = []
        for r in runs:
            v: Any = r
            for part in path:
                v = v[part]
            if v is not None:
                xs.append(float(v))
        out[key] = statistics.median(xs) if xs else None
    return out


def ratios(a: dict[str, float | None], b: dict[str, float | None]) -> dict[str, float | None]:
    """a / b per key (None where b is 0 or either is missing)."""
    out: dict[str, float | None] = {}
    for k, bk in b.items():
        ak = a.get(k)
        out[k] = ak / bk if ak is not None and bk else None
    return out


async def measure(cfg: BudgetConfig, targets: dict[str, str]) -> dict[str, object]:
    vocab = 0
    for target in targets.values():
        vocab = (await wait_ready(target, timeout_s=600)).vocab_size
        # Off the record: first calls allocate and compile (the int8 kernels included).
        await run_load(LoadConfig(target, label="warm-up"),
                       workload(BudgetConfig(requests=4, rate=4.0, output_tokens=8), vocab,
                                seed=10_000), run_id="warm")
    pools = {d: pool_json(decode_info(await server_info(t)), cfg) for d, t in targets.items()}
    runs: dict[str, list[dict[str, object]]] = {d: [] for d in targets}
    for i in range(cfg.runs):
        specs = workload(cfg, vocab, cfg.seed + i)
        order = list(targets) if i % 2 == 0 else list(reversed(targets))
        for d in order:
            r = await one_run(targets[d], specs, f"{d}-run{i}")
            sys.stderr.write(f"[kv-budget] run {i} {d}: {json.dumps(r['batch'])}, "
                             f"preemptions {r['preemptions']}, goodput "
                             f"{r['goodput_rps']:.3f}/s\n")
            runs[d].append(r)
    med = {d: medians(rs) for d, rs in runs.items()}
    return {"pools": pools, "medians": med, "int8_over_fp32": ratios(med["int8"], med["fp32"]),
            "runs": runs}


def run(cfg: BudgetConfig, command: str) -> dict[str, object]:
    """Both deployments, the runs, the JSON at ``cfg.out`` (``command``: how it was run,
    recorded with the figures)."""
    from bench.cli import code_version
    from bench.offline import machine

    t0 = time.monotonic()
    deps = {("fp32" if d == "auto" else d): BudgetDeployment(
        f"kv-budget-{d}", model=cfg.model, kv_cache_memory_gib=cfg.kv_cache_memory_gib,
        kv_cache_dtype=d) for d in DTYPES}
    servers = {name: ServerProcess(dep, cfg.log_dir) for name, dep in deps.items()}
    try:
        targets = {name: s.__enter__() for name, s in servers.items()}
        result = asyncio.run(measure(cfg, targets))
    finally:
        for s in servers.values():
            s.stop()
    out = {"command": command,
           "machine": {**machine(), "load_avg_at_end": os.getloadavg()},
           "code": code_version(),
           "config": {"kv_cache_memory_gib": cfg.kv_cache_memory_gib, "runs": cfg.runs,
                      "requests": cfg.requests, "rate": cfg.rate,
                      "prompt_tokens": cfg.prompt_tokens, "output_tokens": cfg.output_tokens,
                      "seed": cfg.seed,
                      "server_args": {name: dep.args() for name, dep in deps.items()},
                      "sample_s": SAMPLE_S,
                      "slo": slos_json({KIND: SLOS[KIND], "relaxed": RELAXED})},
           **result, "wall_s": time.monotonic() - t0}
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(out, indent=1) + "\n")
    return out


def table(result: dict[str, object]) -> str:
    """The markdown table docs/benchmarks.md section 9 shows."""
    pools, med, ratio = result["pools"], result["medians"], result["int8_over_fp32"]
    lines = ["| | fp32 | int8 | int8 / fp32 |", "|---|---|---|---|"]

    def row(label: str, fp32: str, int8: str, r: str) -> None:
        lines.append(f"| {label} | {fp32} | {int8} | {r} |")

    fit = {d: f"{pools[d]['blocks']} ({pools[d]['sequences_fit']})" for d in pools}
    row("decode pool: blocks (sequences of the workload)", fit["fp32"], fit["int8"],
        fmt_value(pools["int8"]["blocks"] / pools["fp32"]["blocks"], "{:.2f}"))
    for label, key, f in ROWS:
        row(label, fmt_value(med["fp32"][key], f), fmt_value(med["int8"][key], f),
            fmt_value(ratio[key], "{:.2f}"))
    for label, key, f in (("TTFT p50 / p99, s", "ttft", "{:.2f}"),
                          ("TPOT p50 / p99, s", "tpot", "{:.3f}")):
        p50, p99 = f"{key}_p50_s", f"{key}_p99_s"
        cells = [f"{fmt_value(m[p50], g)} / {fmt_value(m[p99], g)}"
                 for m, g in ((med["fp32"], f), (med["int8"], f), (ratio, "{:.2f}"))]
        row(label, *cells)
    return "\n".join(lines)


ROWS = (  # (label, key of medians(), format)
    ("decode batch: peak", "batch_peak", "{:.0f}"),
    ("decode batch: mean over the run", "batch_mean", "{:.1f}"),
    ("decode batch: mean while decoding", "batch_mean_busy", "{:.1f}"),
    ("preemptions (each a migration)", "preemptions", "{:.0f}"),
    ("goodput: req/s meeting TTFT <= 2 s and TPOT <= 0.2 s", "goodput_rps", "{:.3f}"),
    ("SLO attainment", "slo_attainment", "{:.2f}"),
    ("goodput: req/s meeting TTFT <= 10 s and TPOT <= 0.5 s", "goodput_relaxed_rps",
     "{:.3f}"),
    ("SLO attainment (relaxed)", "slo_attainment_relaxed", "{:.2f}"),
    ("throughput: req/s", "requests_per_s", "{:.3f}"),
    ("throughput: output tokens/s", "output_tokens_per_s", "{:.1f}"),
)


def fmt_value(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else fmt.format(x)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.kv_budget_serving",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p)
    return p


def add_flags(p: argparse.ArgumentParser) -> None:
    d = BudgetConfig()
    p.add_argument("--runs", type=int, default=d.runs)
    p.add_argument("--kv-cache-memory", type=float, default=d.kv_cache_memory_gib,
                   metavar="GiB", help="every worker's KV budget (both dtypes)")
    p.add_argument("--requests", type=int, default=d.requests)
    p.add_argument("--rate", type=float, default=d.rate, help="requests/s (Poisson)")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens)
    p.add_argument("--output-tokens", type=int, default=d.output_tokens)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--model", default=None)
    p.add_argument("--out", default=str(d.out))


def config_from(args: argparse.Namespace) -> BudgetConfig:
    return BudgetConfig(runs=args.runs, kv_cache_memory_gib=args.kv_cache_memory,
                        requests=args.requests, rate=args.rate,
                        prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                        seed=args.seed, model=args.model, out=Path(args.out))


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    result = run(config_from(parser().parse_args(args)),
                 " ".join(["python -m bench.kv_budget_serving", *args]))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
