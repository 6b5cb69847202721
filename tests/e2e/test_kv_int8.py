"""int8 KV end to end: prefill worker -> ray transfer of int8 blocks and their scales ->
decode worker, as `pdserve serve --kv-cache-dtype int8` deploys it.

Both ends quantize with the same arithmetic, so greedy output must equal the offline
engine run with the same int8 cache token for token. A transfer that lost the scales
would decode from zeroed or garbage KV and diverge at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from engine import LLM
from engine.config import CacheConfig
from tests.e2e.runtime_fixtures import GREEDY, RouterHarness, assert_clean, router_config

N_PROMPTS = 6


@pytest.fixture(scope="module")
def harness() -> Iterator[RouterHarness]:
    cfg = router_config(prefill_workers=1, decode_workers=1, transfer_timeout_s=10)
    cache = CacheConfig(memory_bytes=32 << 20, kv_cache_dtype="int8")
    h = RouterHarness(dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine,
                                                                            cache=cache)))
    yield h
    h.close()


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
