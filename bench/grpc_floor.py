"""What one streamed token costs a bare grpc.aio server: the floor under the router's cost.

`pdserve bench overhead` measures the router's CPU per generated token (router/ + gRPC +
Ray's client side). This benchmark runs the same client (bench.overhead.send_all, the
same W2 lengths, the same GenerateRequest and one GenerateResponse per token) against a
server that does nothing but gRPC: a Generation servicer whose "engine" is a ticker
handing every open call one token per step, as a decode worker's step batch does. Its
CPU per token is what grpc.aio itself costs on this machine (message serialization, the
completion-queue thread, the event loop's wake-ups); the router's figure minus this
floor is pdserve's own share.

``--tokenizer`` adds what the router does per token on top of gRPC (incremental
detokenization with the model's tokenizer, a Delta through an asyncio.Queue to the
call's task): the floor plus pdserve's per-token Python work, without Ray or a model.

    python -m bench.grpc_floor [--streams 8 32 128] [--step-ms 150] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc

from proto.pdserve.v1 import generation_pb2 as pb
from proto.pdserve.v1 import generation_pb2_grpc as pb_grpc

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the server (its own process, so its CPU is its own) -------------------------------
class TickingServicer(pb_grpc.GenerationServicer):
    """Every ``step_s`` each open call gets one token: a decode step's batch."""

    def __init__(self, step_s: float, detok_model: str | None) -> None:
        self.step_s = step_s
        self.open: dict[str, asyncio.Queue[int]] = {}
        self.tokenizer = None
        if detok_model is not None:
            from engine.tokenizer import load_tokenizer
            from engine.weights import resolve_model
            self.tokenizer = load_tokenizer(resolve_model(detok_model))

    async def tick(self) -> None:
        token = 0
        while True:
            await asyncio.sleep(self.step_s)
            token = (token + 1) % 1000 + 100
            for q in self.open.values():
                q.put_nowait(token)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> object:
        q: asyncio.Queue[int] = asyncio.Queue()
        self.open[request.request_id] = q
        detok = None
        if self.tokenizer is not None:
            from engine.detokenizer import IncrementalDetokenizer
            detok = IncrementalDetokenizer(self.tokenizer, list(request.token_ids.ids))
        try:
            for _ in range(request.sampling.max_tokens):
                t = await q.get()
                text = detok.add_token(t).delta if detok is not None else "x"
                yield pb.GenerateResponse(request_id=request.request_id, token_ids=[t],
                                          text=text)
            yield pb.GenerateResponse(request_id=request.request_id,
                                      finish_reason=pb.FINISH_REASON_LENGTH)
        finally:
            del self.open[request.request_id]


async def serve(port_file: Path, step_s: float, detok_model: str | None) -> None:
    from router.server import MAX_PENDING_CALLS

    # As the router's server: grpc core would cancel calls waiting past 1000.
    server = grpc.aio.server(options=[
        ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS)])
    servicer = TickingServicer(step_s, detok_model)
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ticker = asyncio.get_running_loop().create_task(servicer.tick())
    port_file.write_text(str(port))
    try:
        await server.wait_for_termination()
    finally:
        ticker.cancel()


# -- the driver -----------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text()
    fields = f[f.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def measure(streams: list[int], step_ms: float, runs: int, detok_model: str | None,
            model: str) -> dict[str, object]:
    from bench.overhead import send_all, workload

    port_file = Path(f"/tmp/pdserve-grpc-floor-{os.getpid()}.port")
    port_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.grpc_floor", "--serve", str(port_file),
           "--step-ms", str(step_ms)]
    if detok_model is not None:
        cmd += ["--detok-model", detok_model]
    proc = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists() or not port_file.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the floor server did not start")
            time.sleep(0.1)
        target = f"127.0.0.1:{port_file.read_text()}"
        jobs = {n: workload(model, n) for n in streams}
        asyncio.run(send_all(target, jobs[streams[0]][:4], "warm"))
        out: dict[str, object] = {}
        for n in streams:
            per_token, tps, client = [], [], []
            for r in range(runs):
                c0, p0 = cpu_seconds(proc.pid), time.process_time()
                wall, tokens = asyncio.run(send_all(target, jobs[n], f"floor-{n}-{r}"))
                per_token.append(1e6 * (cpu_seconds(proc.pid) - c0) / tokens)
                client.append(1e6 * (time.process_time() - p0) / tokens)
                tps.append(tokens / wall)
            out[f"streams_{n}"] = {"server_cpu_us_per_token": per_token,
                                   "client_cpu_us_per_token": client,
                                   "tokens_per_s": tps,
                                   "median_server_cpu_us_per_token":
                                       round(statistics.median(per_token), 1)}
            print(f"[grpc-floor] {n} streams, detok={detok_model is not None}: server "
                  f"{statistics.median(per_token):.0f} us/token at "
                  f"{statistics.median(tps):.0f} tok/s", file=sys.stderr, flush=True)
        return out
    finally:
        proc.terminate()
        proc.wait(30)
        port_file.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.grpc_floor")
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the server process
    ap.add_argument("--detok-model", help=argparse.SUPPRESS)
    ap.add_argument("--streams", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--step-ms", type=float, default=150.0,
                    help="one token per open call every STEP_MS (a decode step)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, default=Path("bench/results/grpc-floor-cpu.json"))
    args = ap.parse_args(argv)
    if args.serve is not None:
        asyncio.run(serve(args.serve, args.step_ms / 1000, args.detok_model))
        return
    from bench.offline import machine

    result = {"command": "python -m bench.grpc_floor " + " ".join(sys.argv[1:]),
              "machine": machine(), "step_ms": args.step_ms, "runs": args.runs,
              "grpc_only": measure(args.streams, args.step_ms, args.runs, None, args.model),
              "grpc_plus_detokenizer": measure(args.streams, args.step_ms, args.runs,
                                               args.model, args.model)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
