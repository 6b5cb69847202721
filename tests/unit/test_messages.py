"""The values that cross process boundaries: what they carry and how they read."""

from __future__ import annotations

import pickle

import pytest
import torch

from engine.kv_layout import KVLayout
from engine.stats import EngineStats
from kvtransfer import spec_of, torch_dtype
from messages import KVSpec, PoolState, WorkerStats

ENGINE = EngineStats(num_running=3, num_waiting=2, num_free_blocks=40, num_usable_blocks=63,
                     kv_usage=0.25, prefix_queries=10, prefix_hits=4, num_preemptions=1)
COUNTS = {"blocks_running": 20, "blocks_reserved": 2, "blocks_transfer": 1, "blocks_cached": 7,
          "blocks_free": 33, "usable": 63, "free": 40, "used": 23}  # pool_state()'s keys


def test_worker_stats_reads_the_engine_counters_through() -> None:
    s = WorkerStats("decode-1", "decode", ENGINE, steps=5, busy_seconds=1.5)
    got = (s.num_running, s.num_waiting, s.num_free_blocks, s.num_usable_blocks, s.kv_usage,
           s.prefix_queries, s.prefix_hits, s.num_preemptions)
    assert got == (3, 2, 40, 63, 0.25, 10, 4, 1)
    assert s.pool is None


def test_worker_stats_survives_pickling_with_its_pool() -> None:
    s = WorkerStats("p-0", "prefill", ENGINE, 7, 0.5, PoolState.from_counts(COUNTS))
    back = pickle.loads(pickle.dumps(s))
    assert back == s
    assert back.pool == PoolState(running=20, reserved=2, transfer=1, cached=7, free=33,
                                  usable=63)


def test_pool_state_names_a_missing_count() -> None:
    with pytest.raises(KeyError, match="blocks_transfer"):
        PoolState.from_counts({k: v for k, v in COUNTS.items() if k != "blocks_transfer"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kv_spec_sizes_blocks_like_the_layout(dtype: torch.dtype) -> None:
    layout = KVLayout(num_blocks=4, num_layers=3, block_size=16, num_kv_heads=2, head_dim=8,
                      dtype=dtype)
    spec = spec_of(layout)
    assert spec == KVSpec((3, 2, 16, 2, 8), str(dtype).removeprefix("torch."), dtype.itemsize)
    assert spec.block_nbytes() == layout.bytes_per_block
    assert torch_dtype(spec) is dtype
