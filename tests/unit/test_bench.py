"""The serving benchmark's arithmetic: workloads, percentiles, SLOs, goodput, plots."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import workloads
from bench.analysis import split_by_bursts
from bench.loadgen import RequestRecord
from bench.report import Slo, goodput, percentile, summarize

VOCAB = 49152


def test_workloads_are_seeded_and_bounded() -> None:
    a = workloads.build("chat", 2.0, 30.0, 1000, VOCAB, seed=3)
    assert a == workloads.build("chat", 2.0, 30.0, 1000, VOCAB, seed=3)
    assert a != workloads.build("chat", 2.0, 30.0, 1000, VOCAB, seed=4)
    assert all(0 < s.arrival_s < 30.0 and 16 <= s.max_tokens <= 128 for s in a)
    assert len(workloads.build("chat", 100.0, 30.0, 7, VOCAB)) == 7
    long = workloads.build("long-prompt", 1.0, 20.0, 50, VOCAB)
    assert all(1024 <= len(s.prompt_ids or ()) <= 4096 for s in long)
    assert all(workloads.FIRST_PLAIN_ID <= t < VOCAB for s in long for t in s.prompt_ids or ())


def test_interference_baseline_has_the_same_streams() -> None:
    with_b = workloads.build("interference", 1.0, 50.0, 400, VOCAB)
    without = workloads.build("interference-nobursts", 1.0, 50.0, 400, VOCAB)
    streams = [(s.arrival_s, s.prompt_ids) for s in with_b if s.kind == "stream"]
    assert streams == [(s.arrival_s, s.prompt_ids) for s in without]
    assert workloads.burst_times(with_b) == [12.5, 37.5]
    assert sum(s.kind == "burst" for s in with_b) == 2 * workloads.BURST_SIZE
    assert [s.index for s in with_b] == list(range(len(with_b)))
    salted = workloads.build("interference", 1.0, 50.0, 400, VOCAB, salt=1)
    assert [s.arrival_s for s in salted] == [s.arrival_s for s in with_b]
    assert [len(s.prompt_ids or ()) for s in salted] == [len(s.prompt_ids or ()) for s in with_b]
    assert salted[0].prompt_ids != with_b[0].prompt_ids  # no prefix-cache hits across runs


def test_shared_prefix_shares_exactly_the_prefix() -> None:
    a, b = workloads.build("shared-prefix", 1.0, 1e9, 2, VOCAB)
    n = workloads.SHARED_PREFIX_TOKENS
    assert a.prompt_ids[:n] == b.prompt_ids[:n]  # type: ignore[index]
    assert a.prompt_ids[n:] != b.prompt_ids[n:]  # type: ignore[index]


def test_percentile_matches_numpy_linear() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile([], 50) is None


def rec(kind: str, sent: float, first: float, times: list[float], code: str = "OK",
        prompt: int = 10) -> RequestRecord:
    return RequestRecord(0, kind, sent, sent_s=sent, first_token_s=first, done_s=times[-1],
                         token_times_s=times, prompt_tokens=prompt,
                         completion_tokens=len(times), code=code)


def test_slo_needs_both_ttft_and_tpot() -> None:
    slo = Slo(ttft_s=1.0, tpot_s=0.1, ttft_per_token_s=0.01)
    assert slo.met(rec("s", 0.0, 0.5, [0.5, 0.55, 0.6]))
    assert not slo.met(rec("s", 0.0, 1.5, [1.5, 1.6]))  # TTFT
    assert slo.met(rec("s", 0.0, 1.5, [1.5, 1.55], prompt=100))  # allowed 1 + 1 s
    assert not slo.met(rec("s", 0.0, 0.5, [0.5, 0.9]))  # TPOT 0.4
    assert not slo.met(rec("s", 0.0, 0.5, [0.5], code="UNAVAILABLE"))


def test_summary_counts_errors_as_misses() -> None:
    rs = [rec("s", 0.0, 0.2, [0.2, 0.3, 0.4]), rec("s", 1.0, 1.2, [1.2], code="INTERNAL")]
    s = summarize(rs, 2.0, {"s": Slo(1.0, 0.2)})
    assert s["codes"] == {"OK": 1, "INTERNAL": 1}
    assert s["slo_attainment"] == 0.5
    assert s["tpot_s"]["p50"] == pytest.approx(0.1)  # type: ignore[index]
    assert s["itl_s"]["n"] == 2  # type: ignore[index]


def test_goodput_interpolates_the_crossing() -> None:
    assert goodput([(1.0, 1.0), (2.0, 0.95), (3.0, 0.85)]) == pytest.approx(2.5)
    assert goodput([(1.0, 0.95), (2.0, 0.92)]) == 2.0
    assert goodput([(1.0, 0.5), (2.0, 0.95)]) == 0.0  # the lowest rate already misses


def test_burst_split_puts_gaps_in_their_window() -> None:
    burst = rec("burst", 1.0, 3.0, [3.0])
    stream = rec("stream", 0.0, 0.1, [0.1, 0.2, 2.0, 4.0])
    split = split_by_bursts([burst, stream])
    assert split["itl_in_bursts_s"]["n"] == 1  # the 1.8 s gap ending at 2.0
    assert split["itl_outside_bursts_s"]["n"] == 2


def test_plots_write_small_pngs(tmp_path: Path) -> None:
    from bench.plots import draw_all

    run = {"deployment": "disaggregated", "workload": "interference", "rate": 1.0,
           "burst_times_s": [1.0],
           "records": [{"kind": "stream", "code": "OK", "sent_s": 0.0, "first_token_s": 0.1,
                        "token_times_s": [0.1, 0.2, 0.35]},
                       {"kind": "burst", "code": "OK", "sent_s": 0.15, "first_token_s": 0.3,
                        "token_times_s": [0.3]}]}
    summary = {"config": {"ref_rate": 1.0}, "attainment_target": 0.9,
               "headline": {"disaggregated": {"attainment_vs_rate": [(1.0, 1.0)],
                                              "stream_attainment_vs_rate": [(1.0, 1.0)],
                                              "goodput_rps": 1.0}}}
    for p in draw_all(summary, {"runs": [run]}, tmp_path):
        assert p.exists() and 0 < p.stat().st_size < 200_000
