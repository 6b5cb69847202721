"""Chaos: what one client or one dying process may cost everyone else -- nothing.

Real Ray actors, the real model, real SIGKILLs of worker processes, cancels at random
instants. Every test asserts outcomes only (tokens, finish reasons, status codes, pool
owner counts), never times, so a slow machine makes them slower, not flaky.

PDSERVE_SLOW=1 runs the randomized tests thousands of times instead of a few hundred.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import signal
from collections.abc import Iterator

import pytest
import ray

from engine import LLM
from engine.sampling_params import SamplingParams, SamplingParamsError
from router.errors import RequestFailedError
from router.request_state import Final, Phase
from tests.e2e.runtime_fixtures import CHATS, RouterHarness, assert_clean, router_config

SLOW = os.environ.get("PDSERVE_SLOW") == "1"
GREEDY40 = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def h() -> Iterator[RouterHarness]:
    # One prefill and one decode worker: a killed worker's requests can only continue on
    # its replacement, the hardest case. Small prefill steps keep long prompts prefilling
    # long enough to be caught mid-way.
    harness = RouterHarness(router_config(prefill_workers=1, decode_workers=1,
                                          prefill_step_tokens=64, transfer_timeout_s=10))
    yield harness
    harness.close()


def long_prompts(h: RouterHarness, n: int, words: int = 300) -> list[list[int]]:
    rnd = random.Random(7)
    return [h.router.encode_chat([{"role": "user", "content": " ".join(
        rnd.choice(CHATS).split()[0] for _ in range(words)) + f" #{i}"}]) for i in range(n)]


def reference(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, params)]


def worker_pid(handle) -> int:  # type: ignore[no-untyped-def]
    return int(ray.get(handle.actor.__ray_call__.remote(lambda _self: os.getpid())))


def sigkill(handle) -> None:  # type: ignore[no-untyped-def]
    os.kill(worker_pid(handle), signal.SIGKILL)


async def wait_for(cond, what: str, timeout: float = 300) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"never reached: {what}")
        await asyncio.sleep(0.02)


def one(h: RouterHarness, role: str):  # type: ignore[no-untyped-def]
    return next(w for w in h.router.workers() if w.role == role and w.alive)


# -- poison ------------------------------------------------------------------------------
def test_poison_request_fails_alone(h: RouterHarness, llm: LLM) -> None:
    """A request whose sampling values would break the engine step (they bypass the
    client-side validation here, as a future bug might) fails alone -- wherever it is
    caught: re-validated on the way, or failed by the engine's step isolation
    (tests/unit/test_engine_isolation.py drives that inside one engine) -- and its batch
    mates finish token-identical."""
    prompts = h.prompts(6)
    want = reference(llm, prompts, GREEDY40)
    poison = SamplingParams(temperature=0.7, max_tokens=40, ignore_eos=True)
    # NaN divides every logit into NaN: the sampler's draw would leave the vocabulary.
    # (A temperature of 1e-300, once the poison here, is greedy since tiny temperatures
    # are taken as 0.)
    object.__setattr__(poison, "temperature", float("nan"))

    async def go() -> tuple[list[list[int]], BaseException | Final]:
        tasks = [asyncio.ensure_future(h.collect(p, GREEDY40)) for p in prompts]
        await wait_for(lambda: sum(len(r.generated) for r in h.router.requests.values()) > 6,
                       "the innocent streams decode")
        try:
            bad: BaseException | Final = (await h.collect(prompts[0], poison))[1]
        except (RequestFailedError, SamplingParamsError) as e:
            bad = e
        return [t for t, _ in await asyncio.gather(*tasks)], bad

    got, bad = h.lt.run(go())
    assert got == want
    assert isinstance(bad, (RequestFailedError, SamplingParamsError)), bad
    assert_clean(h)


# -- cancels -----------------------------------------------------------------------------
def test_random_instant_cancels_leave_every_pool_whole(h: RouterHarness) -> None:
    """Cancel calls at random instants of their lifecycle (before reservation, while
    prefilling, while the KV moves, while decoding); no block may stay owned."""
    n = 2000 if SLOW else 200
    rnd = random.Random(11)
    short = h.prompts(8)
    longs = long_prompts(h, 4, words=400)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    phases: dict[str, int] = {}

    async def one_call(i: int) -> None:
        prompt = rnd.choice(longs) if i % 5 == 0 else rnd.choice(short)
        rid = f"cancel-{i}"

        async def consume() -> None:
            async for _ in h.router.generate(prompt, params, request_id=rid):
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(rnd.choice([0.0, 0.0005, 0.002, 0.01, 0.05, 0.2, 0.5, 1.0]))
        rr = h.router.requests.get(rid)
        phase = rr.phase.value if rr is not None else "not admitted or done"
        phases[phase] = phases.get(phase, 0) + 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def go() -> None:
        for start in range(0, n, 20):  # 20 at a time: every phase is busy
            await asyncio.gather(*(one_call(i) for i in range(start, min(n, start + 20))))
        await h.router.lifecycle.settle()

    h.lt.run(go(), timeout=1800)
    assert not h.router.requests
    assert_clean(h)
    # The randomness reached the interesting phases.
    assert {Phase.PREFILLING.value, Phase.RESERVING.value} & set(phases), phases


# -- worker deaths ---------------------------------------------------------------------------
def _kill_during(h: RouterHarness, llm: LLM, role: str, phase: Phase,
                 prompts: list[list[int]], params: SamplingParams) -> None:
    want = reference(llm, prompts, params)

    async def go() -> list[list[int]]:
        tasks = [asyncio.ensure_future(h.collect(p, params)) for p in prompts]
        await wait_for(lambda: any(r.phase is phase for r in h.router.requests.values()),
                       f"a request in phase {phase.value}")
        sigkill(one(h, role))
        return [t for t, _ in await asyncio.gather(*tasks)]

    assert h.lt.run(go(), timeout=900) == want
    h.lt.run(wait_for(lambda: len([w for w in h.router.workers() if w.alive]) == 2,
                      "the replacement is up"))
    assert_clean(h)


def test_decode_killed_while_its_reservations_prefill(h: RouterHarness, llm: LLM) -> None:
    _kill_during(h, llm, "decode", Phase.PREFILLING, long_prompts(h, 4),
                 SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))


def test_decode_killed_mid_stream(h: RouterHarness, llm: LLM) -> None:
    _kill_during(h, llm, "decode", Phase.DECODING, h.prompts(6), GREEDY40)


def test_decode_killed_mid_stream_with_tokens_held_by_stream_interval(
        h: RouterHarness, llm: LLM) -> None:
    """--stream-interval holds a request's tokens in the router between messages; a
    decode worker killed meanwhile must not lose or repeat them when the request moves
    to the replacement."""
    config = h.router.config
    # 40 tokens go out as 1 + 9 x 4, with 3 still held when the request finishes.
    h.router.config = dataclasses.replace(config, stream_interval=4)
    try:
        _kill_during(h, llm, "decode", Phase.DECODING, h.prompts(6), GREEDY40)
    finally:
        h.router.config = config


def test_prefill_killed_mid_prefill(h: RouterHarness, llm: LLM) -> None:
    _kill_during(h, llm, "prefill", Phase.PREFILLING, long_prompts(h, 4),
                 SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))


# -- bursts and bad bytes ------------------------------------------------------------------
def test_burst_ends_ok_or_resource_exhausted_and_kills_nobody(h: RouterHarness) -> None:
    """1200 concurrent gRPC calls against a deployment admitting 48 at once: each call
    ends OK or RESOURCE_EXHAUSTED (with a retry hint), and no worker is replaced."""
    import grpc

    from proto.pdserve.v1 import generation_pb2 as pb
    from proto.pdserve.v1 import generation_pb2_grpc as pb_grpc
    from router.metrics import Metrics
    from router.server import GrpcServer
    from router.server_config import ServerConfig

    router = h.router
    before = {w.worker_id for w in router.workers()}
    server = h.lt.run(_start_server(GrpcServer, router, ServerConfig(
        host="127.0.0.1", port=0, metrics_port=None), Metrics))
    limit, router.admission.limit = router.admission.limit, 48
    n = 2000 if SLOW else 1200

    # A blocking client on 1000 threads (tests/e2e/test_grpc_burst.py sends its burst of
    # 3000 from one asyncio client instead: the CANCELLED calls once blamed on that
    # client were grpc core's server cancelling calls waiting past 1000, now raised).
    from concurrent.futures import ThreadPoolExecutor

    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.GenerationStub(channel)

    def call(i: int) -> tuple[grpc.StatusCode, int, bool]:
        req = pb.GenerateRequest(prompt=f"Count to {i % 10}.", sampling=pb.SamplingParams(
            temperature=0.0, max_tokens=2, ignore_eos=True))
        toks = 0
        try:
            for r in stub.Generate(req, timeout=600):
                toks += len(r.token_ids)
            return grpc.StatusCode.OK, toks, False
        except grpc.RpcError as e:
            hint = any(k == "grpc-retry-pushback-ms" for k, _ in
                       (e.trailing_metadata() or ()))  # type: ignore[attr-defined]
            return e.code(), toks, hint  # type: ignore[attr-defined]

    def burst() -> list[tuple[grpc.StatusCode, int, bool]]:
        with ThreadPoolExecutor(1000) as pool:
            return list(pool.map(call, range(n)))

    try:
        results = burst()
    finally:
        channel.close()
        router.admission.limit = limit
        h.lt.run(server.stop())
    codes = {c for c, _, _ in results}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    ok = [t for c, t, _ in results if c is grpc.StatusCode.OK]
    assert ok and all(t == 2 for t in ok)
    assert all(hint for c, _, hint in results if c is grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert {w.worker_id for w in router.workers()} == before  # nobody declared dead
    assert_clean(h)


async def _start_server(cls, router, config, metrics_cls):  # type: ignore[no-untyped-def]
    server = cls(router, config, metrics_cls(router))
    await server.start()
    return server


def test_undecodable_bytes_are_invalid_argument(h: RouterHarness) -> None:
    import grpc

    from router.metrics import Metrics
    from router.server import GrpcServer
    from router.server_config import ServerConfig

    server = h.lt.run(_start_server(GrpcServer, h.router, ServerConfig(
        host="127.0.0.1", port=0, metrics_port=None), Metrics))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            call = ch.unary_stream("/pdserve.v1.Generation/Generate",
                                   request_serializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as err:
                list(call(b"\xff\xff\xff\xff garbage", timeout=30))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
            info = ch.unary_unary("/pdserve.v1.Generation/GetServerInfo",
                                  request_serializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as err:
                info(b"\xff\xff", timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    finally:
        h.lt.run(server.stop())


def test_drain_moves_requests_and_replaces_the_worker(h: RouterHarness, llm: LLM) -> None:
    """`pdserve drain`: the worker leaves rotation, its streams continue elsewhere
    token-identical, and a replacement takes its place. It is the only decode worker,
    so it serves until the replacement is up: the streams still on it then move (how
    many is a race with their ends; tests/unit/test_router_lifecycle.py pins it)."""
    prompts = h.prompts(4)
    want = reference(llm, prompts, GREEDY40)

    async def go() -> tuple[list[list[int]], int, str]:
        tasks = [asyncio.ensure_future(h.collect(p, GREEDY40)) for p in prompts]
        await wait_for(lambda: sum(r.phase is Phase.DECODING
                                   for r in h.router.requests.values()) == len(prompts),
                       "every request decodes")
        victim = one(h, "decode").worker_id
        moved = await h.router.drain(victim)
        return [t for t, _ in await asyncio.gather(*tasks)], moved, victim

    got, moved, victim = h.lt.run(go(), timeout=900)
    assert got == want
    assert 0 <= moved <= len(prompts)
    decode = [w for w in h.router.workers() if w.role == "decode"]
    assert len(decode) == 1 and decode[0].worker_id != victim and decode[0].alive
    assert_clean(h)
