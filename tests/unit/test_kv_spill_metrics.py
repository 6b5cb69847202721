"""A worker's pool shape and spill-tier counters, as GetServerInfo (router.wire) and the
Prometheus collector (router.metrics) report them from the stats the worker sends."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from engine.stats import EngineStats
from messages.stats import WorkerStats
from router.metrics import WorkerCollector
from router.wire import worker_info

ENGINE = EngineStats(num_running=1, num_waiting=0, num_free_blocks=10, num_usable_blocks=64,
                     kv_usage=0.5, prefix_queries=9, prefix_hits=4, num_preemptions=0,
                     kv_block_bytes=737280, block_size=16, spill_blocks=12,
                     spill_capacity_bytes=1 << 28, spill_hits=5, spilled_bytes=3000,
                     restored_bytes=1000)


def handle(engine: EngineStats) -> Any:
    stats = WorkerStats(worker_id="prefill-0", role="prefill", engine=engine, steps=3)
    return SimpleNamespace(worker_id="prefill-0", role="prefill", alive=True, draining=False,
                           node=None, stats=stats, kv_spec=None,
                           seconds_since_heard=lambda: 0.5)


def test_server_info_reports_the_pool_shape_and_the_spill_tier() -> None:
    info = worker_info(handle(ENGINE))
    assert (info.num_kv_blocks, info.kv_block_bytes, info.kv_block_tokens) == (64, 737280, 16)
    assert (info.prefix_cache_hits_blocks, info.kv_spill_hits_blocks) == (4, 5)
    assert (info.num_spilled_kv_blocks, info.kv_spill_capacity_bytes) == (12, 1 << 28)
    assert (info.kv_spilled_bytes, info.kv_restored_bytes) == (3000, 1000)


def scrape(engine: EngineStats) -> dict[str, float]:
    """The per-worker families (they come first; the deployment-wide ones after them
    need a whole router)."""
    router = SimpleNamespace(workers=lambda: [handle(engine)])
    out = {}
    for family in WorkerCollector(router).collect():  # type: ignore[arg-type]
        for sample in family.samples:
            out[sample.name] = sample.value
        if family.name == "pdserve_kv_spill_blocks":
            return out
    raise AssertionError("no pdserve_kv_spill_blocks family")


def test_metrics_count_hits_per_tier_and_bytes_both_ways() -> None:
    m = scrape(ENGINE)
    assert m["pdserve_prefix_cache_hits_total"] == 4  # the pool
    assert m["pdserve_kv_spill_hits_total"] == 5  # the spill tier
    assert m["pdserve_kv_spilled_bytes_total"] == 3000
    assert m["pdserve_kv_restored_bytes_total"] == 1000
    assert m["pdserve_kv_spill_blocks"] == 12
    assert m["pdserve_kv_pool_bytes"] == 64 * 737280


def test_a_worker_without_a_tier_exports_no_spill_series() -> None:
    off = EngineStats(1, 0, 10, 64, 0.5, 9, 4, 0, kv_block_bytes=737280, block_size=16)
    m = scrape(off)
    assert "pdserve_kv_spill_hits_total" not in m and "pdserve_kv_pool_bytes" in m
