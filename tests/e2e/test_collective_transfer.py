"""The collective KV transport (gloo on CPU) through the real runtime: Ray actors, a
small random-weight model (fast to load; the bytes and the code paths are the real
ones), greedy output equal to the offline engine's; a dead peer fails the next transfer
at once (not by its timeout) and the pair's group is rebuilt with the router's
replacement worker, with no request lost and no block leaked."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from dataclasses import replace

import pytest
import ray

from engine import LLM
from engine.sampling_params import SamplingParams
from messages import KVTransferError, KVTransferTimeout, PrefillTask
from tests.e2e.runtime_fixtures import RouterHarness, assert_clean, router_config

MODEL = "dummy:tiny-smollm2-like"
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
# Varied token-id prompts of 20..69 tokens (vocab 512; 0-2 are special).
PROMPTS = [[(i * 37 + k * 11) % 500 + 3 for k in range(20 + i * 7)] for i in range(8)]


@pytest.fixture(scope="module")
def coll() -> Iterator[RouterHarness]:
    # A transfer timeout far above what a dead peer may cost: failing by it would show.
    cfg = router_config(prefill_workers=1, decode_workers=2, kv_transfer="collective",
                        transfer_timeout_s=120)
    h = RouterHarness(replace(cfg, engine=replace(cfg.engine, model=MODEL)))
    yield h
    h.close()


@pytest.fixture(scope="module")
def expected() -> list[list[int]]:
    outs = [o.token_ids for o in LLM(model=MODEL).generate(PROMPTS, GREEDY)]
    assert len({tuple(t) for t in outs}) == len(PROMPTS)  # distinct: a mix-up would show
    return outs


def test_collective_serves_greedy_equal_llm(coll: RouterHarness,
                                            expected: list[list[int]]) -> None:
    outs = coll.generate_all(PROMPTS, GREEDY)
    assert [t for t, _ in outs] == expected
    assert all(f.usage.completion_tokens == 16 for _, f in outs)
    used = {h.worker_id for h in coll.router.workers() if h.stats and h.stats.steps}
    assert sum(1 for w in used if w.startswith("decode")) == 2  # two pairs, two groups
    assert_clean(coll)


def test_dead_decode_fails_the_next_send_at_once_then_its_replacement_pairs(
        coll: RouterHarness, expected: list[list[int]]) -> None:
    p = next(h for h in coll.router.workers() if h.role == "prefill")
    victim = next(h for h in coll.router.workers() if h.role == "decode" and h.alive)
    prompt = PROMPTS[-1]
    n = math.ceil(len(prompt) / coll.router.config.engine.cache.block_size)
    ray.kill(victim.actor, no_restart=True)

    async def send_to_dead() -> BaseException:
        task = PrefillTask("to-dead", prompt, GREEDY, victim.endpoint, list(range(n)))
        try:
            await p.actor.prefill.remote(task)
        except ray.exceptions.RayTaskError as e:
            return e.cause
        raise AssertionError("a send to a dead decode worker succeeded")

    err = coll.lt.run(send_to_dead())
    assert isinstance(err, KVTransferError) and not isinstance(err, KVTransferTimeout)
    assert "gone" in str(err)
    outs = coll.generate_all(PROMPTS, GREEDY)
    assert [t for t, _ in outs] == expected
    coll.lt.run(_until(lambda: sum(1 for h in coll.router.workers()
                                   if h.role == "decode" and h.alive) == 2))
    assert victim.worker_id not in {h.worker_id for h in coll.router.workers()}
    assert_clean(coll)


@pytest.mark.slow  # another replacement spawn; the dead-decode test covers the rebuild
def test_dead_prefill_is_replaced_and_the_decodes_pair_with_it(
        coll: RouterHarness, expected: list[list[int]]) -> None:
    old = next(h for h in coll.router.workers() if h.role == "prefill")
    ray.kill(old.actor, no_restart=True)
    outs = coll.generate_all(PROMPTS, GREEDY)
    assert [t for t, _ in outs] == expected
    new = [h for h in coll.router.workers() if h.role == "prefill" and h.alive]
    assert new and old.worker_id not in {h.worker_id for h in new}
    assert_clean(coll)


async def _until(cond, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.2)
