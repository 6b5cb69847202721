"""The serving benchmark suite: every workload against every deployment it compares,
one deployment at a time on the same machine, results as JSON.

    disaggregated (1 prefill + 1 decode)   vs   colocated (2 workers), 1 thread each:
        interference without bursts at the reference rate (the TPOT baseline),
        interference with bursts over the rate sweep (SLO attainment, goodput),
        chat and long-prompt at one rate each
    disaggregated with the prefix cache on vs off: shared-prefix
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import workloads
from bench.analysis import split_by_bursts
from bench.loadgen import LoadConfig, RequestRecord, run_load, wait_ready
from bench.report import Slo, goodput, records_json, slos_json, summarize
from bench.serving import Deployment, ServerProcess

# SLOs (stated in the docs). On this CPU a lone decode step of SmolLM2 takes ~60 ms
# and a lone 1k-token prefill ~3.7 s (bench/results/runtime-cpu.json): TPOT 200 ms is
# ~3x a lone step (room for batching), TTFT allows 2 s of queueing on top of ~5 ms per
# prompt token of prefill.
SLOS: dict[str, Slo] = {
    "stream": Slo(ttft_s=2.0, tpot_s=0.2),
    "chat": Slo(ttft_s=2.0, tpot_s=0.2),
    "burst": Slo(ttft_s=2.0, tpot_s=0.2, ttft_per_token_s=0.005),
    "long": Slo(ttft_s=2.0, tpot_s=0.2, ttft_per_token_s=0.005),
    "shared": Slo(ttft_s=2.0, tpot_s=0.2, ttft_per_token_s=0.005),
}
ATTAINMENT_TARGET = 0.9


@dataclass(frozen=True)
class SuiteConfig:
    """rates: the interference sweep (stream requests/s); ref_rate: where the no-burst
    baseline and the timelines are taken. duration_s: how long arrivals go on."""

    rates: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 2.5)
    ref_rate: float = 1.0
    duration_s: float = 50.0
    chat_rate: float = 1.0
    chat_duration_s: float = 20.0
    long_rate: float = 0.1
    long_requests: int = 3
    shared_rate: float = 0.2
    shared_requests: int = 10
    max_requests: int = 400
    seed: int = 0
    out_dir: str = "bench/results"
    # long-prompt is opt-in: 4k-token prefills take ~40 s each on one CPU thread, which
    # alone would blow the suite's 15-minute budget.
    skip: tuple[str, ...] = ("long-prompt",)
    modes: tuple[str, ...] = ("disaggregated", "colocated")
    # GPU runs: a model (e.g. dummy:llama-3-8b) and GPUs per worker (0.5: prefill and
    # decode share one GPU through cuda-ipc); the CPU step budgets are then dropped.
    model: str | None = None
    gpus_per_worker: float = 0.0


@dataclass
class Run:
    deployment: str
    workload: str
    rate: float
    summary: dict[str, object]
    stream_summary: dict[str, object] | None
    burst_times_s: list[float]
    burst_split: dict[str, object] | None
    records: list[RequestRecord] = field(repr=False)


# 128-token prefill steps: on one CPU thread a 512-token step takes 1.5-2.5 s, longer
# than the TTFT SLO, and a short prompt arriving mid-step waits for it (see
# docs/benchmarks-serving.md). Colocated keeps the engine's default budget.
PREFILL_STEP_TOKENS = 128

DEPLOYMENTS = {
    "disaggregated": Deployment("disaggregated", mode="disaggregated",
                                prefill_step_tokens=PREFILL_STEP_TOKENS),
    "colocated": Deployment("colocated", mode="colocated", workers=2),
    "disaggregated-noprefix": Deployment("disaggregated-noprefix", mode="disaggregated",
                                         prefill_step_tokens=PREFILL_STEP_TOKENS,
                                         prefix_cache=False),
    # Not in the default suite: the baseline with the same small step budget on both its
    # workers (`--modes colocated-step128`), to check the budget is not what decides.
    "colocated-step128": Deployment("colocated-step128", mode="colocated", workers=2,
                                    step_tokens=PREFILL_STEP_TOKENS),
}


_salts = iter(range(1, 1 << 30))  # a fresh prompt salt per run (see workloads.interference)


async def _run(target: str, dep: str, name: str, rate: float, duration_s: float,
               max_requests: int, vocab: int, seed: int) -> Run:
    specs = workloads.build(name, rate, duration_s, max_requests, vocab, seed,
                            salt=next(_salts))
    cfg = LoadConfig(target, label=f"{dep} {name} {rate:g}/s")
    records, wall = await run_load(cfg, specs, run_id=f"{dep}-{name}-{rate:g}")
    streams = (summarize(records, wall, SLOS, kinds=("stream",))
               if name.startswith("interference") else None)
    split = split_by_bursts(records) if name == "interference" else None
    return Run(dep, name, rate, summarize(records, wall, SLOS), streams,
               workloads.burst_times(specs), split, records)


async def _warm(target: str, vocab: int) -> None:
    """Touch every code path once (first calls allocate and compile) off the record."""
    specs = [*workloads.long_prompt(1.0, 2.0, 2, vocab, seed=99, max_tokens=1100),
             *workloads.chat(2.0, 2.0, 4, vocab, seed=99)]
    specs = [workloads.RequestSpec(i, 0.2 * i, s.kind, 8, s.prompt_ids, s.chat_text)
             for i, s in enumerate(specs)]
    await run_load(LoadConfig(target, label="warm-up"), specs, run_id="warm")


async def deployment_runs(dep: str, target: str, cfg: SuiteConfig) -> list[Run]:
    info = await wait_ready(target)
    vocab = info.vocab_size
    await _warm(target, vocab)
    runs: list[Run] = []
    if dep == "disaggregated-noprefix" or (dep == "disaggregated"
                                           and "shared-prefix" not in cfg.skip):
        runs.append(await _run(target, dep, "shared-prefix", cfg.shared_rate, 1e9,
                               cfg.shared_requests, vocab, cfg.seed))
    if dep == "disaggregated-noprefix":
        return runs
    if "interference" not in cfg.skip:
        runs.append(await _run(target, dep, "interference-nobursts", cfg.ref_rate,
                               cfg.duration_s, cfg.max_requests, vocab, cfg.seed))
        for rate in cfg.rates:
            runs.append(await _run(target, dep, "interference", rate, cfg.duration_s,
                                   cfg.max_requests, vocab, cfg.seed))
    if "chat" not in cfg.skip:
        runs.append(await _run(target, dep, "chat", cfg.chat_rate, cfg.chat_duration_s,
                               cfg.max_requests, vocab, cfg.seed))
    if "long-prompt" not in cfg.skip:
        runs.append(await _run(target, dep, "long-prompt", cfg.long_rate, 1e9,
                               cfg.long_requests, vocab, cfg.seed))
    return runs


def deployment(name: str, cfg: SuiteConfig) -> Deployment:
    dep = DEPLOYMENTS[name]
    if cfg.model:
        dep = dataclasses.replace(dep, model=cfg.model)
    if cfg.gpus_per_worker:
        dep = dataclasses.replace(dep, gpus_per_worker=cfg.gpus_per_worker,
                                  prefill_step_tokens=None, step_tokens=None)
    return dep


def run_suite(cfg: SuiteConfig) -> list[Run]:
    runs: list[Run] = []
    log_dir = Path(cfg.out_dir) / "logs"
    deps = list(cfg.modes)
    if "shared-prefix" not in cfg.skip and "disaggregated" in deps:
        deps.append("disaggregated-noprefix")
    for dep in deps:
        with ServerProcess(deployment(dep, cfg), log_dir) as target:
            try:
                runs += asyncio.run(deployment_runs(dep, target, cfg))
            except Exception as e:  # keep what the other deployments measured
                sys.stderr.write(f"[bench] {dep} failed: {e!r}\n")
    return runs


def headline(runs: list[Run]) -> dict[str, object]:
    """The numbers the targets are stated in."""
    out: dict[str, object] = {}
    by = {(r.deployment, r.workload, r.rate): r for r in runs}
    ran = {r.deployment for r in runs}
    for dep in (d for d in ("disaggregated", "colocated", "colocated-step128") if d in ran):
        pts = [(r.rate, r.summary["slo_attainment"]) for r in runs
               if r.deployment == dep and r.workload == "interference"]
        pts_s = [(r.rate, (r.stream_summary or {}).get("slo_attainment")) for r in runs
                 if r.deployment == dep and r.workload == "interference"]
        base = next((r for r in runs if r.deployment == dep
                     and r.workload == "interference-nobursts"), None)
        burst = by.get((dep, "interference", base.rate)) if base else None
        d: dict[str, object] = {
            "attainment_vs_rate": pts,
            "stream_attainment_vs_rate": pts_s,
            "goodput_rps": goodput([(a, b) for a, b in pts if b is not None],
                                   ATTAINMENT_TARGET),
            "stream_goodput_rps": goodput([(a, b) for a, b in pts_s if b is not None],
                                          ATTAINMENT_TARGET),
        }
        if base and burst:
            p99_base = _get(base.stream_summary, "tpot_s", "p99")
            p99_burst = _get(burst.stream_summary, "tpot_s", "p99")
            d.update(ref_rate=base.rate, burst_split=burst.burst_split,
                     stream_p99_tpot_nobursts_s=p99_base,
                     stream_p99_tpot_bursts_s=p99_burst,
                     p99_tpot_ratio=(p99_burst / p99_base) if p99_base and p99_burst else None)
        out[dep] = d
    g_d = _get(out, "disaggregated", "goodput_rps")
    g_c = _get(out, "colocated", "goodput_rps")
    out["goodput_ratio_disagg_over_colocated"] = (g_d / g_c) if g_d and g_c else None
    s_d = _get(out, "disaggregated", "stream_goodput_rps")
    s_c = _get(out, "colocated", "stream_goodput_rps")
    out["stream_goodput_ratio_disagg_over_colocated"] = (s_d / s_c) if s_d and s_c else None
    on = next((r for r in runs if r.deployment == "disaggregated"
               and r.workload == "shared-prefix"), None)
    off = next((r for r in runs if r.deployment == "disaggregated-noprefix"), None)
    if on and off:
        m_on, m_off = _get(on.summary, "ttft_s", "p50"), _get(off.summary, "ttft_s", "p50")
        out["shared_prefix"] = {"median_ttft_on_s": m_on, "median_ttft_off_s": m_off,
                                "speedup": (m_off / m_on) if m_on and m_off else None}
    return out


def _get(d: object, *keys: str) -> float | None:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d if isinstance(d, int | float) else None


def results_json(runs: list[Run], cfg: SuiteConfig) -> tuple[dict[str, object],
                                                             dict[str, object]]:
    """(summary, per-request records) documents."""
    summary = {
        "config": asdict(cfg),
        "slos": slos_json(SLOS),
        "attainment_target": ATTAINMENT_TARGET,
        "deployments": {k: asdict(v) for k, v in DEPLOYMENTS.items()},
        "headline": headline(runs),
        "runs": [{"deployment": r.deployment, "workload": r.workload, "rate": r.rate,
                  "burst_times_s": r.burst_times_s, "summary": r.summary,
                  "stream_summary": r.stream_summary, "burst_split": r.burst_split}
                 for r in runs],
    }
    records = {"runs": [{"deployment": r.deployment, "workload": r.workload, "rate": r.rate,
                         "burst_times_s": r.burst_times_s,
                         "records": records_json(r.records)} for r in runs]}
    return summary, records
