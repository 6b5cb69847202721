"""Markdown tables of the suite's JSON (what docs/benchmarks-serving.md shows)."""

from __future__ import annotations

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


def burst_table(summary: dict[str, Any]) -> str:
    """Stream requests at the reference rate, inside vs outside the burst prefills."""
    rows = ["| deployment | ITL p50 / p99 outside bursts (ms) | ITL p50 / p99 in bursts (ms) | "
            "stream TTFT p50 arriving outside / in bursts (ms) | server queue p50 in bursts "
            "(ms) | server prefill p50 in bursts (ms) |", "|" + "---|" * 6]
    for dep, h in summary["headline"].items():
        b = h.get("burst_split") if isinstance(h, dict) else None
        if not b:
            continue
        inn, out = b["streams_arriving_in_bursts"], b["streams_arriving_outside_bursts"]
        rows.append(
            f"| {dep} | {_ms(b['itl_outside_bursts_s'], 'p50')} / "
            f"{_ms(b['itl_outside_bursts_s'], 'p99')} | {_ms(b['itl_in_bursts_s'], 'p50')} / "
            f"{_ms(b['itl_in_bursts_s'], 'p99')} | {_ms(out['ttft_s'], 'p50')} / "
            f"{_ms(inn['ttft_s'], 'p50')} | {_ms(inn['server_queue_s'], 'p50')} | "
            f"{_ms(inn['server_prefill_s'], 'p50')} |")
    return "\n".join(rows)


def markdown(summary: dict[str, Any]) -> str:
    return runs_table(summary) + "\n\n" + burst_table(summary) + "\n"
