"""KV pool sizing on a GPU (defect 7): this process's part of the GPU -- total x
utilization x share -- less the weights (twice, while loading), activations and slack,
never more than is free. CPU sizing: tests/unit/test_pool_sizing.py. GPU memory and Ray's share are
replaced by fixed numbers, so the arithmetic is checked on CPU."""

from __future__ import annotations

import pytest
import torch

import engine.config as ec
from engine.config import (
    GPU_SLACK_BYTES,
    CacheConfig,
    ConfigError,
    SchedulerConfig,
    activation_bytes,
    default_num_blocks,
    gpu_pool_bytes,
)
from engine.presets import get_preset

GiB = 1 << 30
H200 = 143771 << 20  # what nvidia-smi reports for the H200 here
CUDA = torch.device("cuda")  # a device object needs no GPU


def test_the_share_bounds_the_pool_and_free_memory_bounds_it_too() -> None:
    need = 2 * 10 * GiB + GiB + GPU_SLACK_BYTES  # weights twice, activations, slack
    # Half of 90% of 100 GiB, less what the engine needs besides its pool.
    assert gpu_pool_bytes(100 * GiB, 100 * GiB, 0.5, 0.9, 10 * GiB, GiB) == 45 * GiB - need
    # The other worker already took its half: the share still bounds this one.
    assert gpu_pool_bytes(100 * GiB, 55 * GiB, 0.5, 0.9, 10 * GiB, GiB) == 45 * GiB - need
    # Something else holds most of the GPU: only what is free, less the 10% headroom.
    assert gpu_pool_bytes(100 * GiB, 40 * GiB, 0.5, 0.9, 10 * GiB, GiB) == 30 * GiB - need
    assert gpu_pool_bytes(100 * GiB, 100 * GiB, 1.0, 0.9, 10 * GiB, GiB) == 90 * GiB - need


def test_activations_cover_the_step_and_the_samplers_logits() -> None:
    mc = get_preset("llama-3-8b")
    per_token = 4 * 4096 + 4096 + 2 * 1024 + 2 * 14336
    expected = 2 * 512 * per_token * 2 + 4 * 64 * 128256 * 4
    assert activation_bytes(mc, SchedulerConfig(), 2) == expected == 236_191_744


def gpu(monkeypatch: pytest.MonkeyPatch, free: int, total: int, ray_share: float | None
        ) -> None:
    monkeypatch.setattr(ec, "_gpu_memory", lambda device: (free, total))
    monkeypatch.setattr(ec, "_ray_gpu_share", lambda: ray_share)


def test_an_8b_worker_at_half_a_gpu_gets_its_half_not_two_gib(
        monkeypatch: pytest.MonkeyPatch) -> None:
    mc, sched = get_preset("llama-3-8b"), SchedulerConfig()
    gpu(monkeypatch, H200 - (600 << 20), H200, ray_share=0.5)
    half = default_num_blocks(mc, CacheConfig(), sched, torch.bfloat16, CUDA)
    assert half == 16407  # 2 MiB blocks: 32.0 GiB, against 1024 blocks under the old cap
    gpu(monkeypatch, H200 - (600 << 20), H200, ray_share=None)  # outside Ray: the whole GPU
    whole = default_num_blocks(mc, CacheConfig(), sched, torch.bfloat16, CUDA)
    assert whole == 48455
    # Two workers of half a GPU stay within 90% of it, weights (twice) included.
    weights = mc.num_params() * 2
    per_worker = half * 2 * 2**20 + 2 * weights + activation_bytes(mc, sched, 2)
    assert 2 * per_worker <= 0.9 * H200


def test_an_explicit_share_or_size_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    mc, sched = get_preset("llama-3-8b"), SchedulerConfig()
    gpu(monkeypatch, H200, H200, ray_share=0.5)
    quarter = default_num_blocks(mc, CacheConfig(gpu_share=0.25), sched, torch.bfloat16, CUDA)
    assert quarter < default_num_blocks(mc, CacheConfig(), sched, torch.bfloat16, CUDA)
    assert default_num_blocks(mc, CacheConfig(memory_bytes=GiB), sched, torch.bfloat16,
                              CUDA) == 512
    assert default_num_blocks(mc, CacheConfig(num_blocks=7), sched, torch.bfloat16, CUDA) == 7


def test_a_small_model_is_capped_at_four_full_batches(
        monkeypatch: pytest.MonkeyPatch) -> None:
    gpu(monkeypatch, H200, H200, ray_share=None)
    # 8 KiB blocks would give 15 million of them; 64 seats x 64 blocks x 4 it is.
    assert default_num_blocks(get_preset("tiny-llama3"), CacheConfig(), SchedulerConfig(),
                              torch.float32, CUDA) == 4 * 64 * 64 + 1


def test_no_room_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu(monkeypatch, 20 * GiB, 24 * GiB, ray_share=None)
    with pytest.raises(ConfigError, match=r"no room for a KV pool on cuda: 20\.0 of 24\.0 GiB"):
        default_num_blocks(get_preset("llama-3-8b"), CacheConfig(), SchedulerConfig(),
                           torch.bfloat16, CUDA)


@pytest.mark.parametrize(("kw", "message"), [
    ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization must be in"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization must be in"),
    ({"gpu_share": 0.0}, "gpu_share must be in"),
    ({"gpu_share": 2.0}, "gpu_share must be in"),
])
def test_cache_config_checks_the_new_fields(kw: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CacheConfig(**kw)  # type: ignore[arg-type]
