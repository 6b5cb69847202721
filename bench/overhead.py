"""What the service path costs: the same token-id workload offline and through `pdserve serve`.

The workload is the offline benchmark's W2 (bench/offline.py): chat prompts as token ids,
requested output lengths spread evenly over 16..160 tokens (interleaved long and short),
greedy, ignore_eos, all submitted at once. It runs, in one invocation:

    offline      LLM.generate in this process, ``--threads`` torch threads
    colocated    `pdserve serve --mode colocated --workers 1 --threads-per-worker T`
    1p1d         `pdserve serve` with 1 prefill + 1 decode worker, T/2 threads each

each ``--runs`` times (the median counts), and reports useful tokens/s and the ratio to
offline. During every served run the CPU time of each process of the server's session is
read from /proc (router, each worker, Ray's own processes) and divided by the tokens
generated: microseconds of CPU per token, per process. ``--streams`` adds runs at other
concurrencies (the same lengths, cycled) for that split; ``--profile`` samples the
router and the workers with py-spy during the 32-stream run and keeps the top frames.

    pdserve bench overhead [--runs 3] [--streams 8 32 128] [--profile]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.serving import Deployment, ServerProcess
from bench.workloads import TOPICS
from proto.pdserve.v1 import generation_pb2 as pb
from proto.pdserve.v1 import generation_pb2_grpc as pb_grpc

CLK_TCK = os.sysconf("SC_CLK_TCK")
# Ray names an actor's process after its class: how a worker is told from Ray's own.
ROLE_OF_PROCESS = {"ray::PrefillActor": "prefill", "ray::DecodeActor": "decode",
                   "ray::ColocatedActor": "colocated"}
# A worker's samples under these frames: the forward pass with its sampler, and the
# whole engine step (the difference is the step's host work: scheduling, isolation
# checkpoints, post-processing). py-spy names a frame "Class.method (file:line)".
FORWARD_FRAME = "ModelRunner.execute (engine/model_runner.py"
IDLE_S = 5.0  # seconds of idle CPU measured before the load
STEP_FRAME = "LLMEngine.step (engine/llm_engine.py"


@dataclass(frozen=True)
class Job:
    prompt: list[int]
    max_tokens: int


def lengths(n: int) -> list[int]:
    """W2's output lengths: evenly 16..160, long and short interleaved (bench/offline.py)."""
    ls = [round(16 + i * (160 - 16) / max(n - 1, 1)) for i in range(n)]
    order = [i // 2 if i % 2 == 0 else n - 1 - i // 2 for i in range(n)]
    return [ls[i] for i in order]


def workload(model: str, n: int) -> list[Job]:
    from engine.tokenizer import load_tokenizer
    from engine.weights import resolve_model

    tok = load_tokenizer(resolve_model(model))
    assert tok is not None, "the overhead benchmark needs a model with a tokenizer"
    chats = [[{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}]
             for i in range(n)]
    return [Job(tok.encode_chat(c, add_generation_prompt=True), m)
            for c, m in zip(chats, lengths(n), strict=True)]


# -- offline -------------------------------------------------------------------------------
def run_offline(model: str, jobs: list[Job], runs: int, threads: int) -> list[float]:
    """Seconds per run of LLM.generate over the jobs (the engine a worker runs)."""
    import torch

    from engine import LLM, SamplingParams

    torch.set_num_threads(threads)
    llm = LLM(model=model, max_num_seqs=64, max_num_batched_tokens=512)
    params = [SamplingParams(temperature=0.0, max_tokens=j.max_tokens, ignore_eos=True)
              for j in jobs]
    prompts = [j.prompt for j in jobs]
    llm.generate(prompts[:4], params[:4])  # warm-up (allocator, thread pool)
    out = []
    for _ in range(runs):
        llm.engine.kv.reset_prefix_cache()  # every run starts cold
        t0 = time.perf_counter()
        res = llm.generate(prompts, params)
        out.append(time.perf_counter() - t0)
        assert [len(o.token_ids) for o in res] == [j.max_tokens for j in jobs]
    del llm
    return out


# -- served --------------------------------------------------------------------------------
async def send_all(target: str, jobs: list[Job], tag: str) -> tuple[float, int]:
    """All jobs at once over one channel; (wall seconds, tokens received)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)

        async def one(i: int, job: Job) -> int:
            req = pb.GenerateRequest(
                request_id=f"{tag}-{i}", token_ids=pb.TokenIds(ids=job.prompt),
                sampling=pb.SamplingParams(temperature=0.0, max_tokens=job.max_tokens,
                                           ignore_eos=True))
            n = 0
            async for r in stub.Generate(req, timeout=600):
                n += len(r.token_ids)
            if n != job.max_tokens:
                raise RuntimeError(f"{tag}-{i}: {n} tokens, asked {job.max_tokens}")
            return n

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i, j) for i, j in enumerate(jobs)))
        return time.perf_counter() - t0, sum(counts)


def session_cpu(sid: int) -> dict[int, tuple[str, float]]:
    """pid -> (kind, CPU seconds so far) of every process in session ``sid`` (the
    server's: it runs in a session of its own, Ray's processes included)."""
    out: dict[int, tuple[str, float]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2:].split()  # fields from the 3rd on
        if int(f[3]) != sid:
            continue
        cpu = (int(f[11]) + int(f[12])) / CLK_TCK
        kind = "router" if int(d.name) == sid else ROLE_OF_PROCESS.get(cmd.strip(), "ray")
        out[int(d.name)] = (kind, cpu)
    return out


def cpu_split(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
              ) -> dict[str, float]:
    """CPU seconds spent between the two reads, by kind of process."""
    split: Counter[str] = Counter()
    for pid, (kind, cpu) in after.items():
        split[kind] += cpu - before.get(pid, (kind, 0.0))[1]
    return dict(split)


class PySpy:
    """``py-spy record`` on some of the server's processes for the length of a block."""

    def __init__(self, pids: dict[str, int], out_dir: Path) -> None:
        self.pids, self.out_dir = pids, out_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> PySpy:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in self.pids.items():
            self.procs.append(subprocess.Popen(
                [exe, "record", "-p", str(pid), "-r", "100", "--nonblocking", "-f", "raw",
                 "-o", str(self.out_dir / f"{name}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)  # attached before the load starts
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.send_signal(2)  # SIGINT: py-spy writes what it has
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(30)


def top_frames(path: Path, k: int = 8) -> dict[str, object]:
    """From py-spy's collapsed stacks: the hottest leaf frames (self time) and the
    hottest frames overall (inclusive), as fractions of the samples, and the shares of
    the samples inside the model forward and inside the engine step."""
    leaf: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = forward = step = 0
    if not path.exists():
        return {}
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        c = int(n)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += c
        leaf[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
        if any(f.startswith(FORWARD_FRAME) for f in frames):
            forward += c
        if any(f.startswith(STEP_FRAME) for f in frames):
            step += c

    def frac(cnt: Counter[str]) -> list[list[object]]:
        return [[f, round(c / total, 3)] for f, c in cnt.most_common(k)]

    return {"samples": total, "forward_share": round(forward / max(total, 1), 3),
            "engine_step_share": round(step / max(total, 1), 3),
            "top_self": frac(leaf), "top_inclusive": frac(incl)}


def run_served(dep: Deployment, jobs_by_n: dict[int, list[Job]], runs: int, log_dir: Path,
               profile_dir: Path | None) -> dict[str, object]:
    """Start the deployment, warm it, then each concurrency: ``runs`` runs of the main
    one (32 streams, W2), one of the others; tokens/s and CPU per token by process."""
    from bench.loadgen import wait_ready

    main_n = 32 if 32 in jobs_by_n else next(iter(jobs_by_n))
    res: dict[str, object] = {"deployment": " ".join(dep.args())}
    server = ServerProcess(dep, log_dir)
    with server as target:
        asyncio.run(wait_ready(target, timeout_s=600))
        assert server.proc is not None
        sid = server.proc.pid  # the server leads its own session (bench/serving.py)
        asyncio.run(send_all(target, jobs_by_n[main_n][:4], f"{dep.name}-warm"))
        # What the deployment burns with nothing to do (heartbeats, polls, Ray's own
        # loops), per second: on a slow run it inflates the per-token figures.
        before = session_cpu(sid)
        time.sleep(IDLE_S)
        idle = {k: v / IDLE_S for k, v in cpu_split(before, session_cpu(sid)).items()}
        res["idle_cpu_cores"] = {k: round(v, 4) for k, v in idle.items()}
        for n, jobs in jobs_by_n.items():
            walls, splits = [], []
            for r in range(runs if n == main_n else 1):
                before, c0 = session_cpu(sid), time.process_time()
                spy: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
                if profile_dir is not None and r == 0:
                    spy = PySpy({f"{dep.name}-{n}-{kind}-{pid}": pid
                                 for pid, (kind, _) in before.items() if kind != "ray"},
                                profile_dir)
                with spy:
                    wall, tokens = asyncio.run(send_all(target, jobs, f"{dep.name}-{n}-{r}"))
                split = cpu_split(before, session_cpu(sid))
                split["client"] = time.process_time() - c0
                walls.append(wall)
                splits.append({k: 1e6 * v / tokens for k, v in split.items()})
                print(f"[overhead] {dep.name} {n} streams run {r + 1}: "
                      f"{tokens / wall:.1f} tok/s; CPU us/token "
                      + ", ".join(f"{k} {v:.0f}" for k, v in sorted(splits[-1].items())),
                      file=sys.stderr, flush=True)
            tokens = sum(j.max_tokens for j in jobs)
            keys = sorted({k for s in splits for k in s})
            res[f"streams_{n}"] = {
                "seconds": walls, "tokens": tokens,
                "tokens_per_s": tokens / statistics.median(walls),
                "cpu_us_per_token": {k: round(statistics.median(s.get(k, 0.0) for s in splits), 1)
                                     for k in keys}}
            # Cores each kind kept busy: a decode worker near 1.0 with one thread is the
            # deployment's bottleneck, whatever the service path costs.
            tps = tokens / statistics.median(walls)
            row = res[f"streams_{n}"]
            row["cores_busy"] = {k: round(v * tps / 1e6, 2)  # type: ignore[index]
                                 for k, v in row["cpu_us_per_token"].items()}  # type: ignore[index]
            # Net of the idle burn over the same wall time: what the tokens themselves cost.
            row["cpu_us_per_token_net_of_idle"] = {  # type: ignore[index]
                k: round(v - 1e6 * idle.get(k, 0.0) / tps, 1)
                for k, v in row["cpu_us_per_token"].items()}  # type: ignore[index]
    return res


@dataclass(frozen=True)
class OverheadConfig:
    model: str = "smollm2-135m"
    runs: int = 3
    threads: int = 2
    streams: tuple[int, ...] = (32,)
    profile: bool = False
    out: Path = Path("bench/results/overhead-cpu.json")
    modes: tuple[str, ...] = ("offline", "colocated", "1p1d")
    stream_interval: int = 4  # the "colocated-interval" mode's --stream-interval


def run(cfg: OverheadConfig) -> dict[str, object]:
    from bench.offline import machine

    streams = tuple(dict.fromkeys((32, *cfg.streams)))  # W2 (32) first: it is the headline
    jobs_by_n = {n: workload(cfg.model, n) for n in streams}
    w2 = jobs_by_n[32]
    out_dir = cfg.out.parent
    log_dir = out_dir / "overhead" / "logs"  # ignored by git, as every bench log dir
    prof = log_dir / "profile" if cfg.profile else None  # py-spy raw stacks
    result: dict[str, object] = {
        "command": "pdserve bench " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "workload": {"name": "W2", "prompts": len(w2),
                     "prompt_tokens": sum(len(j.prompt) for j in w2),
                     "useful_output_tokens": sum(j.max_tokens for j in w2),
                     "output_lengths": "16..160 even spread, greedy, ignore_eos, all at once"},
        "runs": cfg.runs, "threads": cfg.threads}
    tps: dict[str, float] = {}
    if "offline" in cfg.modes:
        secs = run_offline(cfg.model, w2, cfg.runs, cfg.threads)
        tps["offline"] = sum(j.max_tokens for j in w2) / statistics.median(secs)
        result["offline"] = {"seconds": secs, "tokens_per_s": tps["offline"]}
        print(f"[overhead] offline: {tps['offline']:.1f} tok/s", file=sys.stderr, flush=True)
    half = max(cfg.threads // 2, 1)
    deps = {"colocated": Deployment("overhead-colocated", mode="colocated", workers=1,
                                    threads=cfg.threads, model=cfg.model),
            "1p1d": Deployment("overhead-1p1d", prefill_workers=1, decode_workers=1,
                               threads=half, model=cfg.model),
            # The colocated deployment again, one message per N tokens: what the
            # per-message part of the router's cost is.
            "colocated-interval": Deployment(
                f"overhead-colocated-interval{cfg.stream_interval}", mode="colocated",
                workers=1, threads=cfg.threads, model=cfg.model,
                stream_interval=cfg.stream_interval)}
    for name, dep in deps.items():
        if name not in cfg.modes:
            continue
        r = run_served(dep, jobs_by_n, cfg.runs, log_dir, prof)
        result[name] = r
        tps[name] = r["streams_32"]["tokens_per_s"]  # type: ignore[index]
    if "offline" in tps:
        result["ratio_to_offline"] = {k: round(v / tps["offline"], 3) for k, v in tps.items()}
    if prof is not None:
        result["profile"] = {p.stem: top_frames(p) for p in sorted(prof.glob("*.txt"))}
    result["tokens_per_s"] = {k: round(v, 1) for k, v in tps.items()}
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(result, indent=1) + "\n")
    return result
