"""What one token-stream item costs the router and the worker: Ray's streaming
generator against the token channel (runtime/token_channel.py), side by side.

A decode worker sends the router one StepBatch per engine step. This benchmark sends
the same StepBatches (``--events`` requests' tokens and a full WorkerStats each) from one
Ray actor to this process, ``--items`` of them ``--interval-ms`` apart, once through an
actor method that yields them (Ray's ObjectRefGenerator, how pdserve streamed before)
and once through the actor's TokenChannelServer (how it streams now), and reads the CPU
time each process spent per item from /proc, net of what it burns idle over the same
time. The transports alternate within each round, ``--rounds`` rounds, medians.

    python -m bench.stream_transport [--items 300] [--events 18] [--interval-ms 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray

from bench.grpc_floor import cpu_seconds
from engine.stats import EngineStats
from messages import PoolState, StepBatch, TokenEvent, WorkerStats
from runtime.token_channel import ChannelAddress, TokenChannelServer, read_channel


def step_batch(step: int, events: int) -> StepBatch:
    """What a decode step of ``events`` running requests sends (no pool counts, as
    between the once-a-second reports)."""
    engine = EngineStats(**{f: 1 for f in EngineStats.__dataclass_fields__})
    stats = WorkerStats("decode-0", "decode", engine, steps=step, busy_seconds=1.0,
                        pool=PoolState(1, 2, 3, 4, 5, 15) if step % 20 == 0 else None)
    return StepBatch("decode-0", [TokenEvent(f"req-{i}@1", [1000 + step], [], None, 16)
                                  for i in range(events)], stats)


class Sender:
    """A worker that streams ``items`` step batches, ``interval_s`` apart, both ways."""

    def __init__(self) -> None:
        self.plan = (0, 0, 0.0)
        self.channel = TokenChannelServer(self._batches)

    def pid(self) -> int:
        return os.getpid()

    async def _batches(self) -> AsyncIterator[StepBatch]:
        items, events, interval_s = self.plan
        for i in range(items):
            await asyncio.sleep(interval_s)
            yield step_batch(i, events)
        await asyncio.Event().wait()  # a worker's stream never ends

    async def generator(self, items: int, events: int, interval_s: float
                        ) -> AsyncIterator[StepBatch]:
        self.plan = (items, events, interval_s)
        async for b in self._batches():
            yield b

    async def open_channel(self, items: int, events: int, interval_s: float
                           ) -> ChannelAddress:
        self.plan = (items, events, interval_s)
        return await self.channel.open("127.0.0.1")


async def via_generator(actor: Any, items: int, events: int, interval_s: float) -> int:
    n = 0
    async for ref in actor.generator.remote(items, events, interval_s):
        await ref
        n += 1
        if n == items:
            break
    return n


async def via_channel(actor: Any, items: int, events: int, interval_s: float) -> int:
    n = 0
    reader = read_channel(await actor.open_channel.remote(items, events, interval_s))
    async for _ in reader:
        n += 1
        if n == items:
            break
    await reader.aclose()
    return n


async def measure(actor: Any, wpid: int, how: str, items: int, events: int,
                  interval_s: float) -> dict[str, float]:
    me = os.getpid()
    d0, w0, t0 = cpu_seconds(me), cpu_seconds(wpid), time.monotonic()
    await asyncio.sleep(items * interval_s)  # idle over the same time: subtracted below
    d_idle, w_idle = cpu_seconds(me) - d0, cpu_seconds(wpid) - w0
    d0, w0, t0 = cpu_seconds(me), cpu_seconds(wpid), time.monotonic()
    fn = via_generator if how == "ray_generator" else via_channel
    n = await fn(actor, items, events, interval_s)
    wall = time.monotonic() - t0
    scale = wall / (items * interval_s)
    return {"router_us_per_item": 1e6 * (cpu_seconds(me) - d0 - d_idle * scale) / n,
            "worker_us_per_item": 1e6 * (cpu_seconds(wpid) - w0 - w_idle * scale) / n,
            "items": n, "wall_s": wall}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.stream_transport")
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--events", type=int, default=18, help="requests per step batch")
    ap.add_argument("--interval-ms", type=float, default=60.0,
                    help="between step batches (a decode step)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/stream-transport-cpu.json"))
    args = ap.parse_args(argv)
    from bench.offline import machine

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    actor = ray.remote(Sender).options(num_cpus=0).remote()
    wpid = ray.get(actor.pid.remote())
    interval_s = args.interval_ms / 1000

    async def run() -> dict[str, list[dict[str, float]]]:
        await via_generator(actor, 20, args.events, 0.0)  # warm both paths up
        rows: dict[str, list[dict[str, float]]] = {"ray_generator": [], "token_channel": []}
        for r in range(args.rounds):
            for how in rows:
                rows[how].append(await measure(actor, wpid, how, args.items, args.events,
                                               interval_s))
                print(f"[stream-transport] round {r} {how}: {rows[how][-1]}",
                      file=sys.stderr, flush=True)
        return rows

    rows = asyncio.run(run())
    summary = {how: {k: round(statistics.median(x[k] for x in rs), 1)
                     for k in ("router_us_per_item", "worker_us_per_item")}
               for how, rs in rows.items()}
    result = {"command": "python -m bench.stream_transport " + " ".join(sys.argv[1:]),
              "machine": machine(), "items": args.items, "events": args.events,
              "interval_ms": args.interval_ms, "rounds": rows, "median": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()
