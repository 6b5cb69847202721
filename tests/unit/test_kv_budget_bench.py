"""bench/kv_budget_serving.py's arithmetic: the workload, the decode-batch statistics,
medians over runs, the int8 / fp32 ratios and the table (no server)."""

from __future__ import annotations

from typing import Any

from bench.kv_budget_serving import (
    BudgetConfig,
    BudgetDeployment,
    batch_stats,
    medians,
    ratios,
    table,
    workload,
)
from bench.workloads import FIRST_PLAIN_ID

VOCAB = 49152


def test_the_workload_is_the_same_per_seed_and_new_per_run() -> None:
    cfg = BudgetConfig(requests=12, rate=2.0, prompt_tokens=64, output_tokens=128)
    a = workload(cfg, VOCAB, seed=1)
    assert a == workload(cfg, VOCAB, seed=1)  # both dtypes get exactly this
    assert len(a) == 12 and [s.index for s in a] == list(range(12))
    assert all(s.max_tokens == 128 and len(s.prompt_ids or ()) == 64 for s in a)
    assert all(FIRST_PLAIN_ID <= t < VOCAB for s in a for t in s.prompt_ids or ())
    assert all(s.kind == "stream" for s in a)  # judged by the suite's stream SLO
    b = workload(cfg, VOCAB, seed=2)
    assert not {s.prompt_ids for s in a} & {s.prompt_ids for s in b}


def test_the_deployments_differ_only_in_the_kv_dtype() -> None:
    fp32 = BudgetDeployment("a", kv_cache_memory_gib=0.08, kv_cache_dtype="auto").args()
    int8 = BudgetDeployment("a", kv_cache_memory_gib=0.08, kv_cache_dtype="int8").args()
    assert fp32[-4:] == ["--kv-cache-memory", "0.08", "--kv-cache-dtype", "auto"]
    assert fp32[:-1] == int8[:-1] and int8[-1] == "int8"
    assert fp32[4:6] == ["--prefill-workers", "1"] and fp32[6:8] == ["--decode-workers", "1"]


def test_batch_stats_peak_mean_and_mean_while_decoding() -> None:
    assert batch_stats([0, 2, 4, 6, 0]) == {"peak": 6.0, "mean": 2.4, "mean_busy": 4.0,
                                            "samples": 5.0}
    assert batch_stats([]) == {"peak": 0.0, "mean": 0.0, "mean_busy": 0.0, "samples": 0.0}


def _run(peak: float, goodput: float, tpot_p50: float | None) -> dict[str, Any]:
    return {"batch": {"peak": peak, "mean": peak / 2, "mean_busy": peak / 2 + 1},
            "preemptions": 3, "goodput_rps": goodput, "slo_attainment": 0.5,
            "goodput_relaxed_rps": 2 * goodput, "slo_attainment_relaxed": 1.0,
            "throughput": {"requests_per_s": 0.4, "output_tokens_per_s": 50.0},
            "ttft_s": {"p50": 1.0, "p99": 3.0}, "tpot_s": {"p50": tpot_p50, "p99": None}}


def test_medians_over_runs_skip_missing_values() -> None:
    m = medians([_run(10, 0.1, 0.2), _run(12, 0.3, None), _run(8, 0.2, 0.4)])
    assert m["batch_peak"] == 10 and m["batch_mean"] == 5 and m["batch_mean_busy"] == 6
    assert m["goodput_rps"] == 0.2 and m["goodput_relaxed_rps"] == 0.4
    assert m["preemptions"] == 3
    assert m["tpot_p50_s"] is not None and abs(m["tpot_p50_s"] - 0.3) < 1e-12
    assert m["tpot_p99_s"] is None


def test_ratios_and_the_table() -> None:
    fp32 = medians([_run(10, 0.2, 0.2)])
    int8 = medians([_run(30, 0.1, 0.3)])
    r = ratios(int8, fp32)
    assert r["batch_peak"] == 3.0 and r["goodput_rps"] == 0.5 and r["tpot_p99_s"] is None
    pools = {d: {"blocks": b, "sequences_fit": b // 12} for d, b in (("fp32", 116),
                                                                        ("int8", 438))}
    text = table({"pools": pools, "medians": {"fp32": fp32, "int8": int8},
                  "int8_over_fp32": r})
    assert "| decode pool: blocks (sequences of the workload) | 116 (9) | 438 (36) | 3.78 |" \
        in text
    assert "| decode batch: peak | 10 | 30 | 3.00 |" in text
    assert "| TPOT p50 / p99, s | 0.200 / n/a | 0.300 / n/a | 1.50 / n/a |" in text
