"""Markdown tables of the suite's JSON (what docs/benchmarks-serving.md shows).

    python -m bench.tables [bench/results]   # every table, the per-miss one included

``pdserve bench plot`` prints the tables that need only the summary (``markdown``); the
miss table needs the per-request records too (``miss_table``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _ms(d: dict[str, Any] | None, key: str) -> str:
    v = (d or {}).get(key)
    return "-" if v is None else f"{1e3 * v:.0f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def runs_table(summary: dict[str, Any]) -> str:
    """One row per run; latencies of the stream requests for interference runs (the
    decode streams the SLO protects), of all requests otherwise."""
    head = ("| deployment | workload | rate (req/s) | ok/sent | TTFT p50 / p90 / p99 (ms) | "
            "TPOT p50 / p99 (ms) | ITL p99 (ms) | E2E p50 (ms) | out tok/s | "
            "SLO attainment (all / streams) |")
    rows = [head, "|" + "---|" * 10]
    for r in summary["runs"]:
        s, ss = r["summary"], r.get("stream_summary")
        lat = ss or s
        ok = s["codes"].get("OK", 0)
        rows.append(
            f"| {r['deployment']} | {r['workload']} | {r['rate']:g} | {ok}/{s['requests']} | "
            f"{_ms(lat['ttft_s'], 'p50')} / {_ms(lat['ttft_s'], 'p90')} / "
            f"{_ms(lat['ttft_s'], 'p99')} | {_ms(lat['tpot_s'], 'p50')} / "
            f"{_ms(lat['tpot_s'], 'p99')} | {_ms(lat['itl_s'], 'p99')} | "
            f"{_ms(lat['e2e_s'], 'p50')} | {s['throughput']['output_tokens_per_s']:.1f} | "
            f"{_pct(s['slo_attainment'])} / "
            f"{_pct(ss['slo_attainment']) if ss else '-'} |")
    return "\n".join(rows)


def _colocated(summary: dict[str, Any], dep: str) -> bool:
    mode = ((summary.get("deployments") or {}).get(dep) or {}).get("mode")
    return mode == "colocated" if mode else dep.startswith("colocated")


def burst_table(summary: dict[str, Any]) -> str:
    """Stream requests at the reference rate, inside vs outside the burst prefills.

    The server-side queue and prefill columns are "n/a" for colocated deployments: the
    router only measures them for disaggregated requests (from the prefill worker's
    PrefillResult, router/lifecycle.py); a colocated request's Timing carries 0 for
    both, which is not a measurement."""
    rows = ["| deployment | ITL p50 / p99 outside bursts (ms) | ITL p50 / p99 in bursts (ms) | "
            "stream TTFT p50 arriving outside / in bursts (ms) | server queue p50 in bursts "
            "(ms) | server prefill p50 in bursts (ms) |", "|" + "---|" * 6]
    for dep, h in summary["headline"].items():
        b = h.get("burst_split") if isinstance(h, dict) else None
        if not b:
            continue
        inn, out = b["streams_arriving_in_bursts"], b["streams_arriving_outside_bursts"]
        colo = _colocated(summary, dep)
        queue = "n/a" if colo else _ms(inn["server_queue_s"], "p50")
        prefill = "n/a" if colo else _ms(inn["server_prefill_s"], "p50")
        rows.append(
            f"| {dep} | {_ms(b['itl_outside_bursts_s'], 'p50')} / "
            f"{_ms(b['itl_outside_bursts_s'], 'p99')} | {_ms(b['itl_in_bursts_s'], 'p50')} / "
            f"{_ms(b['itl_in_bursts_s'], 'p99')} | {_ms(out['ttft_s'], 'p50')} / "
            f"{_ms(inn['ttft_s'], 'p50')} | {queue} | {prefill} |")
    return "\n".join(rows)


def miss_table(summary: dict[str, Any], records: dict[str, Any]) -> str:
    """Where each interference run's SLO misses come from, recomputed from the records
    with the SLOs the run was judged by (``summary["slos"]``). Each column counts every
    request that misses that part: a request over both its TTFT and its TPOT limit is
    counted in its TTFT column *and* in the TPOT column (and in "both"), so the columns
    can add up to more than "missed SLO" (= requests minus those that met both)."""
    from bench.loadgen import RequestRecord
    from bench.report import Slo

    slos = {k: Slo(**v) for k, v in summary["slos"].items()}
    names = set(RequestRecord.__dataclass_fields__)
    rows = ["| deployment | rate (req/s) | requests | missed SLO | burst TTFT misses "
            "(of bursts) | stream TTFT misses | TPOT misses (streams + bursts) | missed "
            "both TTFT and TPOT | errors |", "|" + "---|" * 9]
    for run in records["runs"]:
        if run["workload"] != "interference":
            continue
        rs = [RequestRecord(**{k: v for k, v in d.items() if k in names})
              for d in run["records"]]
        judged = [r for r in rs if r.kind in slos]

        def ttft_miss(r: RequestRecord) -> bool:
            return (r.ok and r.ttft_s is not None
                    and r.ttft_s > slos[r.kind].ttft_limit(r.prompt_tokens))

        def tpot_miss(r: RequestRecord) -> bool:
            return (r.ok and r.ttft_s is not None and r.tpot_s is not None
                    and r.tpot_s > slos[r.kind].tpot_s)

        bursts = [r for r in judged if r.kind == "burst"]
        streams = [r for r in judged if r.kind == "stream"]
        tpot_s = sum(map(tpot_miss, streams))
        tpot_b = sum(map(tpot_miss, bursts))
        rows.append(
            f"| {run['deployment']} | {run['rate']:g} | {len(judged)} | "
            f"{sum(not slos[r.kind].met(r) for r in judged)} | "
            f"{sum(map(ttft_miss, bursts))} (of {len(bursts)}) | "
            f"{sum(map(ttft_miss, streams))} | {tpot_s + tpot_b} ({tpot_s} + {tpot_b}) | "
            f"{sum(ttft_miss(r) and tpot_miss(r) for r in judged)} | "
            f"{sum(not r.ok or r.ttft_s is None for r in judged)} |")
    return "\n".join(rows)


def markdown(summary: dict[str, Any], records: dict[str, Any] | None = None) -> str:
    out = runs_table(summary) + "\n\n" + burst_table(summary) + "\n"
    return out + ("\n" + miss_table(summary, records) + "\n" if records else "")


def main(argv: list[str] | None = None) -> int:
    out = Path((argv if argv is not None else sys.argv[1:] or ["bench/results"])[0])
    prefix = "serving-cpu" if (out / "serving-cpu.json").exists() else "serving-gpu"
    summary = json.loads((out / f"{prefix}.json").read_text())
    records_path = out / f"{prefix}-records.json"
    records = json.loads(records_path.read_text()) if records_path.exists() else None
    print(markdown(summary, records), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
