"""Quantized KV: the row format's round trip, the layout and its size, the config, and
the spec checks that keep an int8 end and an fp32 end of a transfer apart."""

from __future__ import annotations

import pytest
import torch

from engine.config import CacheConfig, ConfigError, EngineConfig, ModelConfig
from engine.kv_layout import KVLayout
from engine.kv_quant import kv_block_bytes, resolve_kv_dtype
from kernels.kv_quant import SCALE_BYTES, dequantize, quantize, scales, values
from kvtransfer import (
    Endpoint,
    KVTransferError,
    check_handle,
    check_spec,
    sent_handle,
    spec_of,
    spec_of_blocks,
)

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_round_trip_error_is_within_half_a_step(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, 64, generator=gen) * torch.logspace(-3, 2, 50)[:, None, None]
    q = quantize(x, dtype)
    assert q.dtype is dtype and q.shape == (50, 4, 64 + SCALE_BYTES)
    s = scales(q)  # (50, 4, 1) fp32, the row's absmax / qmax
    qmax = 127.0 if dtype is torch.int8 else 448.0
    torch.testing.assert_close(s, x.abs().amax(-1, keepdim=True) / qmax)
    err = (dequantize(q) - x).abs()
    if dtype is torch.int8:
        assert bool((err <= s / 2 * (1 + 1e-5)).all())  # round to nearest step
        assert values(q).abs().max() == 127  # each row's absmax maps to +-127
    else:
        assert bool((err <= x.abs() / 16 + s).all())  # e4m3: 3 mantissa bits


def test_zero_rows_and_bf16_input() -> None:
    x = torch.zeros(3, 64, dtype=torch.bfloat16)
    x[1] = torch.linspace(-1, 1, 64)
    q = quantize(x, torch.int8)
    assert scales(q)[0].item() == 0.0 and not values(q)[0].any()
    assert torch.equal(dequantize(q)[0], torch.zeros(64))
    torch.testing.assert_close(dequantize(q, torch.bfloat16)[1], x[1], rtol=0, atol=1 / 127)


def test_layout_int8_rows_carry_scales_and_take_about_a_quarter() -> None:
    fp32 = KVLayout(10, 30, 16, 3, 64, torch.float32)
    int8 = KVLayout(10, 30, 16, 3, 64, torch.float32, torch.int8)
    assert fp32.shape[-1] == 64 and int8.shape[-1] == 64 + SCALE_BYTES
    assert int8.quantized and not fp32.quantized
    assert int8.bytes_per_block == 30 * 2 * 16 * 3 * 68
    assert int8.bytes_per_block / fp32.bytes_per_block == pytest.approx(68 / 256)
    cache = int8.allocate(CPU)
    assert cache.dtype is torch.int8 and cache.shape == int8.shape
    assert cache.numel() * cache.element_size() == 10 * int8.bytes_per_block


def test_config_and_resolution() -> None:
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        CacheConfig(kv_cache_dtype="int4")
    assert resolve_kv_dtype("auto", torch.float32, CPU) is None
    assert resolve_kv_dtype("int8", torch.float32, CPU) is torch.int8
    with pytest.raises(ConfigError, match="fp8 needs a CUDA GPU"):
        resolve_kv_dtype("fp8", torch.float32, CPU)
    EngineConfig(cache=CacheConfig(kv_cache_dtype="int8"))  # accepted


def test_pool_sizing_counts_quantized_blocks() -> None:
    from engine.config import SchedulerConfig, default_num_blocks

    mc = ModelConfig(architecture="llama", vocab_size=100, hidden_size=576,
                     intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, max_position_embeddings=2048)
    budget = 64 << 20
    per = {dt: kv_block_bytes(mc, CacheConfig(kv_cache_dtype=dt), torch.float32, CPU)
           for dt in ("auto", "int8")}
    assert per["int8"] / per["auto"] == pytest.approx(68 / 256)
    n = {dt: default_num_blocks(mc, CacheConfig(memory_bytes=budget, kv_cache_dtype=dt),
                                SchedulerConfig(), torch.float32, CPU) for dt in per}
    assert n["auto"] == budget // per["auto"] and n["int8"] == budget // per["int8"]
    assert n["int8"] > 3.7 * n["auto"]


def test_specs_refuse_a_dtype_mismatch_on_both_ends() -> None:
    fp32 = KVLayout(8, 2, 16, 2, 64, torch.float32)
    int8 = KVLayout(8, 2, 16, 2, 64, torch.float32, torch.int8)
    s32, s8 = spec_of(fp32), spec_of(int8)
    assert s8.dtype == "int8" and s8.scales == "fp32-per-token-head" and s32.scales == ""
    assert s8.block_nbytes() == int8.bytes_per_block
    cache8 = int8.allocate(CPU)
    assert spec_of_blocks(cache8) == s8 and spec_of_blocks(fp32.allocate(CPU)) == s32
    # sender side: an int8 prefill worker refuses an fp32 decode worker before sending
    with pytest.raises(KVTransferError, match="same --kv-cache-dtype"):
        check_spec("r1", cache8, Endpoint("ray", "decode-0", s32))
    check_spec("r1", cache8, Endpoint("ray", "decode-0", s8))
    # receiver side: the handle carries the sender's blocks' spec, not the endpoint's
    staging = cache8[:3].clone()
    handle = sent_handle("r1", "ray", Endpoint("ray", "decode-0", s32), staging, 0.0)
    assert handle.spec == s8 and handle.nbytes == 3 * int8.bytes_per_block
    with pytest.raises(KVTransferError, match="int8 KV"):
        check_handle(handle, s32, [1, 2, 3])
    check_handle(handle, s8, [1, 2, 3])


def test_serve_flag_reaches_every_role() -> None:
    from router.cli import parser
    from router.settings import settings_from_args

    r = settings_from_args(parser().parse_args(["serve", "--kv-cache-dtype", "int8"])).router
    assert {r.worker_engine(role).cache.kv_cache_dtype
            for role in ("prefill", "decode", "colocated")} == {"int8"}
    default = settings_from_args(parser().parse_args(["serve"])).router
    assert default.engine.cache.kv_cache_dtype == "auto"
    with pytest.raises(SystemExit):  # argparse refuses a dtype it does not offer
        parser().parse_args(["serve", "--kv-cache-dtype", "int4"])
