"""A client that falls behind gets the tokens it missed in one message (router/streams.py
``coalesce``): same tokens, same order, same text and logprobs, same usage -- fewer
messages. One that keeps up still gets every step on its own."""

from __future__ import annotations

import asyncio

from engine.sampling_params import SamplingParams
from messages import TokenLogprobs
from router.request_state import Delta, Final, RouterRequest, Usage
from router.streams import QueueItem, coalesce
from tests.unit.router_fakes import FakeCluster
from tests.unit.test_router_lifecycle import PROMPT, cluster, expected, run, settle, start

__all__ = ["cluster"]  # the fixture, imported for the tests below


def lp(x: float) -> TokenLogprobs:
    return TokenLogprobs(x, [])


def test_queued_deltas_merge_in_order_and_stop_at_the_final() -> None:
    q: asyncio.Queue[QueueItem] = asyncio.Queue()
    first = Delta([1], "a", [lp(-1.0)])
    q.put_nowait(Delta([2, 3], "bc", [lp(-2.0), lp(-3.0)]))
    q.put_nowait(Delta([], "d", []))  # text released without a token (held back before)
    q.put_nowait(Delta([4], "", [lp(-4.0)]))
    final = Final("length", Usage(5, 4, 0))
    q.put_nowait(final)
    q.put_nowait(Delta([99], "never merged past a final", []))
    merged, behind = coalesce(first, q)
    assert merged.token_ids == [1, 2, 3, 4]
    assert merged.text == "abcd"
    assert [x.logprob for x in merged.logprobs] == [-1.0, -2.0, -3.0, -4.0]
    assert behind is final
    assert first.token_ids == [1] and first.text == "a"  # the queued item is not mutated
    assert q.qsize() == 1


def test_an_error_behind_the_deltas_is_handed_back_not_swallowed() -> None:
    q: asyncio.Queue[QueueItem] = asyncio.Queue()
    err = RuntimeError("worker failed")
    q.put_nowait(Delta([2], "b", []))
    q.put_nowait(err)
    merged, behind = coalesce(Delta([1], "a", []), q)
    assert merged.token_ids == [1, 2] and behind is err
    merged, behind = coalesce(Delta([7], "x", []), asyncio.Queue())
    assert merged.token_ids == [7] and behind is None


def test_a_slow_client_gets_every_token_once_in_fewer_messages(cluster: FakeCluster) -> None:
    run(slow_and_fast(cluster))


async def slow_and_fast(cluster: FakeCluster) -> None:
    router = await start(cluster)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    fast: list[int] = []
    n_fast = 0
    async for item in router.generate(PROMPT, params):
        if isinstance(item, Delta):
            fast += item.token_ids
            n_fast += 1
    slow: list[int] = []
    n_slow = 0
    final = None
    async for item in router.generate(PROMPT, params):
        if isinstance(item, Delta):
            slow += item.token_ids
            n_slow += 1
            await asyncio.sleep(0.02)  # the fake worker steps every ms meanwhile
        else:
            final = item
    assert slow == fast == expected(PROMPT, 40)
    assert final is not None and final.usage.completion_tokens == 40
    assert n_slow < n_fast  # merged: fewer messages for the same tokens
    await settle(router, cluster)
    await router.shutdown()


def test_itl_observed_once_per_message_counts_like_one_observe_per_token() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from router.metrics import ITL_BUCKETS, observe_many

    reg = CollectorRegistry()
    many = Histogram("many", "", buckets=ITL_BUCKETS, registry=reg)
    each = Histogram("each", "", buckets=ITL_BUCKETS, registry=reg)
    # Values on bucket bounds, between them, below the first and past the last.
    for value, n in [(0.002, 3), (0.0021, 1), (0.05, 4), (0.0, 2), (7.0, 5), (0.3, 1)]:
        observe_many(many, value, n)
        for _ in range(n):
            each.observe(value)

    def samples(name: str) -> list[tuple[str, dict[str, str], float]]:
        return [(s.name.removeprefix(name), s.labels, round(s.value, 9))
                for m in reg.collect() if m.name == name for s in m.samples
                if not s.name.endswith("_created")]

    assert samples("many") == samples("each")
    assert samples("many")[-2][2] == 16  # _count: every token


def test_stream_interval_sends_the_first_token_alone_then_groups_of_n(
        cluster: FakeCluster) -> None:
    run(interval_of(cluster, 4))


async def interval_of(cluster: FakeCluster, n: int) -> None:
    router = await start(cluster, stream_interval=n)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    sizes: list[int] = []
    toks: list[int] = []
    final = None
    async for item in router.generate(PROMPT, params):
        if isinstance(item, Delta):
            sizes.append(len(item.token_ids))
            toks += item.token_ids
        else:
            final = item
    assert toks == expected(PROMPT, 10)
    assert final is not None and final.usage.completion_tokens == 10
    # First token at once; then full groups; the rest (fewer than n) when the Final
    # arrives: never held past the end.
    assert sizes[0] == 1 and all(s >= n for s in sizes[1:-1]) and sum(sizes) == 10
    assert len(sizes) <= 1 + -(-9 // n)
    await settle(router, cluster)
    await router.shutdown()


def held_request(interval: int) -> RouterRequest:
    params = SamplingParams(max_tokens=16)
    return RouterRequest("r", [1, 2], params, None, deadline=1e9, stream_interval=interval)


def drained(rr: RouterRequest) -> list[QueueItem]:
    items: list[QueueItem] = []
    while not rr.queue.empty():
        items.append(rr.queue.get_nowait())
    return items


def test_stream_interval_holds_tokens_on_the_producer_side() -> None:
    """The edge's task is woken once per N tokens: the Deltas are merged before they
    are queued, not after."""
    rr = held_request(3)
    for tok in range(1, 9):
        rr.add_tokens([tok], [lp(-tok)])
    items = drained(rr)
    assert [d.token_ids for d in items if isinstance(d, Delta)] == [[1], [2, 3, 4], [5, 6, 7]]
    assert [x.logprob for x in items[1].logprobs] == [-2.0, -3.0, -4.0]
    rr.finish("length")  # token 8 is held: it goes out before the Final, never after
    tail = drained(rr)
    assert isinstance(tail[0], Delta) and tail[0].token_ids == [8]
    assert isinstance(tail[1], Final) and tail[1].usage.completion_tokens == 8


def test_stream_interval_does_not_hold_tokens_past_an_error() -> None:
    rr = held_request(8)
    rr.add_tokens([1], [])
    rr.add_tokens([2], [])
    err = RuntimeError("worker failed")
    rr.fail(err)
    items = drained(rr)
    assert isinstance(items[1], Delta) and items[1].token_ids == [2] and items[2] is err
    assert len(items) == 3


def test_stream_interval_one_queues_every_step() -> None:
    rr = held_request(1)
    for tok in range(1, 5):
        rr.add_tokens([tok], [])
    assert [d.token_ids for d in drained(rr) if isinstance(d, Delta)] == [[1], [2], [3], [4]]
