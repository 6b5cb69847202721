"""`pdserve bench`: load a running server, or run the whole comparison suite.

    pdserve bench load --target HOST:PORT --workload chat --rate 0.5 1 2 [--duration 60]
                       [--max-requests N] [--seed S] [--out FILE.json]
        open-loop Poisson load at each rate against a running server; prints and
        writes the summary (TTFT/TPOT/ITL/E2E percentiles, throughput, SLO attainment,
        goodput over the sweep)
    pdserve bench suite [--out-dir bench/results] [--quick]
        starts each deployment itself (disaggregated vs colocated, prefix cache on vs
        off), runs every workload, writes serving-cpu.json (+ -records.json) and the PNGs
    pdserve bench plot [--out-dir bench/results]
        redraws the PNGs from the JSON and prints the tables (markdown)
    pdserve bench transfer [--sizes 1 8 64] [--runs 5] [--out FILE.json]
        one request's KV between two workers: the object store within a Ray node and
        across two (simulated) nodes, and gloo (the collective backend), against memcpy
    pdserve bench kv-budget [--runs 3] [--kv-cache-memory 0.08] [--out FILE.json]
        1 prefill + 1 decode at one KV memory budget, fp32 vs int8 KV, interleaved:
        decode pool, decode batch (peak, mean), preemptions, goodput, throughput
        (bench/kv_budget_serving.py)
    pdserve bench soak [--duration 1800] [--rate 2] [--malloc-arena-max N]
        a long mixed workload against a server it starts, sampling every process's RSS,
        KV blocks by owner and latency every 15 s; writes soak.json and soak-rss.png
    pdserve bench overhead [--runs 3] [--streams 32] [--out bench/results/overhead-cpu.json]
        the service path's cost against offline (bench/overhead.py)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import workloads


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pdserve bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    load = sub.add_parser("load", help="load a running server")
    load.add_argument("--target", default="127.0.0.1:50051")
    load.add_argument("--workload", choices=(*workloads.WORKLOADS, "interference-nobursts"),
                      default="chat")
    load.add_argument("--rate", type=float, nargs="+", default=[1.0],
                      help="requests/s (several: a sweep, one run per rate)")
    load.add_argument("--duration", type=float, default=60.0,
                      help="seconds during which requests arrive")
    load.add_argument("--max-requests", type=int, default=1000)
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--timeout", type=float, default=300.0, help="per-request deadline")
    load.add_argument("--api-key", default=None)
    load.add_argument("--out", default=None, help="write the summary JSON here")
    load.set_defaults(func=cmd_load)

    suite = sub.add_parser("suite", help="start each deployment and run every workload")
    suite.add_argument("--out-dir", default="bench/results")
    suite.add_argument("--rates", type=float, nargs="+", default=None)
    suite.add_argument("--ref-rate", type=float, default=None)
    suite.add_argument("--duration", type=float, default=None)
    suite.add_argument("--skip", nargs="*", default=None, choices=workloads.WORKLOADS,
                       help="workloads to leave out (default: long-prompt; give --skip "
                            "with no names to run everything)")
    suite.add_argument("--modes", nargs="+", default=None,
                       choices=("disaggregated", "colocated", "colocated-step128"))
    suite.add_argument("--model", default=None,
                       help="model of every deployment (default: the server's, smollm2-135m)")
    suite.add_argument("--gpus-per-worker", type=float, default=None,
                       help="GPU runs: GPUs per worker (0.5: prefill and decode share one)")
    suite.add_argument("--quick", action="store_true",
                       help="a smoke run: two rates, 15 s each, no long-prompt")
    suite.set_defaults(func=cmd_suite)

    plot = sub.add_parser("plot", help="redraw the PNGs from the suite's JSON")
    plot.add_argument("--out-dir", default="bench/results")
    plot.set_defaults(func=cmd_plot)

    soak = sub.add_parser("soak", help="a long mixed workload, watching memory")
    soak.add_argument("--duration", type=float, default=1800.0, help="seconds")
    soak.add_argument("--rate", type=float, default=2.0, help="requests/s")
    soak.add_argument("--sample", type=float, default=15.0, help="seconds between samples")
    soak.add_argument("--warmup", type=float, default=300.0,
                      help="seconds left out of the RSS slope")
    soak.add_argument("--malloc-arena-max", type=int, default=None,
                      help="MALLOC_ARENA_MAX for the server and its workers")
    soak.add_argument("--memory-diag", action="store_true",
                      help="workers report malloc, tracemalloc and gc counts per sample")
    soak.add_argument("--out-dir", default="bench/results")
    soak.set_defaults(func=cmd_soak)

    xfer = sub.add_parser("transfer", help="KV transfer paths against memcpy (CPU, 2 Ray nodes)")
    xfer.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 64], help="MiB of KV")
    xfer.add_argument("--runs", type=int, default=5)
    xfer.add_argument("--out", default="bench/results/transfer-cpu.json")
    xfer.set_defaults(func=cmd_transfer)

    from bench.kv_budget_serving import add_flags as kv_budget_flags  # grpc: loaded anyway

    budget = sub.add_parser("kv-budget", help="serving at one KV memory budget, fp32 vs int8")
    kv_budget_flags(budget)
    budget.set_defaults(func=cmd_kv_budget)

    over = sub.add_parser("overhead", help="the service path's cost against offline")
    over.add_argument("--runs", type=int, default=3)
    over.add_argument("--threads", type=int, default=2, help="torch threads in all")
    over.add_argument("--streams", type=int, nargs="+", default=[32],
                      help="concurrencies for the CPU split (32 is W2, always run)")
    over.add_argument("--modes", nargs="+", default=["offline", "colocated", "1p1d"],
                      choices=("offline", "colocated", "1p1d", "colocated-interval"))
    over.add_argument("--stream-interval", type=int, default=4,
                      help="--stream-interval of the colocated-interval mode")
    over.add_argument("--profile", action="store_true",
                      help="py-spy the router and workers once per concurrency")
    over.add_argument("--model", default="smollm2-135m")
    over.add_argument("--out", default="bench/results/overhead-cpu.json")
    over.set_defaults(func=cmd_overhead)

    args = p.parse_args(argv)
    return int(args.func(args))


def cmd_kv_budget(args: argparse.Namespace) -> int:
    from bench.kv_budget_serving import config_from, run, table

    print(table(run(config_from(args), "pdserve bench " + " ".join(sys.argv[1:]))))
    return 0


def cmd_overhead(args: argparse.Namespace) -> int:
    from bench.overhead import OverheadConfig, run

    cfg = OverheadConfig(model=args.model, runs=args.runs, threads=args.threads,
                         streams=tuple(args.streams), profile=args.profile,
                         out=Path(args.out), modes=tuple(args.modes),
                         stream_interval=args.stream_interval)
    result = run(cfg)
    print(json.dumps({k: result.get(k) for k in ("tokens_per_s", "ratio_to_offline")},
                     indent=1))
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    from bench.transfer import TransferConfig, run, table

    print(table(run(TransferConfig(sizes_mib=tuple(args.sizes), runs=args.runs,
                                   out=Path(args.out)))))
    return 0


def cmd_soak(args: argparse.Namespace) -> int:
    from bench.serving import Deployment
    from bench.soak import SoakConfig, run

    cfg = SoakConfig(duration_s=args.duration, rate=args.rate, sample_s=args.sample,
                     warmup_s=args.warmup, malloc_arena_max=args.malloc_arena_max,
                     memory_diag=args.memory_diag, out_dir=Path(args.out_dir))
    result = run(cfg, Deployment("soak"))
    print(json.dumps({k: result[k] for k in ("rss_slope_mb_per_min_after_warmup",
                                             "anon_rss_slope_mb_per_min_after_warmup")},
                     indent=1))
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from bench.loadgen import LoadConfig, run_load, wait_ready
    from bench.report import goodput, summarize
    from bench.suite import ATTAINMENT_TARGET, SLOS, slos_json

    async def go() -> dict[str, object]:
        info = await wait_ready(args.target, timeout_s=30)
        runs = []
        for i, rate in enumerate(args.rate):
            # salt: fresh prompt ids per rate, so one rate's prompts are not prefix-cache
            # hits in the next (interference; the other workloads ignore it).
            specs = workloads.build(args.workload, rate, args.duration, args.max_requests,
                                    info.vocab_size, args.seed, salt=i)
            cfg = LoadConfig(args.target, timeout_s=args.timeout, api_key=args.api_key,
                             label=f"{args.workload} {rate:g}/s")
            records, wall = await run_load(cfg, specs, run_id=f"load-{rate:g}")
            runs.append({"rate": rate, "summary": summarize(records, wall, SLOS)})
        pts = [(r["rate"], r["summary"]["slo_attainment"]) for r in runs]
        return {"target": args.target, "workload": args.workload, "slos": slos_json(SLOS),
                "goodput_rps": goodput([p for p in pts if p[1] is not None],
                                       ATTAINMENT_TARGET),
                "runs": runs}

    result = asyncio.run(go())
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def cmd_suite(args: argparse.Namespace) -> int:
    from bench.offline import machine
    from bench.plots import draw_all
    from bench.suite import SuiteConfig, results_json, run_suite
    from bench.tables import markdown

    cfg = SuiteConfig(out_dir=args.out_dir)
    if args.quick:
        cfg = dataclasses.replace(cfg, rates=(0.5, 1.0), duration_s=15.0, chat_duration_s=8.0,
                                  shared_requests=4, skip=("long-prompt",))
    over = {"rates": tuple(args.rates) if args.rates else None, "ref_rate": args.ref_rate,
            "duration_s": args.duration, "modes": tuple(args.modes) if args.modes else None,
            "model": args.model, "gpus_per_worker": args.gpus_per_worker}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in over.items() if v is not None})
    if args.skip is not None:
        cfg = dataclasses.replace(cfg, skip=tuple(args.skip))
    t0 = time.monotonic()
    code = code_version()
    runs = run_suite(cfg)
    summary, records = results_json(runs, cfg)
    summary["command"] = "pdserve bench " + " ".join(sys.argv[1:] if sys.argv else [])
    summary["machine"] = machine()
    summary["code"] = code
    summary["suite_wall_s"] = time.monotonic() - t0
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = "serving-gpu" if cfg.gpus_per_worker else "serving-cpu"
    (out / f"{prefix}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / f"{prefix}-records.json").write_text(json.dumps(records) + "\n")
    for path in draw_all(summary, records, out, prefix=prefix):
        sys.stderr.write(f"[bench] wrote {path}\n")
    print(markdown(summary))
    print(json.dumps(summary["headline"], indent=1))
    return 0


def code_version() -> dict[str, object]:
    """The commit, and whether the serving code differs from it (a hash of the diff):
    numbers only compare between runs of the same code."""
    import hashlib
    import subprocess

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, timeout=30,
                                  check=False).stdout
        except OSError:
            return ""

    paths = ["engine", "kernels", "router", "messages", "runtime", "prefill_worker",
             "decode_worker", "colocated_worker", "kvtransfer"]
    diff = git("diff", "HEAD", "--", *paths)
    return {"commit": git("rev-parse", "HEAD").strip(),
            "serving_code_dirty": bool(diff or git("status", "--porcelain", "--", *paths)),
            "serving_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:12]}


def cmd_plot(args: argparse.Namespace) -> int:
    from bench.plots import draw_all
    from bench.tables import markdown

    out = Path(args.out_dir)
    prefix = "serving-cpu" if (out / "serving-cpu.json").exists() else "serving-gpu"
    summary = json.loads((out / f"{prefix}.json").read_text())
    records = json.loads((out / f"{prefix}-records.json").read_text())
    for path in draw_all(summary, records, out, prefix=prefix):
        print(path)
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
