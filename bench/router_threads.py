"""Where a running router's CPU goes, thread by thread, per streamed token.

Drives an already running server (`pdserve serve ...`) with W2 (bench/overhead.py: the
same prompts as token ids and 16-160 output tokens) and reads the CPU ticks of every
thread of the router's process from /proc/PID/task before and after: the event loop
("python*main"), Ray's core-worker io thread ("worker.io"), gRPC's pollers, and so on,
each per token received, beside what the same thread burns idle over the same time.
Used to find that Ray's streaming generator cost the router a quarter of its CPU; the
A/B in docs/benchmarks.md section 10 ran it against two checkouts in turn:

    git worktree add /tmp/old <commit>
    (cd /tmp/old; PYTHONPATH=$PWD pdserve serve --mode colocated --workers 1 \\
        --threads-per-worker 2 --port 50071 --http-port 0 --metrics-port 0) &
    python -m bench.router_threads --target 127.0.0.1:50071 --pid <serve pid> --streams 32 --runs 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections import Counter
from pathlib import Path

from bench.overhead import send_all, workload

CLK_TCK = os.sysconf("SC_CLK_TCK")
IDLE_S = 10.0


def thread_cpu(pid: int) -> Counter[str]:
    """CPU seconds so far of each thread of ``pid``, by thread name (the main thread's
    marked ``*main``; threads of one name summed)."""
    out: Counter[str] = Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue  # ended meanwhile
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[name + ("*main" if tid == str(pid) else "")] += (
            int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.router_threads")
    ap.add_argument("--target", default="127.0.0.1:50051")
    ap.add_argument("--pid", type=int, required=True, help="the pdserve serve process")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args(argv)
    jobs = workload(args.model, args.streams)
    asyncio.run(send_all(args.target, jobs[:4], f"warm-{time.time()}"))
    i0 = thread_cpu(args.pid)
    time.sleep(IDLE_S)
    idle = thread_cpu(args.pid) - i0
    before, t0, tokens = thread_cpu(args.pid), time.monotonic(), 0
    for r in range(args.runs):
        tokens += asyncio.run(send_all(args.target, jobs, f"r{r}-{time.time()}"))[1]
    wall, after = time.monotonic() - t0, thread_cpu(args.pid)
    print(f"{tokens} tokens in {wall:.1f} s; router CPU per token by thread (us):")
    for name in sorted(after, key=lambda k: before[k] - after[k]):
        used, idle_share = after[name] - before[name], idle[name] / IDLE_S * wall
        if used > 0 or idle_share > 0:
            print(f"  {name:24s} {1e6 * used / tokens:8.1f}   idle over the same time "
                  f"{1e6 * idle_share / tokens:6.1f}")
    total = sum(after[k] - before[k] for k in after)
    print(f"total {1e6 * total / tokens:.1f} us per token")


if __name__ == "__main__":
    main()
