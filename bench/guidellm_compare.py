"""Our load generator (gRPC) and an independent one, GuideLLM (the vLLM project's, over
the OpenAI HTTP API), on the same workload against the same pdserve deployment.

    python -m bench.guidellm_compare [--rate 0.5] [--requests 40] [--guidellm PATH]
                                     [--out-dir bench/results]

Workload, every run: constant arrivals at --rate (open loop), --requests requests,
--prompt-tokens-token prompts, exactly --output-tokens output tokens (ignore_eos).
Constant, not Poisson: GuideLLM 0.8.1's Poisson profile sends a burst at the start
(docs/benchmarks.md). Our prompts are random token ids, GuideLLM's synthetic text of
the same length under the model's tokenizer, exported here from the GGUF into a
Hugging Face directory (GuideLLM needs one, and must not reach the Hub).

Four runs on one server, one after another: ours, GuideLLM as it comes (10 worker
processes), GuideLLM on one process, ours again (machine drift shows as a difference
between the two runs of ours). For each: both tools' per-request records summarized
with one set of definitions (bench/report.py's); the server's own histograms scraped
before and after (a third reading of the window: mean TTFT and inter-token gap as
pdserve measured them, which tells a tool that measures wrong from a server that was
slower); and the CPU the load generator itself burned, in cores (start-up included),
since on a small machine it competes with the server it measures. GuideLLM's own
aggregates are kept too, to check its definitions against ours.

Writes bench/results/guidellm-compare.json; the server log, GuideLLM's raw records and
the tokenizer go to bench/results/guidellm/logs/ (not kept in git).

GuideLLM is not a project dependency (it pins click, datasets and more, and pulls
torch): `make bench-guidellm` installs it in .venv/guidellm and runs this.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.loadgen import LoadConfig, RequestRecord, run_load, wait_ready
from bench.report import dist
from bench.serving import Deployment, ServerProcess, free_port
from bench.workloads import FIRST_PLAIN_ID, RequestSpec

MODEL = "smollm2-135m"


@dataclass(frozen=True)
class HttpDeployment(Deployment):
    """A deployment that also serves the OpenAI-compatible API on ``http_port``."""

    http_port: int = 0

    def args(self) -> list[str]:
        return [*super().args(), "--http-port", str(self.http_port)]


@dataclass(frozen=True)
class Obs:
    """One completed request, in seconds, as either tool saw it."""

    ttft_s: float
    tpot_s: float  # mean gap between output tokens after the first
    e2e_s: float
    output_tokens: int
    start_s: float  # on the tool's own clock
    end_s: float


def export_tokenizer(model: str, out: Path) -> Path:
    """The served model's tokenizer as a Hugging Face directory (tokenizer.json and a
    tokenizer_config.json), read from the same GGUF the server loads."""
    from engine.tokenizer import load_tokenizer
    from engine.weights import resolve_model

    tok = load_tokenizer(resolve_model(model))
    assert tok is not None, f"{model} has no tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    tok._backend.save(str(out / "tokenizer.json"))

    def name(i: int | None) -> str | None:
        return tok.convert_ids_to_tokens([i])[0] if i is not None else None

    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(tok.bos_token_id),
        "eos_token": name(tok.eos_token_id), "chat_template": tok.chat_template}))
    return out


def constant_specs(rate: float, n: int, prompt_tokens: int, output_tokens: int,
                   vocab_size: int, seed: int) -> list[RequestSpec]:
    rng = random.Random(seed)
    return [RequestSpec(i, i / rate, "stream", output_tokens,
                        prompt_ids=tuple(rng.randrange(FIRST_PLAIN_ID, vocab_size)
                                         for _ in range(prompt_tokens)))
            for i in range(n)]


async def run_ours(target: str, specs: list[RequestSpec]) -> list[RequestRecord]:
    records, _ = await run_load(LoadConfig(target, label="ours (gRPC)"), specs, "ours")
    return records


def ours_obs(records: list[RequestRecord]) -> list[Obs]:
    return [Obs(r.ttft_s, r.tpot_s or 0.0, r.e2e_s, r.completion_tokens, r.sent_s, r.done_s)
            for r in records if r.ok and r.ttft_s is not None and r.e2e_s is not None
            and r.done_s is not None]


def run_guidellm(exe: str, url: str, tokenizer: Path, args: argparse.Namespace,
                 out_json: Path, processes: int | None) -> dict[str, Any]:
    """One GuideLLM run; ``processes`` caps its worker processes (None: its default,
    10), each a Python process of its own on the same cores as the server."""
    cmd = [exe, "run",
           "--backend", f"kind=openai_http,target={url},model={MODEL},"
                        "request_format=/v1/completions",
           "--profile", f"kind=constant,rate={args.rate}",
           "--constraint", f"kind=max_requests,count={args.requests}",
           "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
           "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},"
                     f"output_tokens={args.output_tokens}",
           "--output", f"kind=json,path={out_json}", "--disable-console-interactive"]
    sys.stderr.write(f"[bench] {' '.join(cmd)}\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if processes is not None:
        env["GUIDELLM__MAX_WORKER_PROCESSES"] = str(processes)
    subprocess.run(cmd, check=True, env=env, stdout=sys.stderr)
    return json.loads(out_json.read_text())["benchmarks"][0]


def guidellm_obs(bench: dict[str, Any]) -> list[Obs]:
    out = []
    for r in bench["requests"]["successful"]:
        # GuideLLM's per-request inter_token_latency_ms is (last - first token) / (n - 1),
        # the same definition as our TPOT.
        out.append(Obs(r["time_to_first_token_ms"] / 1e3, r["inter_token_latency_ms"] / 1e3,
                       r["request_latency"], r["output_tokens"], r["request_start_time"],
                       r["request_end_time"]))
    return out


def summary(obs: list[Obs]) -> dict[str, Any]:
    """One set of definitions for both tools' records."""
    span = max(o.end_s for o in obs) - min(o.start_s for o in obs)
    tokens = sum(o.output_tokens for o in obs)
    return {"requests": len(obs), "ttft_s": dist([o.ttft_s for o in obs]),
            "tpot_s": dist([o.tpot_s for o in obs]), "e2e_s": dist([o.e2e_s for o in obs]),
            "output_tokens": tokens, "span_s": span,
            "output_tokens_per_s": tokens / span if span else 0.0,
            "requests_per_s": len(obs) / span if span else 0.0}


def guidellm_own(bench: dict[str, Any]) -> dict[str, Any]:
    """GuideLLM's own aggregates (its ITL and TPOT are token-weighted means)."""
    m = bench["metrics"]

    def pick(name: str) -> dict[str, Any]:
        s = m[name]["successful"]
        return {"mean": s["mean"], "median": s["median"], "p99": s["percentiles"]["p99"]}

    return {"ttft_ms": pick("time_to_first_token_ms"), "itl_ms": pick("inter_token_latency_ms"),
            "tpot_ms": pick("time_per_output_token_ms"),
            "output_tokens_per_s_mean": m["output_tokens_per_second"]["total"]["mean"],
            "requests_per_s_mean": m["requests_per_second"]["total"]["mean"],
            "duration_s": bench["duration"]}


ROWS = (("TTFT p50 (ms)", "ttft_s", "p50", 1e3), ("TTFT p90 (ms)", "ttft_s", "p90", 1e3),
        ("TTFT mean (ms)", "ttft_s", "mean", 1e3), ("TPOT p50 (ms)", "tpot_s", "p50", 1e3),
        ("TPOT mean (ms)", "tpot_s", "mean", 1e3), ("E2E p50 (s)", "e2e_s", "p50", 1.0),
        ("output tok/s", "output_tokens_per_s", None, 1.0),
        ("requests/s", "requests_per_s", None, 1.0))


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: one column per run, the client's view, then the server's view of the
    same window and how much CPU the load generator itself took."""
    head = "| metric | " + " | ".join(r["label"] for r in runs) + " |"
    lines = [head, "| --- |" + " ---: |" * len(runs)]
    for label, key, stat, scale in ROWS:
        vals = [r["client"][key] if stat is None else r["client"][key][stat] for r in runs]
        lines.append(f"| {label} | " + " | ".join(f"{v * scale:.1f}" for v in vals) + " |")
    lines.append("| server: TTFT mean (ms) | " + " | ".join(
        f"{r['server']['ttft_mean_s'] * 1e3:.1f}" for r in runs) + " |")
    lines.append("| server: inter-token mean (ms) | " + " | ".join(
        f"{r['server']['itl_mean_s'] * 1e3:.1f}" for r in runs) + " |")
    lines.append("| load generator CPU (cores) | " + " | ".join(
        f"{r['loadgen_cores']:.2f}" for r in runs) + " |")
    lines.append("| workers lost during the run | " + " | ".join(
        str(r["workers_lost"]) for r in runs) + " |")
    return "\n".join(lines)


SERVER_SERIES = ("pdserve_time_to_first_token_seconds_sum",
                 "pdserve_time_to_first_token_seconds_count",
                 "pdserve_inter_token_latency_seconds_sum",
                 "pdserve_inter_token_latency_seconds_count")


def metrics_url(log: Path, timeout_s: float = 30.0) -> str:
    """The server's Prometheus endpoint, from the usage lines it prints once up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = re.search(r"metrics: (http://\S+/metrics)", log.read_text(errors="replace"))
        if m:
            return m.group(1)
        time.sleep(0.5)
    raise RuntimeError(f"no metrics address in {log}")


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = dict.fromkeys(SERVER_SERIES, 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in out:
            out[name] = float(value)
    return out


def server_window(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What the server itself measured between two scrapes: TTFT from a request's
    arrival at the router, inter-token gaps as tokens leave either edge (means)."""
    d = {k: after[k] - before[k] for k in SERVER_SERIES}
    ttft_n = d["pdserve_time_to_first_token_seconds_count"]
    itl_n = d["pdserve_inter_token_latency_seconds_count"]
    return {"requests": ttft_n,
            "ttft_mean_s": d["pdserve_time_to_first_token_seconds_sum"] / ttft_n
            if ttft_n else 0.0,
            "itl_mean_s": d["pdserve_inter_token_latency_seconds_sum"] / itl_n
            if itl_n else 0.0}


def loadgen_cpu_s() -> float:
    """CPU seconds of this process and of its finished children (GuideLLM's whole
    process tree once it has exited); the server, still running, is not counted."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def wait_healthy(http: str, timeout_s: float = 300.0) -> None:
    """Until /health says every role has a live worker (a worker killed in the previous
    run, e.g. by Ray's memory monitor on a crowded machine, is being replaced)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(http + "/health", timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def worker_losses(log: Path) -> int:
    return log.read_text(errors="replace").count("lost (its actor died)")


def measure(label: str, url: str, log: Path, run: Callable[[], list[Obs]]) -> dict[str, Any]:
    before, lost0 = scrape(url), worker_losses(log)
    cpu0, t0 = loadgen_cpu_s(), time.monotonic()
    obs = run()
    wall, cpu = time.monotonic() - t0, loadgen_cpu_s() - cpu0
    return {"label": label, "client": summary(obs),
            "server": server_window(before, scrape(url)), "loadgen_cores": cpu / wall,
            "workers_lost": worker_losses(log) - lost0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # 0.5/s x 96 tokens is below what 1P+1D decodes on 2 cores: latency, not a queue.
    p.add_argument("--rate", type=float, default=0.5, help="requests per second")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidellm", default="guidellm", help="the guidellm executable")
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    scratch = out / "guidellm" / "logs"  # server log, raw records, tokenizer: not kept
    tokenizer = export_tokenizer(MODEL, scratch / "tokenizer")
    http_port = free_port()
    dep = HttpDeployment("disaggregated-1p1d", http_port=http_port)
    server = ServerProcess(dep, scratch)
    raw: dict[str, Any] = {}
    with server as target:
        info = asyncio.run(wait_ready(target))
        url = metrics_url(server.log_path)
        http = f"http://127.0.0.1:{http_port}"

        def ours(salt: int) -> list[Obs]:
            wait_healthy(http)
            specs = constant_specs(args.rate, args.requests, args.prompt_tokens,
                                   args.output_tokens, info.vocab_size, args.seed + salt)
            return ours_obs(asyncio.run(run_ours(target, specs)))

        def guidellm(processes: int | None) -> list[Obs]:
            wait_healthy(http)
            name = f"guidellm-{processes or 'default'}"
            raw[name] = run_guidellm(args.guidellm, http, tokenizer, args,
                                     scratch / f"{name}.json", processes)
            return guidellm_obs(raw[name])

        # ours, the tool at its default, the tool on one process, ours again: the last
        # run tells machine drift apart from the tools' own effect on the server.
        log = server.log_path
        runs = [measure("ours (gRPC)", url, log, lambda: ours(0)),
                measure("GuideLLM (HTTP)", url, log, lambda: guidellm(None)),
                measure("GuideLLM, 1 process", url, log, lambda: guidellm(1)),
                measure("ours again", url, log, lambda: ours(1))]
    result = {"workload": {k: getattr(args, k) for k in
                           ("rate", "requests", "prompt_tokens", "output_tokens", "seed")},
              "deployment": asdict(dep), "machine": f"{os.cpu_count()} CPUs", "runs": runs,
              "guidellm_own": {k: guidellm_own(v) for k, v in raw.items()},
              "table": table(runs)}
    (out / "guidellm-compare.json").write_text(json.dumps(result, indent=2) + "\n")
    print(result["table"])
    print(json.dumps(result["guidellm_own"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
