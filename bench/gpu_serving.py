"""Step f: the server end to end on one GPU, disaggregated against colocated.

``pdserve serve --model dummy:llama-3-8b --gpus-per-worker 0.5`` twice, one after the
other on the same GPU: 1 prefill + 1 decode worker (KV through cuda-ipc, picked by
``auto``), then 2 colocated workers. Each gets a warm-up (a 2k-token prompt and short
ones, so kernels are compiled before anything is timed), then an open-loop workload at
each rate of RATES for DURATION_S: 64-token streams of 96 output tokens (Poisson) plus two
bursts of two 1-2k-token prompts (8 output tokens), token-id prompts (the dummy model has
no tokenizer). Per deployment and rate: TTFT, TPOT and ITL percentiles, throughput and
SLO attainment against the GPU SLOs below, and goodput over the rates (bench/report.py's
definitions, the CPU suite's).
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

from bench.gpu_common import StepContext
from bench.gpu_plan import NUM, OPT_NUM, OPT_STR

MODEL = "dummy:llama-3-8b"
RATES = (4.0, 12.0)
DURATION_S = 8.0
DRAIN_S = 6.0  # a request still running then is cut (DRAIN_TIMEOUT: an SLO miss)
# A GPU serves an 8B model in tens of ms per token: the CPU suite's 2 s / 200 ms would
# pass anything. TTFT allows 0.5 ms per prompt token of prefill for the bursts.
GPU_SLOS = {"stream": (1.0, 0.1, 0.0), "burst": (1.0, 0.1, 0.0005)}

_RUN = {"rate": NUM, "requests": NUM, "ok": NUM, "ttft_p50_s": OPT_NUM, "ttft_p99_s": OPT_NUM,
        "tpot_p50_s": OPT_NUM, "tpot_p99_s": OPT_NUM, "itl_p99_s": OPT_NUM,
        "output_tokens_per_s": NUM, "slo_attainment": OPT_NUM}
_DEP = {"name": str, "kv_transfer": OPT_STR, "ready_s": OPT_NUM, "error": OPT_STR,
        "runs": [_RUN], "goodput_rps": OPT_NUM}
SCHEMA: dict[str, Any] = {"model": str, "slos": {"*": [NUM]}, "deployments": [_DEP],
                          "goodput_ratio_disagg_over_colocated": OPT_NUM}
FAKE: dict[str, Any] = {
    "model": MODEL, "slos": {"stream": [1.0, 0.1, 0.0]},
    "deployments": [{"name": "disaggregated", "kv_transfer": "cuda-ipc", "ready_s": 31.0,
                     "error": None, "goodput_rps": 9.5, "runs": [
                         {"rate": 4.0, "requests": 36, "ok": 36, "ttft_p50_s": 0.05,
                          "ttft_p99_s": 0.4, "tpot_p50_s": 0.03, "tpot_p99_s": 0.05,
                          "itl_p99_s": 0.09, "output_tokens_per_s": 330.0,
                          "slo_attainment": 1.0}]}],
    "goodput_ratio_disagg_over_colocated": 1.4,
}


def headline(r: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"goodput_ratio": r["goodput_ratio_disagg_over_colocated"]}
    for d in r["deployments"]:
        out[f"{d['name']}_goodput_rps"] = d["goodput_rps"]
        if d["runs"]:
            out[f"{d['name']}_tpot_p50_s"] = d["runs"][0]["tpot_p50_s"]
    return out


def workload(rate: float, duration_s: float, vocab: int, seed: int, burst_tokens: tuple[int, int]
             ) -> list[Any]:
    """Streams at ``rate`` plus two bursts (at 1/3 and 2/3 of the run) of two long
    prompts each; every prompt unique (no prefix-cache hits between runs)."""
    from bench.workloads import FIRST_PLAIN_ID, RequestSpec, interference

    specs = interference(rate, duration_s, 10_000, vocab, seed, bursts=False, salt=seed)
    rng = random.Random(f"gpu-bursts/{seed}")
    for t in (duration_s / 3, 2 * duration_s / 3):
        for _ in range(2):
            n = rng.randint(*burst_tokens)
            ids = tuple(rng.randrange(FIRST_PLAIN_ID, vocab) for _ in range(n))
            specs.append(RequestSpec(0, t, "burst", 8, prompt_ids=ids))
    specs.sort(key=lambda s: s.arrival_s)
    return [RequestSpec(i, s.arrival_s, s.kind, s.max_tokens, s.prompt_ids)
            for i, s in enumerate(specs)]


def _slos() -> dict[str, Any]:
    from bench.report import Slo

    return {k: Slo(ttft_s=a, tpot_s=b, ttft_per_token_s=c) for k, (a, b, c) in GPU_SLOS.items()}


def _run_row(rate: float, records: list[Any], wall_s: float) -> dict[str, Any]:
    from bench.report import summarize

    s = summarize(records, wall_s, _slos())
    return {"rate": rate, "requests": s["requests"], "ok": s["codes"].get("OK", 0),
            "ttft_p50_s": s["ttft_s"]["p50"], "ttft_p99_s": s["ttft_s"]["p99"],
            "tpot_p50_s": s["tpot_s"]["p50"], "tpot_p99_s": s["tpot_s"]["p99"],
            "itl_p99_s": s["itl_s"]["p99"],
            "output_tokens_per_s": s["throughput"]["output_tokens_per_s"],
            "slo_attainment": s["slo_attainment"]}


def _goodput(runs: list[dict[str, Any]]) -> float | None:
    from bench.report import goodput

    pts = [(r["rate"], r["slo_attainment"]) for r in runs if r["slo_attainment"] is not None]
    return goodput(pts, 0.9) if pts else None


def deployments() -> list[Any]:
    from bench.serving import Deployment

    return [Deployment("disaggregated", mode="disaggregated", model=MODEL, gpus_per_worker=0.5),
            Deployment("colocated", mode="colocated", workers=2, model=MODEL,
                       gpus_per_worker=0.5)]


async def _kv_transfer(target: str) -> str | None:
    import grpc

    from proto.pdserve.v1 import generation_pb2 as pb
    from proto.pdserve.v1 import generation_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as ch:
        info = await pb_grpc.GenerationStub(ch).GetServerInfo(pb.GetServerInfoRequest(),
                                                              timeout=10)
    return info.kv_transfer or None


async def _deployment(ctx: StepContext, dep: Any, target: str, t_start: float
                      ) -> dict[str, Any]:
    from bench.loadgen import LoadConfig, run_load, wait_ready

    info = await wait_ready(target, timeout_s=max(ctx.left_s() - 30, 10))
    row: dict[str, Any] = {"name": dep.name, "kv_transfer": await _kv_transfer(target),
                           "ready_s": time.monotonic() - t_start, "error": None, "runs": [],
                           "goodput_rps": None}
    warm = workload(2.0, 2.0, info.vocab_size, 99, (2048, 2048))
    await run_load(LoadConfig(target, drain_s=30, label="warm-up"), warm, run_id="warm")
    for i, rate in enumerate(RATES):
        if not ctx.has_time(DURATION_S + DRAIN_S + 5):
            break
        specs = workload(rate, DURATION_S, info.vocab_size, i, (1024, 2048))
        cfg = LoadConfig(target, drain_s=DRAIN_S, timeout_s=60, label=f"{dep.name} {rate:g}/s")
        records, wall = await run_load(cfg, specs, run_id=f"{dep.name}-{rate:g}")
        row["runs"].append(_run_row(rate, records, wall))
        row["goodput_rps"] = _goodput(row["runs"])
    return row


def _toy(ctx: StepContext) -> list[dict[str, Any]]:
    """No server on CPU: the deployments' flags, the workload and the summaries on
    synthetic records, so every line above but the server calls runs."""
    from bench.loadgen import RequestRecord
    from router.config import RouterConfig

    rows = []
    for dep in deployments():
        args = dep.args()
        ok = "--gpus-per-worker" in args and MODEL in args
        kv = RouterConfig(mode=dep.mode, gpus_per_worker=0.5).resolved_kv_transfer() \
            if dep.mode == "disaggregated" else None
        runs = []
        for i, rate in enumerate(RATES):
            specs = workload(rate, 2.0, 1000, i, (16, 32))
            recs = [RequestRecord(s.index, s.kind, s.arrival_s, sent_s=s.arrival_s,
                                  first_token_s=s.arrival_s + 0.05, done_s=s.arrival_s + 0.5,
                                  token_times_s=[s.arrival_s + 0.05 + 0.02 * k
                                                 for k in range(s.max_tokens)],
                                  prompt_tokens=len(s.prompt_ids or ()),
                                  completion_tokens=s.max_tokens) for s in specs]
            runs.append(_run_row(rate, recs, 2.5))
        rows.append({"name": dep.name, "kv_transfer": kv, "ready_s": None,
                     "error": None if ok else f"bad args {args}", "runs": runs,
                     "goodput_rps": _goodput(runs)})
    ctx.check("disaggregated_picks_cuda_ipc", rows[0]["kv_transfer"] == "cuda-ipc")
    return rows


class _Server:
    """``pdserve serve`` for one deployment, as bench.serving.ServerProcess starts it but
    with this process's PYTHONPATH kept (the carried wheels may live on it), stopped
    with its whole session (Ray included) when the step ends or is stopped."""

    def __init__(self, dep: Any, log_dir: Path, pids: Path) -> None:
        import os
        import subprocess
        import sys

        from bench.gpu_common import ROOT
        from bench.serving import free_port

        log_dir.mkdir(parents=True, exist_ok=True)
        self.target = f"127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "router.cli", "serve", "--http-port", "0", *dep.args(),
               "--port", self.target.rsplit(":", 1)[1], "--metrics-port", str(free_port())]
        paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = dict(os.environ, OMP_NUM_THREADS="1", RAY_DEDUP_LOGS="0",
                   PYTHONPATH=os.pathsep.join(paths))
        with open(log_dir / f"server-{dep.name}.log", "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        # Its own session: if this step is killed outright, the suite ends it from here.
        self.pids = pids
        with open(pids, "a") as f:
            f.write(f"{self.proc.pid}\n")

    def stop(self, timeout_s: float = 10.0) -> None:
        import contextlib
        import os
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # the server's clean shutdown
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever it left: Ray, workers
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        with contextlib.suppress(OSError):  # stopped: nothing left for the suite to end
            left = [p for p in self.pids.read_text().split() if p != str(self.proc.pid)]
            self.pids.write_text("".join(f"{p}\n" for p in left))


def run(ctx: StepContext) -> None:

    ctx.record("model", MODEL)
    ctx.record("slos", {k: list(v) for k, v in GPU_SLOS.items()})
    ctx.record("goodput_ratio_disagg_over_colocated", None)
    rows: list[dict[str, Any]] = _toy(ctx) if ctx.toy else []
    log_dir = Path(ctx.out.parent) / "f-logs"
    for dep in ([] if ctx.toy else deployments()):
        if not ctx.has_time(50):
            break
        t0 = time.monotonic()
        server = _Server(dep, log_dir, ctx.out.with_suffix(".pids"))
        try:
            row = asyncio.run(_deployment(ctx, dep, server.target, t0))
        except Exception as e:  # keep what the other deployment measures
            row = {"name": dep.name, "kv_transfer": None, "ready_s": None,
                   "error": f"{type(e).__name__}: {e}"[:500], "runs": [],
                   "goodput_rps": None}
        finally:  # also on the suite's SIGTERM at the budget: no server outlives the step
            server.stop(timeout_s=10)
        rows.append(row)
        ctx.record("deployments", rows)
    ctx.record("deployments", rows)
    g = {r["name"]: r["goodput_rps"] for r in rows}
    if g.get("disaggregated") and g.get("colocated"):
        ctx.record("goodput_ratio_disagg_over_colocated", g["disaggregated"] / g["colocated"])
    ctx.check("both_deployments_served", len(rows) == 2 and all(
        r["error"] is None and r["runs"] for r in rows))
