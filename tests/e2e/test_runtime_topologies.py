"""Deployment shapes other than the shared 1P+2D one, each on its own small cluster.

Same contract as test_runtime_disagg: greedy tokens equal engine.LLM's, pools end empty.
"""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from router.errors import RequestFailedError
from tests.e2e.runtime_fixtures import (
    CHATS,
    GREEDY,
    RouterHarness,
    assert_clean,
    router_config,
)


def test_1p1d_tight_pool_migrates_and_matches(llm: LLM) -> None:
    """41 blocks on the decode worker for 16 requests that need ~110: queueing,
    preemption, migration (re-prefill of prompt + tokens so far) — and still the same
    tokens. 64 tokens each: requests decode long enough to pile up while the prefill
    worker feeds more (with 16 they could finish as fast as they arrived, one import at
    a time, and never run the pool dry)."""
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    want = [o.token_ids for o in llm.generate(
        [llm.encode_chat([{"role": "user", "content": c}]) for c in CHATS], params)]
    h = RouterHarness(router_config(prefill_workers=1, decode_workers=1, num_blocks=42,
                                    decode_watermark=0.0))
    migrations: list[int] = []
    h.router.on_finish.append(lambda rr, _reason: migrations.append(rr.events.migrations))
    try:
        outs = h.generate_all(h.prompts(), params)
        assert [t for t, _ in outs] == want
        assert sum(migrations) > 0
        assert_clean(h)
    finally:
        h.close()


def test_2p1d_equal_llm(expected: list[list[int]]) -> None:
    h = RouterHarness(router_config(prefill_workers=2, decode_workers=1))
    try:
        outs = h.generate_all(h.prompts(), GREEDY)
        assert [t for t, _ in outs] == expected
        prefills = [w for w in h.router.workers() if w.role == "prefill"]
        assert len(prefills) == 2
        assert_clean(h)
    finally:
        h.close()


def test_colocated_equal_llm(expected: list[list[int]]) -> None:
    h = RouterHarness(router_config(mode="colocated", workers=2))
    try:
        outs = h.generate_all(h.prompts(), GREEDY)
        assert [t for t, _ in outs] == expected
        assert_clean(h)
    finally:
        h.close()


def test_transfer_timeout_through_router_is_a_clear_error() -> None:
    h = RouterHarness(router_config(prefill_workers=1, decode_workers=1,
                                    transfer_timeout_s=1e-9))
    try:
        prompt = h.prompts(1)[0]
        # A transfer that fails is retried elsewhere; one that always fails ends the
        # request once its attempts run out, saying why.
        with pytest.raises(RequestFailedError, match=r"could not be placed.*did not arrive"):
            h.generate_all([prompt], GREEDY)
        assert_clean(h)
    finally:
        h.close()
