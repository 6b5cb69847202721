"""`pdserve bench soak`: a long mixed workload at a sustainable rate, watching memory.

Starts a server (bench/serving.py), sends an open-loop Poisson mix -- short chats,
prompts of random length as token ids, some calls cancelled early -- and every
``--sample-s`` seconds records the RSS of the router process and of each worker
process, the workers' KV blocks by owner (GetServerInfo), and the latency percentiles
of the requests that ended in that window. The report gives each process's RSS slope
after the warm-up (MB per minute, least squares) and a plot.

A flat slope after warm-up is what "no leak" looks like from outside. RSS is also
split into anonymous and shared memory (Ray's object store pages a worker touched count
in its RSS, bounded by the store). A steady anonymous slope on one process is a leak or
allocator growth; ``--memory-diag`` has each worker say which from the inside
(runtime/memory_diag.py: malloc in-use vs held bytes per arena, Python's growth sites,
object counts), bench/memory_probe.py replays a prefill worker's pattern without Ray,
and ``--malloc-arena-max`` tries one allocator setting.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil

from bench.serving import Deployment, ServerProcess
from proto.pdserve.v1 import generation_pb2 as pb
from proto.pdserve.v1 import generation_pb2_grpc as pb_grpc
from runtime import memory_diag

ROLES = ("Prefill", "Decode", "Colocated")
MEMORY_ENV = ("MALLOC_", "ONEDNN_", "LRU_CACHE_CAPACITY", "PDSERVE_MEMORY_DIAG_COLLECT")


@dataclass(frozen=True)
class SoakConfig:
    duration_s: float = 1800.0
    rate: float = 2.0  # requests/s
    sample_s: float = 15.0
    warmup_s: float = 300.0
    cancel_fraction: float = 0.1
    seed: int = 0
    malloc_arena_max: int | None = None
    memory_diag: bool = False  # workers record runtime/memory_diag.py; kept per sample
    out_dir: Path = Path("bench/results")


@dataclass
class Window:
    latencies_s: list[float] = field(default_factory=list)
    ttfts_s: list[float] = field(default_factory=list)
    codes: dict[str, int] = field(default_factory=dict)


def processes(server_pid: int) -> dict[str, psutil.Process]:
    """The router (the server process) and every worker actor process under it."""
    out = {"router": psutil.Process(server_pid)}
    for p in out["router"].children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        for role in ROLES:
            if title.startswith("ray::") and role in title:
                out[f"{role.lower()}-{p.pid}"] = p
    return out


def rss_mb(procs: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for name, p in procs.items():
        try:
            out[name] = p.memory_info().rss / 2**20
        except psutil.Error:
            continue
    return out


def rss_parts_mb(procs: dict[str, psutil.Process]) -> dict[str, dict[str, float]]:
    """RSS split the kernel's way: anonymous memory (the heap, the KV pool, weights) vs
    shared memory (pages of Ray's object store the process has touched: bounded by the
    store, not the process's own) vs file-backed pages (libraries)."""
    out = {}
    for name, p in procs.items():
        try:
            with open(f"/proc/{p.pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if line.startswith("Rss"))
        except OSError:
            continue
        out[name] = {k.removeprefix("Rss").lower(): int(v.split()[0]) / 1024
                     for k, v in fields.items()}
    return out


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def slope_mb_per_min(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 3:
        return None
    ts = [t for t, _ in points]
    ys = [y for _, y in points]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - mt) ** 2 for t in ts)
    return 60.0 * sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var


async def one_call(stub: pb_grpc.GenerationStub, rnd: random.Random, vocab: int,
                   cancel: bool, window: list[Window]) -> None:
    if rnd.random() < 0.5:
        req = pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(
            role="user", content=f"Tell me fact number {rnd.randrange(10**6)} about cats.")]))
    else:
        n = rnd.choice([16, 64, 200, 600, 1500])
        req = pb.GenerateRequest(token_ids=pb.TokenIds(
            ids=[rnd.randrange(100, vocab) for _ in range(n)]))
    req.sampling.CopyFrom(pb.SamplingParams(temperature=rnd.choice([0.0, 0.7]),
                                            max_tokens=rnd.choice([8, 32, 96]),
                                            ignore_eos=True))
    t0 = time.perf_counter()
    ttft = None
    code = "OK"
    try:
        call = stub.Generate(req, timeout=300)
        async for r in call:
            if ttft is None and r.token_ids:
                ttft = time.perf_counter() - t0
                if cancel:
                    call.cancel()
                    code = "CANCELLED_BY_CLIENT"
                    break
    except grpc.aio.AioRpcError as e:
        code = e.code().name
    except asyncio.CancelledError:
        code = "CANCELLED_BY_CLIENT"
    w = window[0]
    w.codes[code] = w.codes.get(code, 0) + 1
    if code == "OK":
        w.latencies_s.append(time.perf_counter() - t0)
        if ttft is not None:
            w.ttfts_s.append(ttft)


def kv_owners(info: pb.ServerInfo) -> dict[str, dict[str, int]]:
    return {w.worker_id: {"free": w.kv_blocks.free, "cached": w.kv_blocks.cached,
                          "running": w.kv_blocks.running, "reserved": w.kv_blocks.reserved,
                          "transfer": w.kv_blocks.transfer} for w in info.workers}


async def soak(cfg: SoakConfig, target: str, server_pid: int) -> dict[str, Any]:
    rnd = random.Random(cfg.seed)
    window = [Window()]
    samples: list[dict[str, Any]] = []
    tasks: set[asyncio.Task[None]] = set()
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.GenerationStub(ch)
        vocab = (await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)).vocab_size
        t0 = time.perf_counter()
        next_sample = 0.0
        while (now := time.perf_counter() - t0) < cfg.duration_s:
            if now >= next_sample:
                info = await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
                w, window[0] = window[0], Window()
                samples.append({
                    "t_s": now, "rss_mb": rss_mb(procs := processes(server_pid)),
                    "rss_parts_mb": rss_parts_mb(procs),
                    "kv_blocks": kv_owners(info), "in_flight": info.num_requests_in_flight,
                    "e2e_p50_s": pct(w.latencies_s, 0.5), "e2e_p99_s": pct(w.latencies_s, 0.99),
                    "ttft_p50_s": pct(w.ttfts_s, 0.5), "ttft_p99_s": pct(w.ttfts_s, 0.99),
                    "codes": w.codes})
                if cfg.memory_diag:
                    samples[-1]["memory_diag"] = memory_diag.latest(diag_dir(cfg))
                sys.stderr.write(f"[soak] {now:6.0f}s rss={samples[-1]['rss_mb']} "
                                 f"codes={w.codes}\n")
                next_sample += cfg.sample_s
            t = asyncio.get_running_loop().create_task(
                one_call(stub, rnd, vocab, rnd.random() < cfg.cancel_fraction, window))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            await asyncio.sleep(rnd.expovariate(cfg.rate))
        await asyncio.wait(tasks, timeout=300) if tasks else None
    return report(cfg, samples)


def diag_dir(cfg: SoakConfig) -> Path:
    return cfg.out_dir / "logs" / "memory-diag"  # each sample keeps the latest records


DIAG_KEYS = ("rssanon_mb", "malloc_in_use_mb", "malloc_held_mb", "malloc_heap_free_mb",
             "malloc_mmapped_mb", "traced_mb", "python_objects")


def diag_slopes(cfg: SoakConfig, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per worker, the after-warm-up slope (per minute) of what the worker itself
    reports: if malloc's in-use bytes grow with RSS something is kept alive (traced_mb
    says whether by Python), if only its held bytes grow it is the allocator."""
    workers = sorted({w for s in samples for w in s.get("memory_diag", {})})
    out = {}
    for w in workers:
        recs = [s["memory_diag"][w] for s in samples
                if s["t_s"] >= cfg.warmup_s and w in s.get("memory_diag", {})
                and "error" not in s["memory_diag"][w]]
        out[w] = {k: slope_mb_per_min([(r["t_s"], r[k]) for r in recs]) for k in DIAG_KEYS}
    return out


def report(cfg: SoakConfig, samples: list[dict[str, Any]]) -> dict[str, Any]:
    names = sorted({n for s in samples for n in s["rss_mb"]})
    slopes = {n: slope_mb_per_min([(s["t_s"], s["rss_mb"][n]) for s in samples
                                   if s["t_s"] >= cfg.warmup_s and n in s["rss_mb"]])
              for n in names}
    anon = {n: slope_mb_per_min([(s["t_s"], s["rss_parts_mb"][n]["anon"]) for s in samples
                                 if s["t_s"] >= cfg.warmup_s
                                 and n in s.get("rss_parts_mb", {})])
            for n in names}
    return {"config": {k: str(v) for k, v in cfg.__dict__.items()},
            "rss_slope_mb_per_min_after_warmup": slopes,
            "anon_rss_slope_mb_per_min_after_warmup": anon,
            "memory_diag_slope_per_min_after_warmup": diag_slopes(cfg, samples),
            "samples": samples}


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    samples = result["samples"]
    for name in sorted({n for s in samples for n in s["rss_mb"]}):
        pts = [(s["t_s"] / 60, s["rss_mb"][name]) for s in samples if name in s["rss_mb"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("pdserve soak: RSS per process")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def run(cfg: SoakConfig, dep: Deployment) -> dict[str, Any]:
    from bench.loadgen import wait_ready
    from bench.offline import machine

    if cfg.malloc_arena_max is not None:
        os.environ["MALLOC_ARENA_MAX"] = str(cfg.malloc_arena_max)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.memory_diag:  # the server's workers inherit it (runtime/memory_diag.py)
        diag_dir(cfg).mkdir(parents=True, exist_ok=True)
        for old in diag_dir(cfg).glob("*.jsonl"):
            old.unlink()
        os.environ[memory_diag.ENV_DIR] = str(diag_dir(cfg).resolve())
        os.environ[memory_diag.ENV_INTERVAL] = str(cfg.sample_s)
    server = ServerProcess(dep, cfg.out_dir / "logs")
    with server as target:
        asyncio.run(wait_ready(target))
        assert server.proc is not None
        result = asyncio.run(soak(cfg, target, server.proc.pid))
    result["machine"] = machine()
    # The memory settings the workers inherit change what this measures: name them.
    env = [f"{k}={os.environ[k]}" for k in sorted(os.environ) if k.startswith(MEMORY_ENV)]
    result["command"] = " ".join([*env, "pdserve bench", *sys.argv[1:]])
    (cfg.out_dir / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, cfg.out_dir / "soak-rss.png")
    return result
