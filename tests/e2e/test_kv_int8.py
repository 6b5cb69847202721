"""int8 KV end to end: prefill worker -> ray transfer of int8 blocks and their scales ->
decode worker, as `pdserve serve --kv-cache-dtype int8` deploys it.

Both ends quantize with the same arithmetic, so greedy output must equal the offline
engine run with the same int8 cache token for token. A transfer that lost the scales
would decode from zeroed or garbage KV and diverge at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import pytest
import torch

from engine import LLM
from engine.config import CacheConfig
from engine.kv_layout import KVLayout
from kernels import scatter_blocks
from kernels.kv_quant import dequantize, quantize, scales
from kvtransfer import KVTransferError, check_handle, make_receiver, make_sender, spec_of
from tests.e2e.runtime_fixtures import (
    GREEDY,
    RouterHarness,
    assert_clean,
    ensure_ray,
    router_config,
)

N_PROMPTS = 6


@pytest.fixture(scope="module")
def harness() -> Iterator[RouterHarness]:
    cfg = router_config(prefill_workers=1, decode_workers=1, transfer_timeout_s=10)
    cache = CacheConfig(memory_bytes=32 << 20, kv_cache_dtype="int8")
    h = RouterHarness(dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine,
                                                                            cache=cache)))
    yield h
    h.close()


@pytest.mark.slow  # ~95 s on the shared 2-core VM: three model loads and 6 x 16 tokens
def test_int8_disaggregated_equals_offline_int8(harness: RouterHarness) -> None:
    llm = LLM(model="smollm2-135m", kv_cache_dtype="int8", kv_cache_memory_bytes=32 << 20)
    prompts = harness.prompts(N_PROMPTS)
    want = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    decode = next(h for h in harness.router.workers() if h.role == "decode")
    assert decode.endpoint is not None
    spec = decode.endpoint.spec
    assert spec.dtype == "int8" and spec.scales == "fp32-per-token-head"
    assert spec.block_shape[-1] == 64 + 4  # head_dim values, then the fp32 scale
    outs = harness.generate_all(prompts, GREEDY)
    assert [t for t, _ in outs] == want
    assert all(f.usage.completion_tokens == 16 for _, f in outs)
    assert_clean(harness)


def test_ray_ships_int8_blocks_with_their_scales_and_refuses_an_fp32_end() -> None:
    ensure_ray()
    i8 = KVLayout(10, 3, 4, 2, 16, torch.float32, torch.int8)
    src = quantize(torch.randn(10, 3, 2, 4, 2, 16), torch.int8)  # rows + scales
    dst = i8.allocate("cpu")
    rx = make_receiver("ray")
    ep = rx.endpoint(dst, "decode-x", spec_of(i8))
    handle = make_sender("ray").send(src, [7, 2, 5], ep, [1, 8, 3], "r1")
    assert handle.nbytes == 3 * i8.bytes_per_block == 3 * 3 * 2 * 4 * 2 * (16 + 4)
    check_handle(handle, spec_of(i8), [1, 8, 3])
    scatter_blocks(dst, torch.tensor([1, 8, 3]), asyncio.run(rx.fetch(handle, timeout_s=10)))
    assert torch.equal(dst[[1, 8, 3]], src[[7, 2, 5]])  # values and scales, byte for byte
    assert torch.equal(dequantize(dst[[1, 8, 3]]), dequantize(src[[7, 2, 5]]))
    assert bool((scales(dst[[1, 8, 3]]) > 0).all())
    fp32 = KVLayout(10, 3, 4, 2, 16, torch.float32)
    fp32_ep = rx.endpoint(fp32.allocate("cpu"), "decode-y", spec_of(fp32))
    with pytest.raises(KVTransferError, match=r"int8 KV .* float32 KV"):
        make_sender("ray").send(src, [7], fp32_ep, [1], "r2")
