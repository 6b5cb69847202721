"""The router's request lifecycle against in-process fake workers (tests/unit/
router_fakes.py): cancels at every phase, deaths at every phase, transfer failures,
stop strings matched at the router, overload and deadlines -- each asserting the
tokens the client got and that every fake worker got every block back.

Fast and deterministic (no Ray, no model): these are the tests the mutation run of
the router's lifecycle code leans on. tests/e2e/test_chaos.py does the same with real
processes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import ray

from engine.sampling_params import SamplingParams
from router import core, wire, worker_handle
from router.config import RouterConfig
from router.core import Router
from router.errors import (
    DeadlineExceeded,
    NoWorkersError,
    OverloadedError,
    QueueFullError,
    ShuttingDownError,
)
from router.metrics import StatsPoller
from router.request_state import Delta, Final, Phase
from tests.unit.router_fakes import (
    FakeCluster,
    cached_model_config,
    cached_tokenizer,
    next_token,
)

PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPT = [11, 22, 33, 44, 55]


def expected(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(next_token(seq))
    return seq[len(prompt):]


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> FakeCluster:
    c = FakeCluster()
    monkeypatch.setattr("router.worker_spawn.actor_class", c.actor_class)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: actor.die())
    monkeypatch.setattr("router.core.load_model_config", cached_model_config)
    monkeypatch.setattr("router.core.load_tokenizer", cached_tokenizer)
    return c


async def start(cluster: FakeCluster, **kw: object) -> Router:
    kw.setdefault("worker_wait_s", 5.0)
    router = Router(RouterConfig(**kw))  # type: ignore[arg-type]
    await router.start()
    return router


async def collect(router: Router, prompt: list[int] = PROMPT,
                  params: SamplingParams = PARAMS, **kw: object) -> tuple[list[int], Final]:
    toks: list[int] = []
    final = None
    async for item in router.generate(prompt, params, **kw):  # type: ignore[arg-type]
        if isinstance(item, Delta):
            toks += item.token_ids
        else:
            final = item
    assert final is not None
    return toks, final


async def until(cond, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    for _ in range(5000):
        if cond():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never: {what}")


async def settle(router: Router, cluster: FakeCluster) -> None:
    await router.lifecycle.settle()
    await until(lambda: not router.requests, "no request in flight")
    await until(lambda: cluster.owned_blocks() == 0, "every block back")
    for a in cluster.actors:
        if not a.dead:
            assert not a.reserved and not a.running, a.worker_id


def run(coro):  # type: ignore[no-untyped-def]
    # A bound on a test that hangs (a mutation run meets many): they take ~0.5 s. A test
    # that fails leaves the router's tasks behind; asyncio.run would wait for them
    # without a bound once cancelled, so they get a few seconds and no more.
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, 20))
    finally:
        left = asyncio.all_tasks(loop)
        for t in left:
            t.cancel()
        if left:
            loop.run_until_complete(asyncio.wait(left, timeout=5))
        loop.close()


def test_disaggregated_tokens_and_blocks(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster)
        toks, final = await collect(router)
        assert toks == expected(PROMPT, 12) and final.finish_reason == "length"
        await settle(router, cluster)
        await router.shutdown()
    run(go())


@pytest.mark.parametrize("phase", [Phase.RESERVING, Phase.PREFILLING, Phase.STARTING,
                                   Phase.DECODING])
def test_cancel_in_every_phase_frees_everything(cluster: FakeCluster, phase: Phase) -> None:
    async def go() -> None:
        router = await start(cluster)
        prefill, decode = cluster.live("prefill")[0], cluster.live("decode")[0]
        gate = {Phase.RESERVING: decode.reserve_gate, Phase.PREFILLING: prefill.prefill_gate,
                Phase.STARTING: decode.start_gate}.get(phase)
        if gate is not None:
            gate.clear()
        task = asyncio.ensure_future(collect(router, request_id="r"))
        await until(lambda: "r" in router.requests and router.requests["r"].phase is phase,
                    f"phase {phase}")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if gate is not None:
            gate.set()
        await settle(router, cluster)
        assert ("abort", "r@1") in decode.calls
        if phase is Phase.PREFILLING:
            assert ("abort", "r@1") in prefill.calls
        await router.shutdown()
    run(go())


@pytest.mark.parametrize("phase", [Phase.RESERVING, Phase.DECODING])
def test_a_request_id_reused_after_a_cancel_is_served(cluster: FakeCluster,
                                                       phase: Phase) -> None:
    """A client retrying with the id of a call it cancelled (or that timed out): the
    workers refuse every id they were told to abort, so the new call's ids must be new
    to them, or it would wait for KV room until its deadline."""
    async def go() -> None:
        router = await start(cluster)
        decode = cluster.live("decode")[0]
        if phase is Phase.RESERVING:
            decode.reserve_gate.clear()
        task = asyncio.ensure_future(collect(router, request_id="r"))
        await until(lambda: "r" in router.requests and router.requests["r"].phase is phase,
                    f"phase {phase}")
        first_id = router.requests["r"].attempt_id
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        decode.reserve_gate.set()
        await settle(router, cluster)
        assert ("abort", "r@1") in decode.calls
        toks, final = await collect(router, request_id="r", timeout_s=5.0)
        assert toks == expected(PROMPT, 12) and final.finish_reason == "length"
        assert first_id in decode.aborted and len(decode.aborted) == 1
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_abort_that_overtakes_its_reserve_leaks_nothing(cluster: FakeCluster) -> None:
    """The cancel reaches the worker before the reserve it cancels: the worker refuses
    the late reserve (remembered abort), so no block is taken for nobody."""
    async def go() -> None:
        router = await start(cluster)
        decode = cluster.live("decode")[0]
        real = decode._reserve

        async def slow_reserve(rid, tokens, params, age_s):  # type: ignore[no-untyped-def]
            await asyncio.sleep(0.05)  # the abort runs first
            return await real(rid, tokens, params, age_s)

        decode._reserve = slow_reserve  # type: ignore[method-assign]
        task = asyncio.ensure_future(collect(router, request_id="r"))
        await until(lambda: ("reserve", "r@1") not in decode.calls and "r" in router.requests
                    and router.requests["r"].phase is Phase.RESERVING)
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.1)
        assert decode.calls.index(("abort", "r@1")) < decode.calls.index(("reserve", "r@1"))
        await settle(router, cluster)
        await router.shutdown()
    run(go())


@pytest.mark.parametrize("victim,phase", [("decode", Phase.PREFILLING),
                                          ("decode", Phase.STARTING),
                                          ("decode", Phase.DECODING),
                                          ("prefill", Phase.PREFILLING)])
def test_worker_death_in_every_phase_loses_nothing(cluster: FakeCluster, victim: str,
                                                    phase: Phase) -> None:
    async def go() -> None:
        router = await start(cluster)
        moves: list[int] = []
        router.on_finish.append(lambda rr, _why: moves.append(rr.events.migrations))
        prefill, decode = cluster.live("prefill")[0], cluster.live("decode")[0]
        if phase is Phase.PREFILLING:
            prefill.prefill_gate.clear()
        if phase is Phase.STARTING:
            decode.start_gate.clear()
        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        task = asyncio.ensure_future(collect(router, params=params, request_id="r"))
        await until(lambda: "r" in router.requests and router.requests["r"].phase is phase
                    and (phase is not Phase.DECODING or len(router.requests["r"].generated) > 3))
        (prefill if victim == "prefill" else decode).die()
        for a in cluster.actors:
            a.prefill_gate.set()
            a.start_gate.set()
        toks, final = await task
        assert toks == expected(PROMPT, 200) and final.finish_reason == "length"
        assert router.requests == {} and len(cluster.live(victim)) == 1  # replaced
        # Timing.migrations: moves to another decode worker, not a prefill's retry.
        assert moves == [1 if phase in (Phase.STARTING, Phase.DECODING) else 0]
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_transfer_failure_is_placed_again(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster)
        cluster.live("decode")[0].fail_next_start = True
        toks, final = await collect(router)
        assert toks == expected(PROMPT, 12) and final.finish_reason == "length"
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_stop_string_at_router_aborts_the_worker(cluster: FakeCluster) -> None:
    """The router matches the stop string; the worker, still decoding, must be told."""
    async def go() -> None:
        router = await start(cluster)
        assert router.tokenizer is not None
        want = expected(PROMPT, 200)
        stop = router.tokenizer.decode(want[5:7])
        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True,
                                stop=(stop,))
        toks, final = await collect(router, params=params, request_id="s")
        assert final.finish_reason == "stop" and 0 < len(toks) < 200
        assert toks == want[:len(toks)]
        await settle(router, cluster)
        assert ("abort", "s@1") in cluster.live("decode")[0].calls
        await router.shutdown()
    run(go())


def test_overload_is_refused_fast_and_kills_nobody(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster, max_inflight=3)
        prefill = cluster.live("prefill")[0]
        prefill.prefill_gate.clear()
        tasks = [asyncio.ensure_future(collect(router)) for _ in range(10)]
        await until(lambda: len(router.requests) == 3)
        await asyncio.sleep(0.01)
        prefill.prefill_gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        refused = [r for r in results if isinstance(r, OverloadedError)]
        ok = [r for r in results if isinstance(r, tuple)]
        assert len(ok) == 3 and len(refused) == 7
        assert all(e.retry_after_s > 0 for e in refused)
        assert len(cluster.actors) == 2  # nobody replaced
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_no_room_waits_then_fails_at_deadline(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster)
        decode = cluster.live("decode")[0]
        decode.free_blocks = decode.free_blocks[:0]  # a full pool
        with pytest.raises(DeadlineExceeded):
            await collect(router, timeout_s=0.3)
        decode.free_blocks = list(range(1, decode.num_blocks + 1))
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_queue_bound_refuses_when_requests_already_wait(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster, max_queue=1)
        decode = cluster.live("decode")[0]
        saved, decode.free_blocks = decode.free_blocks, []
        waiting = asyncio.ensure_future(collect(router))
        await until(lambda: router.num_queued == 1)
        with pytest.raises(QueueFullError):
            await collect(router)
        decode.free_blocks = saved
        await router.placement.room_changed()
        toks, _ = await waiting
        assert toks == expected(PROMPT, 12)
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_no_worker_and_none_coming_is_unavailable(cluster: FakeCluster,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        router = await start(cluster)
        monkeypatch.setattr(router.registry, "start_replacement", lambda role: None)
        cluster.live("decode")[0].die()
        await until(lambda: not router.registry.live("decode"))
        with pytest.raises(NoWorkersError):
            await collect(router)
        await router.shutdown()
    run(go())


def test_a_deadline_that_ends_the_wait_for_a_worker_is_deadline_exceeded(
        cluster: FakeCluster) -> None:
    """While the only prefill worker is being replaced, a request whose deadline comes
    before worker_wait_s ends DEADLINE_EXCEEDED (its own bound), not UNAVAILABLE."""
    async def go() -> None:
        router = await start(cluster)  # worker_wait_s 5
        cluster.ready.clear()  # the replacement does not come up
        cluster.live("prefill")[0].die()
        await until(lambda: not router.registry.live("prefill"))
        with pytest.raises(DeadlineExceeded, match="waited for a prefill worker"):
            await collect(router, timeout_s=0.3)
        cluster.ready.set()
        toks, _ = await collect(router)  # the replacement is up: served
        assert toks == expected(PROMPT, 12)
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_drain_moves_streams_to_the_replacement(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster)
        params = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
        tasks = [asyncio.ensure_future(collect(router, params=params)) for _ in range(3)]
        await until(lambda: sum(len(r.generated) > 2 for r in router.requests.values()) == 3)
        old = cluster.live("decode")[0]
        assert await router.drain(old.worker_id) == 3
        for toks, final in await asyncio.gather(*tasks):
            assert toks == expected(PROMPT, 300) and final.finish_reason == "length"
        assert old.dead and len(cluster.live("decode")) == 1
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_draining_the_last_worker_of_a_role_keeps_it_serving_until_its_replacement_is_up(
        cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster)
        params = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
        tasks = [asyncio.ensure_future(collect(router, params=params)) for _ in range(2)]
        await until(lambda: sum(len(r.generated) > 2 for r in router.requests.values()) == 2)
        old = cluster.live("decode")[0]
        cluster.ready.clear()  # the replacement takes its time to load
        draining = asyncio.ensure_future(router.drain(old.worker_id))
        await until(lambda: len(cluster.actors) == 3, "the replacement started")
        await asyncio.sleep(0.1)
        assert not draining.done()
        assert [h.worker_id for h in router.registry.live("decode")] == [old.worker_id]
        late = asyncio.ensure_future(collect(router, params=PARAMS))  # still served by it
        cluster.ready.set()
        assert await draining in (2, 3)  # the late one may have finished by then
        for toks, final in await asyncio.gather(*tasks):
            assert toks == expected(PROMPT, 300) and final.finish_reason == "length"
        assert (await late)[0] == expected(PROMPT, 12)
        assert old.dead and len(cluster.live("decode")) == 1
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_draining_the_last_worker_of_a_role_without_a_replacement_keeps_it(
        cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        router = await start(cluster)
        monkeypatch.setattr(router.registry, "start_replacement", lambda role: None)
        old = cluster.live("decode")[0]
        with pytest.raises(NoWorkersError, match="keeps serving"):
            await router.drain(old.worker_id)
        assert not old.dead and router.registry.live("decode")
        toks, _ = await collect(router)
        assert toks == expected(PROMPT, 12)
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_a_worker_lost_during_shutdown_is_not_replaced(cluster: FakeCluster) -> None:
    """Starting an actor needs Ray's GCS, which a signal to the whole process group has
    already ended; the grace period goes on with the workers left."""
    async def go() -> None:
        router = await start(cluster, prefill_workers=2)
        params = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
        task = asyncio.ensure_future(collect(router, params=params, request_id="g"))
        await until(lambda: "g" in router.requests
                    and len(router.requests["g"].generated) > 2)
        stopping = asyncio.ensure_future(router.shutdown(grace_s=10.0))
        await until(lambda: router.admission.closing)
        made = len(cluster.actors)
        cluster.live("prefill")[0].die()
        await until(lambda: len(router.registry.live("prefill")) == 1)
        toks, final = await task  # the grace period lets it finish
        assert toks == expected(PROMPT, 300) and final.finish_reason == "length"
        cluster.live("prefill")[0].die()  # the last: nothing to place a request on now
        await until(lambda: not router.registry.live("prefill"))
        with pytest.raises(NoWorkersError, match="shutting down"):
            await router.registry.wait_live("prefill", asyncio.get_running_loop().time() + 5)
        await stopping
        assert len(cluster.actors) == made  # nothing new was started
    run(go())


def test_shutdown_ends_even_if_a_frozen_worker_never_answers_its_aborts(
        cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker stopped (SIGSTOP, a hung driver) is not dead: it would never answer the
    aborts of its requests, and a shutdown that waited for them would never end. The
    wait is bounded; the workers are killed after it (which frees what they hold)."""
    monkeypatch.setattr(core, "SHUTDOWN_SETTLE_S", 0.2)

    async def go() -> None:
        router = await start(cluster)
        prefill, decode = cluster.live("prefill")[0], cluster.live("decode")[0]
        prefill.prefill_gate.clear()  # the request stays in its prefill...
        prefill.abort_gate.clear()  # ...and the prefill worker answers no abort
        task = asyncio.ensure_future(collect(router, request_id="f"))
        await until(lambda: ("prefill", "f@1") in prefill.calls, "prefilling")
        await asyncio.wait_for(router.shutdown(grace_s=0.05), timeout=60)
        assert (await task)[1].finish_reason == "abort"
        assert ("abort", "f@1") in prefill.calls
        assert ("abort", "f@1") not in decode.calls  # never before the prefill's answer
        assert prefill.dead and decode.dead
    run(go())


def test_shutdown_ends_streams_with_abort(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster)
        params = SamplingParams(temperature=0.0, max_tokens=8000, ignore_eos=True)
        finals: list[Final] = []

        async def consume() -> None:
            stream: AsyncIterator[Delta | Final] = router.generate(PROMPT, params)
            async for item in stream:
                if isinstance(item, Final):
                    finals.append(item)

        task = asyncio.ensure_future(consume())
        await until(lambda: any(len(r.generated) > 3 for r in router.requests.values()))
        await router.shutdown(grace_s=0.05)
        await task
        assert [f.finish_reason for f in finals] == ["abort"]
        with pytest.raises(NoWorkersError):
            await collect(router)
    run(go())


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_new_requests_pass_over_a_silent_worker(cluster: FakeCluster, mode: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A frozen worker (SIGSTOP: alive to Ray, answering nothing) is not declared dead,
    but once it has been silent long enough new requests go to the workers that are
    heard from, instead of waiting on it until their deadlines."""
    monkeypatch.setattr(worker_handle, "SILENT_AFTER_S", 0.3)

    async def go() -> None:
        role = "decode" if mode == "disaggregated" else "colocated"
        kw = {"decode_workers": 2} if mode == "disaggregated" else {"workers": 2}
        router = await start(cluster, mode=mode, **kw)
        frozen, heard = cluster.live(role)
        frozen.freeze()
        calls_before = len(frozen.calls)
        await asyncio.sleep(0.5)
        got = await asyncio.gather(*(collect(router, request_id=f"n{i}", timeout_s=10.0)
                                     for i in range(6)))
        assert all(t == expected(PROMPT, 12) and f.finish_reason == "length"
                   for t, f in got)
        assert len(frozen.calls) == calls_before  # nothing new was sent its way
        assert not frozen.dead and len(cluster.actors) == len(router.registry.workers)
        shown = {w.worker_id: w.seconds_since_heard
                 for w in (wire.worker_info(h) for h in router.registry.workers.values())}
        assert shown[frozen.worker_id] > 0.5 and shown[heard.worker_id] < 0.3  # pdserve info
        frozen.thaw()
        await settle(router, cluster)
        await router.shutdown()
    run(go())


@pytest.mark.parametrize("phase", [Phase.PREFILLING, Phase.STARTING, Phase.DECODING])
def test_the_deadline_ends_a_request_that_is_still_decoding(cluster: FakeCluster,
                                                            phase: Phase) -> None:
    """--request-timeout-s (or the call's deadline) bounds the whole request, decoding
    included, not only its waits: an HTTP request has no client deadline, and would
    otherwise run to max_tokens. Cut off in any phase, it ends DeadlineExceeded and
    every KV block comes back (settle audits the pools)."""
    async def go() -> None:
        router = await start(cluster)
        prefill, decode = cluster.live("prefill")[0], cluster.live("decode")[0]
        gate = {Phase.PREFILLING: prefill.prefill_gate,
                Phase.STARTING: decode.start_gate}.get(phase)
        if gate is not None:
            gate.clear()  # the worker does not answer before the deadline
        long = SamplingParams(temperature=0.0, max_tokens=8000, ignore_eos=True)
        with pytest.raises(DeadlineExceeded, match=f"while {phase.value}"):
            await collect(router, params=long, timeout_s=0.5, request_id="t")
        if gate is not None:
            gate.set()
        await settle(router, cluster)  # audits every pool
        assert ("abort", "t@1") in decode.calls
        await router.shutdown()
    run(go())


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_a_request_placed_again_tells_its_new_worker_its_age(cluster: FakeCluster,
                                                             mode: str) -> None:
    """After its worker dies, a request is placed on the replacement with its age since
    arrival (the worker ranks it by that age, not as its newest request)."""
    async def go() -> None:
        role = "decode" if mode == "disaggregated" else "colocated"
        router = await start(cluster, mode=mode, **({} if mode == "disaggregated"
                                                    else {"workers": 1}))
        first = cluster.live(role)[0]
        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        task = asyncio.ensure_future(collect(router, params=params, request_id="r"))
        await until(lambda: "r" in router.requests
                    and len(router.requests["r"].generated) > 3)
        await asyncio.sleep(0.05)
        first.die()
        toks, _final = await task
        assert toks == expected(PROMPT, 200)
        (second,) = cluster.live(role)
        ((first_id, first_age),) = first.ages.items()
        ((again_id, again_age),) = second.ages.items()
        assert (first_id, again_id) == ("r@1", "r@2")
        assert first_age < 0.05 <= again_age
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_a_prefill_worker_busy_in_a_long_step_is_heard_but_a_frozen_one_is_not(
        cluster: FakeCluster) -> None:
    """Prefill workers have no token stream: the stats poller is what hears them. Stats
    wait for a step boundary, which a long prompt keeps away; the poller's ping does not,
    so a busy worker is not taken for a frozen one (and passed over)."""
    async def go() -> None:
        router = await start(cluster, prefill_workers=2)
        busy, frozen = cluster.live("prefill")
        hb, hf = (router.registry.workers[a.worker_id] for a in (busy, frozen))
        poller = StatsPoller(router, interval_s=0.1)
        busy.engine_idle.clear()
        frozen.freeze()
        hb.heard_at = hf.heard_at = hb.heard_at - 60.0  # neither heard for a minute
        await asyncio.gather(poller._poll(hb), poller._poll(hf))
        assert hb.seconds_since_heard() < 1.0 and not hb.silent()
        assert hf.seconds_since_heard() >= 60.0 and hf.silent()
        busy.engine_idle.set()
        frozen.thaw()
        await router.shutdown()
    run(go())


def test_a_server_shutting_down_says_so_whatever_its_kv_queue(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster)
        router.placement.waiting = router.config.max_queue  # the KV wait queue is full
        with pytest.raises(QueueFullError):
            await collect(router)
        router.begin_shutdown()
        with pytest.raises(ShuttingDownError):
            await collect(router)
        router.placement.waiting = 0
        await router.shutdown()
    run(go())


def test_a_worker_that_dies_while_starting_is_started_again(
        cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed while it loads (Ray's memory monitor, when deployments start at once), a
    worker of the first set is started again; one whose constructor raised is not."""
    monkeypatch.setattr("router.worker_registry.REPLACE_BACKOFF_S", (0.0, 0.0))

    async def go() -> None:
        cluster.start_errors["decode"] = [
            ray.exceptions.OutOfMemoryError("1 worker(s) were killed"),
            ray.exceptions.ActorDiedError()]
        router = await start(cluster)
        assert [a.dead for a in cluster.actors if a.role == "decode"] == [True, True, False]
        toks, _ = await collect(router)
        assert toks == expected(PROMPT, 12)
        await router.shutdown()
        cluster.start_errors["decode"] = [
            ray.exceptions.RayActorError(error_msg="ImportError: no module named x",
                                         actor_init_failed=True)]
        with pytest.raises(ray.exceptions.RayActorError, match="ImportError"):
            await start(cluster)
        assert [a.dead for a in cluster.actors if a.role == "decode"][-1]
    run(go())
