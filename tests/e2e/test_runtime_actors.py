"""The worker actors' remote API (runtime.actors), driven directly without the router.

The disaggregated path (decode.reserve -> prefill.prefill -> decode.start -> decode's
stream) and the colocated one (generate -> stream) give engine.LLM's greedy tokens;
aborts and finished requests leave every pool empty; stats carry the pool by owner.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from engine import LLM
from engine.config import CacheConfig, EngineConfig
from engine.errors import InvalidRequestError
from kvtransfer import PeerMessage
from messages import KVTransferError, PrefillTask, TokenEvent, WorkerStats
from runtime.actors import actor_class
from runtime.config import ROLES, WorkerConfig
from runtime.token_channel import read_channel
from tests.e2e.runtime_fixtures import CHATS, GREEDY, LoopThread, ensure_ray

PROMPTS = CHATS[:3]


class Stream:
    """One consumer of a worker's never-ending token stream, for the whole module."""

    def __init__(self, lt: LoopThread, actor: Any) -> None:
        self.events: dict[str, list[TokenEvent]] = defaultdict(list)
        self.heartbeats: list[WorkerStats] = []
        self.task = asyncio.run_coroutine_threadsafe(self._consume(actor), lt.loop)

    async def _consume(self, actor: Any) -> None:
        async for batch in read_channel(await actor.stream_channel.remote()):
            if not batch.events:
                self.heartbeats.append(batch.stats)
            for ev in batch.events:
                self.events[ev.request_id].append(ev)

    async def tokens(self, request_id: str, timeout_s: float = 120) -> list[int]:
        """Every token of the request once it has finished."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while not (self.events[request_id] and self.events[request_id][-1].finish_reason):
            if self.task.done():
                self.task.result()  # the stream broke: say why
            assert loop.time() < end, f"{request_id} did not finish"
            await asyncio.sleep(0.05)
        return [t for ev in self.events[request_id] for t in ev.token_ids]


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[LoopThread, dict[str, Any], dict[str, Stream]]]:
    ensure_ray()
    engine = EngineConfig(cache=CacheConfig(memory_bytes=64 << 20))
    actors = {r: actor_class(r).options(num_cpus=1, max_restarts=0).remote(
        WorkerConfig(worker_id=f"{r}-actors-test", role=r, engine=engine,
                     transfer_timeout_s=30.0, watermark=0.01)) for r in ROLES}
    lt = LoopThread()
    try:
        assert ray.get([a.ping.remote() for a in actors.values()], timeout=300) == [
            f"{r}-actors-test" for r in ROLES]
        streams = {r: Stream(lt, actors[r]) for r in ("decode", "colocated")}
        yield lt, actors, streams
    finally:
        for a in actors.values():
            ray.kill(a, no_restart=True)
        lt.close()


@pytest.fixture(scope="module")
def prompts_and_expected(llm: LLM) -> tuple[list[list[int]], list[list[int]]]:
    prompts = [llm.encode_chat([{"role": "user", "content": c}]) for c in PROMPTS]
    return prompts, [o.token_ids for o in llm.generate(prompts, GREEDY)]


def _assert_clean(actors: dict[str, Any]) -> None:
    states = ray.get([a.pool_state.remote() for a in actors.values()], timeout=60)
    for role, s in zip(actors, states, strict=True):
        assert (s["used"], s["requests"], s["held"]) == (0, 0, 0), (role, s)


def test_disaggregated_path_matches_llm(cluster, prompts_and_expected) -> None:  # type: ignore[no-untyped-def]
    lt, actors, streams = cluster
    prefill, decode = actors["prefill"], actors["decode"]
    prompts, expected = prompts_and_expected

    async def one(i: int, prompt: list[int]) -> list[int]:
        rid = f"disagg-{i}"
        blocks = await decode.reserve.remote(rid, prompt, GREEDY)
        assert blocks
        dest = await decode.endpoint.remote()
        res = await prefill.prefill.remote(PrefillTask(rid, prompt, GREEDY, dest, blocks))
        assert res.handle is not None and res.handle.num_blocks == len(blocks)
        await decode.start.remote(rid, res.first_token, res.handle, res.logprobs,
                                  res.num_cached_tokens)
        return [res.first_token, *await streams["decode"].tokens(rid)]

    async def run() -> list[list[int]]:
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))

    assert lt.run(run()) == expected
    _assert_clean(actors)


def test_colocated_path_matches_llm(cluster, prompts_and_expected) -> None:  # type: ignore[no-untyped-def]
    lt, actors, streams = cluster
    prompts, expected = prompts_and_expected

    async def one(i: int, prompt: list[int]) -> list[int]:
        await actors["colocated"].generate.remote(f"coloc-{i}", prompt, GREEDY)
        return await streams["colocated"].tokens(f"coloc-{i}")

    async def run() -> list[list[int]]:
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))

    assert lt.run(run()) == expected
    _assert_clean(actors)


def test_abort_frees_a_reservation(cluster, prompts_and_expected) -> None:  # type: ignore[no-untyped-def]
    _, actors, _ = cluster
    decode = actors["decode"]
    prompt = prompts_and_expected[0][0]
    assert ray.get(decode.reserve.remote("to-abort", prompt, GREEDY), timeout=60)
    assert ray.get(decode.abort.remote("to-abort"), timeout=60) is True
    assert ray.get(decode.abort.remote("never-here"), timeout=60) is False
    _assert_clean(actors)


def test_a_request_no_pool_can_hold_comes_back_as_the_clients_error(cluster) -> None:  # type: ignore[no-untyped-def]
    """Raised in the worker, pickled by Ray, raised again here: still an
    InvalidRequestError naming the field (the router answers INVALID_ARGUMENT)."""
    _, actors, _ = cluster
    usable = ray.get(actors["decode"].stats.remote(), timeout=60).num_usable_blocks
    prompt = [100] * (16 * usable)  # the whole pool, and max_tokens on top
    for call in (actors["decode"].reserve.remote("too-big", prompt, GREEDY),
                 actors["colocated"].generate.remote("too-big", prompt, GREEDY)):
        with pytest.raises(InvalidRequestError) as e:
            ray.get(call, timeout=60)
        assert isinstance(e.value, ray.exceptions.RayTaskError)
        assert e.value.cause.field == "max_tokens"
    _assert_clean(actors)


def test_stats_carry_the_pool_by_owner(cluster) -> None:  # type: ignore[no-untyped-def]
    _, actors, streams = cluster
    for role, stats in zip(actors, ray.get([a.stats.remote() for a in actors.values()]),
                           strict=True):
        assert (stats.worker_id, stats.role) == (f"{role}-actors-test", role)
        pool = stats.pool
        assert pool is not None
        assert pool.running + pool.reserved + pool.transfer + pool.cached + pool.free == \
            pool.usable == stats.num_usable_blocks
    assert any(s.pool is not None for s in streams["decode"].heartbeats)


def test_peer_messages_reach_the_receiver(cluster) -> None:  # type: ignore[no-untyped-def]
    """The KVPeer route ends at the decode worker's receiver (ray has no handshake)."""
    _, actors, _ = cluster
    with pytest.raises(ray.exceptions.RayTaskError) as err:
        ray.get(actors["decode"].kv_peer.remote(PeerMessage()), timeout=60)
    assert isinstance(err.value.cause, KVTransferError)
    assert "takes no peer messages" in str(err.value.cause)
