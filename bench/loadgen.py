"""Open-loop load generator over pdserve's gRPC API.

Every request is sent at its scheduled arrival offset whatever the server is doing, on
one asyncio loop with one channel (gRPC multiplexes the streams). The client's clock
measures everything (the server's own Timing message is kept alongside): TTFT is
send -> first message with tokens, and a message carrying k tokens after a gap g counts
as k gaps of g / k (the server batches tokens per step; spreading the gap keeps TPOT
and ITL consistent with the token count).
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from itertools import pairwise

import grpc

from bench.workloads import RequestSpec
from proto.pdserve.v1 import generation_pb2 as pb
from proto.pdserve.v1 import generation_pb2_grpc as pb_grpc
from router import client as pdclient


@dataclass
class RequestRecord:
    """What one request saw, in seconds since the run's start (client clock)."""

    index: int
    kind: str
    arrival_s: float
    sent_s: float = 0.0
    first_token_s: float | None = None
    done_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)  # one per token
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    code: str = "OK"  # a grpc.StatusCode name, or DRAIN_TIMEOUT (cut at the run's end)
    server_ttft_s: float | None = None
    server_queue_s: float | None = None
    server_prefill_s: float | None = None
    server_kv_transfer_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.code == "OK"

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.sent_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.done_s is None else self.done_s - self.sent_s

    @property
    def gaps_s(self) -> list[float]:
        t = self.token_times_s
        return [b - a for a, b in pairwise(t)]

    @property
    def tpot_s(self) -> float | None:
        """Mean gap after the first token; None for one-token answers."""
        t = self.token_times_s
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None


@dataclass(frozen=True)
class LoadConfig:
    """target: host:port. timeout_s: each call's gRPC deadline. drain_s: after the last
    arrival, how long requests still in flight get before they are cancelled."""

    target: str
    timeout_s: float = 300.0
    drain_s: float = 120.0
    api_key: str | None = None
    label: str = ""


def to_request(spec: RequestSpec, run_id: str) -> pb.GenerateRequest:
    # ignore_eos: the workload, not the model's mood, decides the output length; greedy
    # and seeded so reruns ask for the same work.
    sampling = pb.SamplingParams(temperature=0.0, max_tokens=spec.max_tokens, ignore_eos=True)
    rid = f"{run_id}-{spec.index}"
    if spec.prompt_ids is not None:
        return pb.GenerateRequest(request_id=rid, token_ids=pb.TokenIds(ids=spec.prompt_ids),
                                  sampling=sampling)
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content=spec.chat_text or "")])
    return pb.GenerateRequest(request_id=rid, chat=chat, sampling=sampling)


class Progress:
    """A one-line progress bar on stderr (plain text, redrawn in place when a tty)."""

    def __init__(self, label: str, total: int, duration_s: float) -> None:
        self.label, self.total, self.duration_s = label, total, duration_s
        self.sent = self.done = self.errors = 0
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def show(self, now_s: float, final: bool = False) -> None:
        if not final and now_s - self._last < (0.5 if self.tty else 10.0):
            return
        self._last = now_s
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        line = (f"[{self.label}] [{'#' * filled}{'.' * (width - filled)}] "
                f"{self.done}/{self.total} done, {self.sent} sent, {self.errors} errors, "
                f"{now_s:.0f}s/{self.duration_s:.0f}s")
        sys.stderr.write(("\r" + line) if self.tty else line + "\n")
        if final and self.tty:
            sys.stderr.write("\n")
        sys.stderr.flush()


async def _one(stub: pb_grpc.GenerationStub, spec: RequestSpec, rec: RequestRecord,
               t0: float, cfg: LoadConfig, run_id: str) -> None:
    rec.sent_s = time.perf_counter() - t0
    last: float | None = None
    try:
        call = stub.Generate(to_request(spec, run_id), timeout=cfg.timeout_s,
                             metadata=pdclient.metadata(cfg.api_key))
        async for r in call:
            now = time.perf_counter() - t0
            k = len(r.token_ids)
            if k:
                if rec.first_token_s is None:
                    rec.first_token_s = now
                    rec.token_times_s.append(now)
                    k -= 1
                    last = now
                base = last if last is not None else now
                rec.token_times_s += [base + (now - base) * (j + 1) / k for j in range(k)]
                last = now
            if r.HasField("usage"):
                rec.prompt_tokens = r.usage.prompt_tokens
                rec.cached_tokens = r.usage.cached_tokens
                rec.completion_tokens = r.usage.completion_tokens
            if r.HasField("timing"):
                t = r.timing
                rec.server_ttft_s = t.time_to_first_token_seconds
                rec.server_queue_s = t.queue_time_seconds
                rec.server_prefill_s = t.prefill_time_seconds
                rec.server_kv_transfer_s = t.kv_transfer_seconds
        rec.done_s = time.perf_counter() - t0
    except grpc.aio.AioRpcError as e:
        rec.code = e.code().name
    except asyncio.CancelledError:
        rec.code = "DRAIN_TIMEOUT"


async def run_load(cfg: LoadConfig, specs: list[RequestSpec], run_id: str = "bench"
                   ) -> tuple[list[RequestRecord], float]:
    """Send ``specs`` open-loop; returns the records (in spec order) and the wall time
    from the start to the last request's end."""
    records = [RequestRecord(s.index, s.kind, s.arrival_s) for s in specs]
    duration = max((s.arrival_s for s in specs), default=0.0)
    progress = Progress(cfg.label or run_id, len(specs), duration)
    async with grpc.aio.insecure_channel(cfg.target, options=[
            ("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.GenerationStub(channel)
        t0 = time.perf_counter()
        tasks: list[asyncio.Task[None]] = []

        async def ticker() -> None:
            while True:
                progress.done = sum(r.done_s is not None or not r.ok for r in records)
                progress.errors = sum(not r.ok for r in records)
                progress.show(time.perf_counter() - t0)
                await asyncio.sleep(0.5)

        tick = asyncio.get_running_loop().create_task(ticker())
        for spec, rec in zip(specs, records, strict=True):
            delay = spec.arrival_s - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.get_running_loop().create_task(
                _one(stub, spec, rec, t0, cfg, run_id)))
            progress.sent += 1
        _, pending = await asyncio.wait(tasks, timeout=cfg.drain_s) if tasks else (set(), set())
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)
        tick.cancel()
        wall = time.perf_counter() - t0
        progress.done = len(records)
        progress.errors = sum(not r.ok for r in records)
        progress.show(wall, final=True)
    return records, wall


async def wait_ready(target: str, timeout_s: float = 300.0) -> pb.ModelInfo:
    """Block until the server answers and a Generate goes through (workers loaded)."""
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        while True:
            try:
                info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
                req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1000, 1001, 1002]),
                                         sampling=pb.SamplingParams(max_tokens=2,
                                                                    temperature=0.0))
                async for _ in stub.Generate(req, timeout=60):
                    pass
                return info
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1.0)
