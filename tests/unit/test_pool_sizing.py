"""KV pools on CPU sized by a memory budget (engine.pool_sizing), not a 2 GiB constant:
this engine's share of the host's available memory less its weights, times
CPU_KV_FRACTION, at least one full-length sequence, at most four per seat. The host's
memory is replaced by fixed numbers (the seam engine.config._host_memory), so the
arithmetic is exact whatever machine runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import engine.config as ec
import engine.pool_sizing as ps
from engine.config import CacheConfig, ConfigError, SchedulerConfig, cdiv, default_num_blocks
from engine.pool_sizing import CPU_KV_FRACTION, PoolSize, cpu_pool_bytes, host_available_bytes
from engine.presets import get_preset

GiB = 1 << 30
SMOL = get_preset("smollm2-135m")
SMOL_BLOCK = 30 * 2 * 16 * 3 * 64 * 4  # layers x K/V x tokens x kv heads x head_dim x fp32


def host(monkeypatch: pytest.MonkeyPatch, available: int) -> None:
    monkeypatch.setattr(ec, "_host_memory", lambda: available)


def test_the_budget_is_a_fraction_of_the_share_less_the_weights_twice() -> None:
    assert cpu_pool_bytes(10 * GiB, 0.5, GiB) == int(CPU_KV_FRACTION * (5 * GiB - 2 * GiB))
    assert cpu_pool_bytes(10 * GiB, 1.0, GiB, fraction=0.5) == 4 * GiB
    assert cpu_pool_bytes(GiB, 1.0, GiB) < 0  # the weights alone take it all


def test_cpu_pool_follows_the_host_and_the_share(monkeypatch: pytest.MonkeyPatch) -> None:
    sched = SchedulerConfig()
    weights = SMOL.num_params() * 4
    host(monkeypatch, 6 * GiB)  # an 8 GB laptop's MemAvailable, roughly
    whole = default_num_blocks(SMOL, CacheConfig(), sched, torch.float32)
    assert whole == int(CPU_KV_FRACTION * (6 * GiB - 2 * weights)) // SMOL_BLOCK
    # `make run`: two workers on the node, each planning on half.
    half = default_num_blocks(SMOL, CacheConfig(host_share=0.5), sched, torch.float32)
    assert half == int(CPU_KV_FRACTION * (3 * GiB - 2 * weights)) // SMOL_BLOCK
    assert half * SMOL_BLOCK < 0.8 * GiB  # what keeps the laptop out of swap
    # Same for an explicit device, and memory_bytes / num_blocks still win.
    assert default_num_blocks(SMOL, CacheConfig(host_share=0.5), sched, torch.float32,
                              torch.device("cpu")) == half
    assert default_num_blocks(SMOL, CacheConfig(memory_bytes=GiB), sched,
                              torch.float32) == GiB // SMOL_BLOCK
    assert default_num_blocks(SMOL, CacheConfig(num_blocks=9), sched, torch.float32) == 9


def test_no_2_gib_cap_on_a_big_host(monkeypatch: pytest.MonkeyPatch) -> None:
    host(monkeypatch, 512 * GiB)
    mc = get_preset("llama-3-8b")
    blocks = default_num_blocks(mc, CacheConfig(), SchedulerConfig(), torch.bfloat16)
    per_block = 32 * 2 * 16 * 8 * 128 * 2
    assert blocks * per_block > 100 * GiB  # the old default stopped at 2 GiB (1024 blocks)
    assert blocks == int(CPU_KV_FRACTION * (512 * GiB - 2 * mc.num_params() * 2)) // per_block


def test_bounds_one_sequence_below_four_per_seat_above(monkeypatch: pytest.MonkeyPatch) -> None:
    sched = SchedulerConfig(max_num_seqs=2, max_model_len=1024)
    host(monkeypatch, 0)  # nothing available: still one full-length sequence
    assert default_num_blocks(SMOL, CacheConfig(), sched, torch.float32) == cdiv(1024, 16) + 1
    # ... up to 4096 tokens: a 32k-token floor would be 8 GiB for an 8B model in fp32.
    assert default_num_blocks(get_preset("llama-3-8b"), CacheConfig(), SchedulerConfig(),
                              torch.float32) == 4096 // 16 + 1
    host(monkeypatch, 1 << 50)  # a petabyte: four full-length sequences per seat
    assert default_num_blocks(SMOL, CacheConfig(), sched, torch.float32) \
        == 4 * 2 * cdiv(1024, 16) + 1


def test_host_share_is_validated() -> None:
    with pytest.raises(ConfigError, match="host_share"):
        CacheConfig(host_share=0.0)
    with pytest.raises(ConfigError, match="spill_memory_bytes"):
        CacheConfig(spill_memory_bytes=-1)


def test_a_cgroup_limit_bounds_what_is_available(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text(f"{3 * GiB}\n")
    (tmp_path / "memory.current").write_text(f"{GiB}\n")
    monkeypatch.setattr(ps, "_CGROUP_V2", str(tmp_path))
    monkeypatch.setattr(ps, "_meminfo_available", lambda: 100 * GiB)
    assert host_available_bytes() == 2 * GiB
    (tmp_path / "memory.max").write_text("max\n")  # a cgroup without a limit
    assert host_available_bytes() == 100 * GiB


def test_the_real_host_has_memory() -> None:
    assert host_available_bytes() > 0


def test_pool_size_describes_blocks_tokens_and_bytes() -> None:
    size = PoolSize(num_blocks=1025, bytes_per_block=SMOL_BLOCK, block_size=16,
                    source="cpu budget")
    assert (size.usable_blocks, size.tokens, size.bytes) == (1024, 16384, 1025 * SMOL_BLOCK)
    assert size.describe().startswith("1024 blocks x 16 tokens = 16384 tokens, 0.70 GiB")


def test_serve_flags_set_the_budgets_and_workers_share_the_host() -> None:
    from router.cli import parser
    from router.settings import settings_from_args

    r = settings_from_args(parser().parse_args(
        ["serve", "--kv-cache-memory", "1.5", "--kv-spill-memory", "0.25",
         "--gpu-memory-utilization", "0.8", "--prefill-workers", "2"])).router
    c = r.engine.cache
    assert (c.memory_bytes, c.spill_memory_bytes, c.gpu_memory_utilization) == (
        3 * GiB // 2, GiB // 4, 0.8)
    prefill, decode = r.worker_engine("prefill").cache, r.worker_engine("decode").cache
    assert prefill.host_share == decode.host_share == 1 / 3  # 2 prefill + 1 decode, one node
    assert prefill.spill_memory_bytes == GiB // 4
    assert decode.spill_memory_bytes == 0  # decode workers never look a prefix up
    gpu = settings_from_args(parser().parse_args(
        ["serve", "--gpus-per-worker", "0.5"])).router
    assert gpu.worker_engine("decode").cache.host_share is None  # GPUs: gpu_share instead
    with pytest.raises(ConfigError, match="--kv-spill-memory"):
        settings_from_args(parser().parse_args(["serve", "--kv-spill-memory", "-1"]))
