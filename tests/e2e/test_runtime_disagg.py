"""The disaggregated runtime end to end: real Ray actors, the real SmolLM2 model.

Greedy outputs through every topology must equal engine.LLM's token for token, and no
failure (cancellation, a killed decode worker, preemption, a failed transfer) may lose
a token or leak a KV block (checked in the workers' pools, not in counters).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import ray

from engine import LLM
from engine.sampling_params import SamplingParams
from messages import KVTransferError, KVTransferTimeout, PrefillTask, TransferHandle
from router.request_state import Delta
from tests.e2e.runtime_fixtures import GREEDY, RouterHarness, assert_clean, router_config


@pytest.fixture(scope="module")
def shared() -> Iterator[RouterHarness]:
    # 128-token prefill steps: long prompts take many steps (see the shortest-first test).
    h = RouterHarness(router_config(prefill_workers=1, decode_workers=2, transfer_timeout_s=5,
                                    prefill_step_tokens=128))
    yield h
    h.close()


def test_1p2d_16_concurrent_equal_llm(shared: RouterHarness, expected: list[list[int]]) -> None:
    outs = shared.generate_all(shared.prompts(), GREEDY)
    assert [t for t, _ in outs] == expected
    assert all(f.finish_reason == "length" and f.usage.completion_tokens == 16 for _, f in outs)
    used = {h.worker_id for h in shared.router.workers() if h.stats and h.stats.steps}
    assert sum(1 for w in used if w.startswith("decode")) == 2  # both decode workers served
    assert_clean(shared)


def test_shared_prefix_hits_prefix_cache(shared: RouterHarness, llm: LLM) -> None:
    system = "You are a terse assistant. Answer with one short sentence. " * 6
    chats = [[{"role": "system", "content": system}, {"role": "user", "content": q}]
             for q in ("Name a color.", "Name an animal.")]
    prompts = [shared.router.encode_chat(c) for c in chats]
    want = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    first = shared.generate_all(prompts[:1], GREEDY)[0]
    second = shared.generate_all(prompts[1:], GREEDY)[0]
    assert [first[0], second[0]] == want
    assert second[1].usage.cached_tokens >= 64  # the system prompt's full blocks
    p = next(h for h in shared.router.workers() if h.role == "prefill")
    stats = shared.lt.run(_stats(p))
    assert stats.prefix_hits >= 4


def test_short_prompt_is_not_stuck_behind_a_long_ones_chunks(shared: RouterHarness) -> None:
    # The prefill worker runs "shortest_first" with 128-token steps: a 2000-token prompt
    # takes 16 steps; a short prompt sent while it prefills starts at the next step and
    # gets its first token within a few steps (under fcfs it waits for all the chunks
    # left). Counted in the worker's engine steps and in the order of first tokens, so a
    # slow machine cannot fail it.
    long_prompt = [(i * 7919) % 40000 + 100 for i in range(2000)]
    short_prompt = shared.prompts(1)[0]
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    p = next(h for h in shared.router.workers() if h.role == "prefill")
    firsts: list[str] = []
    steps_at_first: dict[str, int] = {}

    async def first_token(prompt: list[int], name: str) -> None:
        async for item in shared.router.generate(prompt, params):
            if isinstance(item, Delta) and name not in firsts:
                firsts.append(name)
                steps_at_first[name] = (await p.fetch_stats()).steps

    async def go() -> tuple[int, int]:
        before = (await p.fetch_stats()).steps
        long = asyncio.ensure_future(first_token(long_prompt, "long"))
        while (await p.fetch_stats()).steps < before + 2:  # the long prompt is under way
            await asyncio.sleep(0.01)
        sent_at = (await p.fetch_stats()).steps
        await first_token(short_prompt, "short")
        await long
        return sent_at, steps_at_first["short"]

    sent_at, got_at = shared.lt.run(go())
    assert firsts == ["short", "long"]
    # A few steps (the one under way, the short's own, a stats read between steps), not
    # the long prompt's 14 left.
    assert got_at - sent_at <= 5, (sent_at, got_at)
    assert_clean(shared)


async def _stats(h):  # type: ignore[no-untyped-def]
    return await h.actor.stats.remote()


def test_cancel_mid_stream_frees_every_block(shared: RouterHarness) -> None:
    long = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)

    async def start_and_cancel(prompt: list[int]) -> int:
        n = 0
        gen = shared.router.generate(prompt, long)
        async for item in gen:
            if isinstance(item, Delta):
                n += len(item.token_ids)
            if n >= 3:
                break
        await gen.aclose()  # the client goes away mid-stream
        return n

    async def go() -> list[int]:
        return list(await asyncio.gather(*(start_and_cancel(p) for p in shared.prompts(6))))

    assert all(n >= 3 for n in shared.lt.run(go()))
    assert_clean(shared)


def test_killed_decode_worker_loses_nothing(shared: RouterHarness, llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = shared.prompts(8)
    want = [o.token_ids for o in llm.generate(prompts, params)]

    async def go() -> list[list[int]]:
        tasks = [asyncio.ensure_future(shared.collect(p, params)) for p in prompts]
        while sum(len(rr.generated) for rr in shared.router.requests.values()) < 40:
            await asyncio.sleep(0.05)
        victim = max((h for h in shared.router.workers() if h.role == "decode"),
                     key=lambda h: len(h.requests))
        assert victim.requests, "the victim holds requests mid-stream"
        ray.kill(victim.actor, no_restart=True)
        return [t for t, _ in await asyncio.gather(*tasks)]

    assert shared.lt.run(go()) == want
    # The router replaced the dead worker.
    shared.lt.run(_until(lambda: len([h for h in shared.router.workers()
                                      if h.role == "decode" and h.alive]) == 2))
    assert_clean(shared)


async def _until(cond, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.2)


def test_transfer_checks_and_timeout_free_both_sides(shared: RouterHarness) -> None:
    """Drive the workers' transfer directly: a mismatched handle and a lost one."""
    p = next(h for h in shared.router.workers() if h.role == "prefill")
    d = next(h for h in shared.router.workers() if h.role == "decode" and h.alive)
    prompt = shared.prompts(1)[0]

    async def attempt(rid: str, tamper) -> BaseException:  # type: ignore[no-untyped-def]
        blocks = await d.actor.reserve.remote(rid, prompt, GREEDY)
        assert blocks
        res = await p.actor.prefill.remote(PrefillTask(rid, prompt, GREEDY, d.endpoint, blocks))
        try:
            await d.actor.start.remote(rid, res.first_token, tamper(res.handle))
        except ray.exceptions.RayTaskError as e:
            return e.cause
        raise AssertionError("start should have failed")

    def bad_layout(hd: TransferHandle) -> TransferHandle:
        hd.num_blocks += 1
        return hd

    never = ray.remote(num_cpus=0)(_sleep).remote(3600)

    def lost(hd: TransferHandle) -> TransferHandle:
        hd.payload = [never]  # an object that never arrives
        return hd

    err = shared.lt.run(attempt("xfer-bad", bad_layout))
    assert isinstance(err, KVTransferError) and "reserved" in str(err)
    err = shared.lt.run(attempt("xfer-lost", lost))
    ray.cancel(never, force=True)
    assert isinstance(err, KVTransferTimeout) and "did not arrive" in str(err)
    assert_clean(shared)


def _sleep(seconds: float) -> None:
    # Defined with a module-free body: Ray ships it by value (the workers cannot import
    # this test module).
    __import__("time").sleep(seconds)


_sleep.__module__ = "__main__"
