"""The router's lifecycle paths the mutation run of router/lifecycle.py, placement.py and
streams.py found untested (docs/mutation.md): colocated attempts, migrations, a first
token that ends the request, what a prefill reports summed over attempts, the attempt
bound, failures reported in the token stream, stale events, the bookkeeping of queued
prefill tokens and fresh reservations, and placement across two decode workers.

Same in-process fake workers as tests/unit/test_router_lifecycle.py: no Ray, no model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from typing import Any

import pytest
import ray

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from messages import PoolState, PrefillAborted, TokenEvent, TokenLogprobs
from messages.transfer import KVTransferError
from router import placement as placement_mod
from router.core import Router
from router.errors import NoWorkersError, QueueFullError, RequestFailedError
from router.lifecycle import MAX_PLACEMENTS
from router.request_state import Delta, Events, Phase, RouterRequest
from router.routing import block_hashes
from router.streams import coalesce
from tests.unit.router_fakes import FakeActor, FakeCluster
from tests.unit.test_router_lifecycle import (
    PARAMS,
    PROMPT,
    collect,
    expected,
    run,
    settle,
    start,
    until,
)
from tests.unit.test_router_lifecycle import cluster as cluster  # the fixture

__all__ = ["cluster"]

LONG = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)


def record_events(router: Router) -> dict[str, Events]:
    """Each finished request's events, as the metrics hook sees them."""
    seen: dict[str, Events] = {}

    def hook(rr: RouterRequest, _reason: str) -> None:
        seen[rr.request_id] = rr.events
    router.on_finish.append(hook)
    return seen


def handle(router: Router, worker_id: str):  # type: ignore[no-untyped-def]
    return router.registry.workers[worker_id]


# -- colocated -----------------------------------------------------------------------------
def test_colocated_tokens_cached_count_and_no_needless_abort(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster, mode="colocated", workers=1)
        w = cluster.live("colocated")[0]
        w.prefill_report = (3, 0.0, 0.0, 0.0, 0)  # prompt tokens its prefix cache served
        toks, final = await collect(router, request_id="c")
        assert toks == expected(PROMPT, 12) and final.finish_reason == "length"
        assert final.usage.cached_tokens == 3
        await settle(router, cluster)
        assert ("abort", "c@1") not in w.calls  # it finished there: nothing to drop
        assert not handle(router, w.worker_id).requests
        await router.shutdown()
    run(go())


def test_colocated_cancel_aborts_the_worker(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster, mode="colocated", workers=1)
        w = cluster.live("colocated")[0]
        task = asyncio.ensure_future(collect(router, params=LONG, request_id="c"))
        await until(lambda: "c" in router.requests
                    and len(router.requests["c"].generated) > 2, "decoding")
        assert router.requests["c"].phase is Phase.DECODING
        assert router.requests["c"].worker == w.worker_id
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await settle(router, cluster)
        assert ("abort", "c@1") in w.calls
        await router.shutdown()
    run(go())


def test_colocated_stop_string_at_router_aborts_the_worker(cluster: FakeCluster) -> None:
    """The router matches the stop string while the worker, still decoding, holds the
    request: the worker must be told, or it decodes to max_tokens for nobody."""
    async def go() -> None:
        router = await start(cluster, mode="colocated", workers=1)
        w = cluster.live("colocated")[0]
        assert router.tokenizer is not None
        want = expected(PROMPT, 5000)
        params = SamplingParams(temperature=0.0, max_tokens=5000, ignore_eos=True,
                                stop=(router.tokenizer.decode(want[5:7]),))
        toks, final = await collect(router, params=params, request_id="s")
        assert final.finish_reason == "stop" and 0 < len(toks) < 5000
        assert toks == want[:len(toks)]
        await until(lambda: ("abort", "s@1") in w.calls, "the worker told")
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_colocated_generate_failure_fails_the_request(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster, mode="colocated", workers=1)
        w = cluster.live("colocated")[0]
        w.fail_next_generate = RuntimeError("no room for it")
        with pytest.raises(RequestFailedError, match="generate failed: RuntimeError: no room"):
            await collect(router, request_id="g")
        await settle(router, cluster)
        assert ("abort", "g@1") in w.calls
        assert len(cluster.actors) == 1  # the worker is fine: nobody replaced
        await router.shutdown()
    run(go())


def test_a_worker_killed_for_memory_is_replaced_and_its_request_placed_again(
        cluster: FakeCluster) -> None:
    """Ray's memory monitor killing a worker surfaces as OutOfMemoryError (not a
    RayActorError): a worker death like any other, and none of Ray's report (node
    addresses, pids, command lines) reaches the client."""
    async def go() -> None:
        router = await start(cluster, mode="colocated", workers=1)
        w = cluster.live("colocated")[0]
        w.fail_next_generate = ray.exceptions.OutOfMemoryError(
            "1 worker(s) were killed due to the node running low on memory.\n"
            "Memory on the node (IP: 192.0.2.2, ID: abc) where the lease was running")
        toks, final = await collect(router, request_id="o")
        assert toks == expected(PROMPT, 12) and final.finish_reason == "length"
        assert w.dead and len(cluster.live("colocated")) == 1  # replaced
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_an_unexpected_error_reaches_the_client_as_one_line(
        cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        router = await start(cluster, mode="colocated", workers=1)

        async def broken(*_a: object, **_k: object) -> None:
            raise OSError("first line\nIP: 192.0.2.2, pid 4242, /home/someone/secret")

        monkeypatch.setattr(router.placement, "colocated_worker", broken)
        with pytest.raises(RequestFailedError) as e:
            await collect(router, request_id="x")
        assert str(e.value) == "request x failed: OSError: first line"
        await router.shutdown()
    run(go())


def test_colocated_migration_continues_token_identical(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster, mode="colocated", workers=1)
        events = record_events(router)
        w = cluster.live("colocated")[0]
        w.prefill_report = (2, 0.0, 0.0, 0.0, 0)
        task = asyncio.ensure_future(collect(router, params=LONG, request_id="m"))
        await until(lambda: "m" in router.requests
                    and len(router.requests["m"].generated) > 3, "decoding")
        w.prefill_report = (50, 0.0, 0.0, 0.0, 0)  # the re-prefill's hit is not the client's
        w.preempt("m@1")
        toks, final = await task
        assert toks == expected(PROMPT, 200) and final.finish_reason == "length"
        assert final.usage.cached_tokens == 2
        assert events["m"].migrations == 1
        assert ("generate", "m@2") in w.calls
        await settle(router, cluster)
        assert ("abort", "m@1") not in w.calls  # the worker freed it when it preempted
        await router.shutdown()
    run(go())


def test_colocated_worker_death_places_it_again(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster, mode="colocated", workers=1)
        events = record_events(router)
        task = asyncio.ensure_future(collect(router, params=LONG, request_id="d"))
        await until(lambda: "d" in router.requests
                    and len(router.requests["d"].generated) > 3, "decoding")
        cluster.live("colocated")[0].die()
        toks, final = await task
        assert toks == expected(PROMPT, 200) and final.finish_reason == "length"
        assert events["d"].migrations == 1
        assert len(cluster.live("colocated")) == 1
        await settle(router, cluster)
        await router.shutdown()
    run(go())


# -- disaggregated ---------------------------------------------------------------------------
def test_first_token_that_ends_the_request_frees_the_reservation(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster)
        decode = cluster.live("decode")[0]
        events = record_events(router)
        cluster.live("prefill")[0].prefill_report = (0, 0.0, 0.0, 0.0, 1000)
        one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        toks, final = await collect(router, params=one, request_id="o")
        assert toks == expected(PROMPT, 1) and final.finish_reason == "length"
        assert events["o"].transfer_bytes == 0  # no KV shipped
        await settle(router, cluster)
        assert ("abort", "o@1") in decode.calls and ("start", "o@1") not in decode.calls
        await router.shutdown()
    run(go())


def test_first_token_matching_a_stop_string_ends_with_stop(cluster: FakeCluster) -> None:
    """The first token (from the prefill) matches a stop string, and is also the last
    one allowed: the stop string wins."""
    async def go() -> None:
        router = await start(cluster)
        assert router.tokenizer is not None
        first = expected(PROMPT, 1)[0]
        for n in (1, 12):
            params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                                    stop=(router.tokenizer.decode([first]),))
            toks, final = await collect(router, params=params)
            assert toks == [first] and final.finish_reason == "stop"
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_the_first_tokens_logprobs_reach_the_client_only_when_asked(
        cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster)
        for logprobs in (None, 1):
            params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True,
                                    logprobs=logprobs)
            deltas = [item async for item in router.generate(PROMPT, params)
                      if isinstance(item, Delta)]
            assert deltas[0].token_ids == expected(PROMPT, 1)
            want = [] if logprobs is None else [TokenLogprobs(-0.5, [(deltas[0].token_ids[0],
                                                                        -0.5)])]
            assert deltas[0].logprobs == want
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_migration_continues_token_identical_and_counts(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster)
        events = record_events(router)
        prefill, decode = cluster.live("prefill")[0], cluster.live("decode")[0]
        prefill.prefill_report = (4, 0.0, 0.0, 0.0, 0)
        task = asyncio.ensure_future(collect(router, params=LONG, request_id="m"))
        await until(lambda: "m" in router.requests
                    and router.requests["m"].phase is Phase.DECODING
                    and len(router.requests["m"].generated) > 3, "decoding")
        prefill.prefill_report = (40, 0.0, 0.0, 0.0, 0)
        decode.preempt("m@1")
        await until(lambda: "m@2" in decode.running
                    and len(router.requests["m"].generated) > 10, "decoding again")
        decode.preempt("m@2")
        toks, final = await task
        assert toks == expected(PROMPT, 200) and final.finish_reason == "length"
        assert final.usage.cached_tokens == 4  # the client's prompt hit, not the re-prefill's
        assert events["m"].migrations == 2
        assert ("prefill", "m@2") in prefill.calls
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_preemptions_beyond_the_attempt_bound_do_not_fail_the_request(
        cluster: FakeCluster) -> None:
    """Under KV pressure a request may be preempted (migrated) again and again; that is
    load, not failure: MAX_PLACEMENTS bounds failed attempts, the deadline the rest."""
    async def go() -> None:
        router = await start(cluster)
        events = record_events(router)
        decode = cluster.live("decode")[0]
        task = asyncio.ensure_future(collect(router, params=LONG, request_id="p"))
        for n in range(1, MAX_PLACEMENTS + 3):
            await until(lambda n=n: f"p@{n}" in decode.running, f"decoding, attempt {n}")
            decode.preempt(f"p@{n}")
        toks, final = await task
        assert toks == expected(PROMPT, 200) and final.finish_reason == "length"
        assert events["p"].migrations == MAX_PLACEMENTS + 2
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_a_retry_is_logged_with_the_request_and_the_reason(
        cluster: FakeCluster, caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        router = await start(cluster)
        decode = cluster.live("decode")[0]
        decode.fail_next_start = True
        with caplog.at_level(logging.INFO, logger="router.lifecycle"):
            toks, _ = await collect(router, request_id="l")
        assert toks == expected(PROMPT, 12)
        assert [r.getMessage() for r in caplog.records if r.name == "router.lifecycle"] == [
            f"request l: KV import failed on {decode.worker_id}: KVTransferError: the KV "
            "did not arrive (fake); placing it again"]
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_prefill_reports_add_up_over_attempts(cluster: FakeCluster) -> None:
    """A transfer failure makes a second attempt: queue, prefill and transfer time and
    bytes are the sums of both prefills; the cached count is the first's."""
    async def go() -> None:
        router = await start(cluster)
        events = record_events(router)
        prefill, decode = cluster.live("prefill")[0], cluster.live("decode")[0]
        prefill.prefill_report = (4, 0.5, 0.25, 0.125, 1000)
        real = prefill._prefill

        async def report_then_change(task):  # type: ignore[no-untyped-def]
            res = await real(task)
            prefill.prefill_report = (40, 0.5, 0.25, 0.125, 1000)  # the retry's own hit
            return res
        prefill._prefill = report_then_change  # type: ignore[method-assign]
        decode.fail_next_start = True
        toks, final = await collect(router, request_id="p")
        assert toks == expected(PROMPT, 12) and final.finish_reason == "length"
        ev = events["p"]
        assert (ev.queue_seconds, ev.prefill_seconds, ev.transfer_seconds,
                ev.transfer_bytes) == (1.0, 0.5, 0.25, 2000)
        assert ev.prefill_sent is not None
        assert final.usage.cached_tokens == 4 and decode.started_cached["p@2"] == 4
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_import_time_adds_up_over_migrations(cluster: FakeCluster) -> None:
    """Each attempt's KV import (start) time is added: at least the 0.05 s the first
    import took, however fast the second."""
    async def go() -> None:
        router = await start(cluster)
        events = record_events(router)
        decode = cluster.live("decode")[0]
        decode.start_delay_s = 0.05
        task = asyncio.ensure_future(collect(router, params=LONG, request_id="i"))
        await until(lambda: "i" in router.requests
                    and len(router.requests["i"].generated) > 3, "decoding")
        decode.start_delay_s = 0.0
        decode.preempt("i@1")
        toks, _ = await task
        assert toks == expected(PROMPT, 200)
        # a duration (asyncio may wake a timer a clock tick early), not a clock reading
        assert 0.04 <= events["i"].import_seconds < 60
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_attempts_are_bounded_and_the_last_reason_told(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster)
        prefill, decode = cluster.live("prefill")[0], cluster.live("decode")[0]

        async def never(request_id, *_args, **_kw):  # type: ignore[no-untyped-def]
            decode._free(decode.reserved.pop(decode._record("start", request_id)))
            raise KVTransferError("the KV never arrives")
        decode._start = never  # type: ignore[method-assign]
        with pytest.raises(RequestFailedError,
                           match=f"after {MAX_PLACEMENTS} attempts.*never arrives"):
            await collect(router, request_id="b")
        assert sum(m == "prefill" for m, _ in prefill.calls) == MAX_PLACEMENTS
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_a_prefill_aborted_every_time_fails_with_its_reason(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster)
        prefill = cluster.live("prefill")[0]
        real = prefill._prefill

        async def drained(task):  # type: ignore[no-untyped-def]
            prefill.fail_next_prefill = PrefillAborted("the worker drains")
            return await real(task)
        prefill._prefill = drained  # type: ignore[method-assign]
        with pytest.raises(RequestFailedError,
                           match=f"prefill on {prefill.worker_id} was aborted"):
            await collect(router, request_id="a")
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_an_unexpected_worker_error_fails_the_request_and_is_logged(
        cluster: FakeCluster, caplog: pytest.LogCaptureFixture) -> None:
    """An error the router has no meaning for (a bug in a worker): the request fails with
    it, the traceback is logged, and the rest is cleaned up."""
    async def go() -> None:
        router = await start(cluster)
        decode = cluster.live("decode")[0]

        async def broken(request_id, tokens, params):  # type: ignore[no-untyped-def]
            raise ValueError("the worker has a bug")
        decode._reserve = broken  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR, logger="router.lifecycle"), \
                pytest.raises(RequestFailedError, match=r"^request u failed: "):
            await collect(router, request_id="u")
        [rec] = [r for r in caplog.records if r.name == "router.lifecycle"]
        assert rec.getMessage() == "request u failed" and rec.exc_info is not None
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_settle_does_not_wait_for_requests_still_running(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster)
        prefill = cluster.live("prefill")[0]
        prefill.prefill_gate.clear()
        task = asyncio.ensure_future(collect(router, request_id="w"))
        await until(lambda: ("prefill", "w@1") in prefill.calls, "prefilling")
        # Nothing to wait for: returns at once (the bound only guards a hang).
        await asyncio.wait_for(router.lifecycle.settle(), 30)
        assert not task.done()
        prefill.prefill_gate.set()
        assert (await task)[0] == expected(PROMPT, 12)
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_error_in_the_stream_fails_the_request(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster)
        decode = cluster.live("decode")[0]
        task = asyncio.ensure_future(collect(router, params=LONG, request_id="e"))
        await until(lambda: "e" in router.requests
                    and len(router.requests["e"].generated) > 2, "decoding")
        decode.fail("e@1", "its logits were NaN")
        with pytest.raises(RequestFailedError, match="its logits were NaN"):
            await task
        await settle(router, cluster)
        assert len(cluster.actors) == 2  # the worker goes on
        await router.shutdown()
    run(go())


def test_prefill_bookkeeping_while_in_flight_and_after(cluster: FakeCluster) -> None:
    """Queued prefill tokens and the request's membership on both workers while the
    prefill runs, all zero after; a fresh reservation counts its blocks (rounded up)
    until the decode worker's next step report."""
    async def go() -> None:
        router = await start(cluster)
        prefill, decode = cluster.live("prefill")[0], cluster.live("decode")[0]
        p, d = handle(router, prefill.worker_id), handle(router, decode.worker_id)
        prompt = list(range(100, 117))  # 17 tokens: 2 blocks of 16
        prefill.prefill_gate.clear()
        task = asyncio.ensure_future(collect(router, prompt=prompt, request_id="k"))
        await until(lambda: ("prefill", "k@1") in prefill.calls, "prefilling")
        assert p.load.outstanding_tokens == 17 and p.requests == {"k"}
        assert d.fresh_blocks == 2
        assert prefill.sent_to["k@1"] == (decode.worker_id, decode.reserved["k@1"])
        second = asyncio.ensure_future(collect(router, prompt=prompt[:5], request_id="l"))
        await until(lambda: ("prefill", "l@1") in prefill.calls, "both prefilling")
        assert p.load.outstanding_tokens == 22 and p.requests == {"k", "l"}
        prefill.prefill_gate.set()
        assert (await second)[0] == expected(prompt[:5], 12)
        assert (await task)[0] == expected(prompt, 12)
        assert p.load.outstanding_tokens == 0 and not p.requests
        await until(lambda: not d.requests, "the attempt over")
        assert d.fresh_blocks == 0
        # remembered for prefix affinity: its one full block
        assert p.load.matched_blocks(block_hashes(prompt, router.block_size)) == 1
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_a_failed_kv_send_on_the_prefill_side_is_placed_again(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster)
        prefill = cluster.live("prefill")[0]
        prefill.fail_next_prefill = KVTransferError("the send timed out")
        toks, final = await collect(router, request_id="s")
        assert toks == expected(PROMPT, 12) and final.finish_reason == "length"
        assert [m for m, r in prefill.calls if r.startswith("s@")].count("prefill") == 2
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_prefill_failure_leaves_no_queued_tokens(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster)
        prefill = cluster.live("prefill")[0]
        prefill.fail_next_prefill = RuntimeError("the step failed")
        with pytest.raises(RequestFailedError, match="prefill failed: RuntimeError"):
            await collect(router, request_id="f")
        p = handle(router, prefill.worker_id)
        assert p.load.outstanding_tokens == 0 and not p.requests
        await settle(router, cluster)
        assert ("abort", "f@1") in prefill.calls  # its send may have started
        await router.shutdown()
    run(go())


# -- streams ---------------------------------------------------------------------------------
def test_stale_events_from_another_worker_are_dropped(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster, mode="colocated", workers=2)
        task = asyncio.ensure_future(collect(router, params=LONG, request_id="s"))
        await until(lambda: "s" in router.requests
                    and len(router.requests["s"].generated) > 2, "decoding")
        other = next(a for a in cluster.live("colocated")
                     if a.worker_id != router.requests["s"].worker)
        other.events.put_nowait([TokenEvent(router.requests["s"].attempt_id, [7], [], "stop")])
        toks, final = await task
        assert toks == expected(PROMPT, 200) and final.finish_reason == "length"
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_events_for_unknown_attempts_are_dropped_and_the_worker_kept(
        cluster: FakeCluster) -> None:
    """A worker may still report an attempt the router has forgotten (aborted, or from
    before a restart of the attempt): dropped, and the stream -- and the worker -- go on."""
    async def go() -> None:
        router = await start(cluster)
        decode = cluster.live("decode")[0]
        decode.events.put_nowait([TokenEvent("ghost@1", [5], [], "stop")])
        toks, final = await collect(router)
        assert toks == expected(PROMPT, 12) and final.finish_reason == "length"
        assert not decode.dead and len(cluster.actors) == 2  # not lost, not replaced
        assert router.registry.live("decode")[0].worker_id == decode.worker_id
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_a_pool_state_in_a_step_report_replaces_the_last(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster)
        decode = cluster.live("decode")[0]
        d = handle(router, decode.worker_id)
        await until(lambda: d.stats is not None, "stats")
        old = PoolState(**{f.name: 1 for f in dataclasses.fields(PoolState)})
        new = PoolState(**{f.name: 2 for f in dataclasses.fields(PoolState)})
        d.stats = dataclasses.replace(d.stats, pool=old)
        decode.pool_report = new
        await collect(router)
        assert d.stats.pool == new
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_a_broken_token_stream_loses_the_worker(cluster: FakeCluster,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """The stream is how the router hears a decode worker: when it breaks, the worker
    is dropped and replaced even though its actor still answers, and the log says why."""
    async def go() -> None:
        router = await start(cluster)
        old = cluster.live("decode")[0]
        with caplog.at_level(logging.WARNING):
            old.break_stream()
            await until(lambda: old.worker_id not in router.registry.workers
                        and router.registry.live("decode"), "replaced")
        # Only this worker's lines: a loaded machine may log other warnings in between.
        said = [r.getMessage() for r in caplog.records
                if r.name in ("router.streams", "router.worker_registry")
                and r.getMessage().startswith(f"worker {old.worker_id} ")]
        assert said[0] == (f"worker {old.worker_id} stream ended: the worker's stream "
                           "failed: RuntimeError: the token stream broke (fake)")
        assert said[1].endswith(" lost (its token stream broke); starting a replacement")
        assert (await collect(router))[0] == expected(PROMPT, 12)
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_a_lost_worker_stops_its_token_stream_reader(cluster: FakeCluster) -> None:
    """A worker lost another way (its lifeline: a node that vanished sends no FIN) must
    not leave the router reading its silent token channel forever."""
    async def go() -> None:
        router = await start(cluster)
        h = router.registry.workers[cluster.live("decode")[0].worker_id]
        assert h.stream_task is not None and not h.stream_task.done()
        router.registry.lose(h, "its node is gone")  # the stream itself never broke
        await until(lambda: h.stream_task is not None and h.stream_task.done(),
                    "the reader stopped")
        assert h.stream_task.cancelled()
        await until(lambda: router.registry.live("decode"), "replaced")
        assert (await collect(router))[0] == expected(PROMPT, 12)
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_coalesce_says_nothing_is_behind_when_the_queue_ran_dry() -> None:
    async def go() -> None:
        q: asyncio.Queue[object] = asyncio.Queue()
        q.put_nowait(Delta([2], "b", []))
        merged, behind = coalesce(Delta([1], "a", []), q)  # type: ignore[arg-type]
        assert (merged.token_ids, merged.text, behind) == ([1, 2], "ab", None)
    asyncio.run(go())


def test_step_reports_keep_the_last_pool_state(cluster: FakeCluster) -> None:
    """Step batches carry no pool state (it is read once a second): the last one read
    stays, and the fresh-reservation count restarts at each report."""
    async def go() -> None:
        router = await start(cluster)
        decode = cluster.live("decode")[0]
        d = handle(router, decode.worker_id)
        await until(lambda: d.stats is not None, "stats")
        pool = PoolState(**{f.name: 1 for f in dataclasses.fields(PoolState)})
        d.stats = dataclasses.replace(d.stats, pool=pool)
        toks, _ = await collect(router)
        assert toks == expected(PROMPT, 12)
        assert d.stats.pool == pool
        await settle(router, cluster)
        await router.shutdown()
    run(go())


async def a_decoding_in_a_pool_of_one(cluster: FakeCluster
                                     ) -> tuple[Router, FakeActor, asyncio.Future[Any]]:
    """A router whose one decode worker has room for one request, and request "a"
    decoding there (its collect() future): the next request must wait for room."""
    router = await start(cluster)
    decode = cluster.live("decode")[0]
    decode.free_blocks = decode.free_blocks[:1]
    first = asyncio.ensure_future(collect(router, request_id="a"))
    await until(lambda: "a" in router.requests
                and router.requests["a"].phase is Phase.DECODING, "a decoding")
    return router, decode, first


async def end_in_a_pool_of_one(router: Router, decode: FakeActor,
                               cluster: FakeCluster) -> None:
    """Nobody waits for room any more; the pool gets its blocks back for the audit."""
    assert router.placement.waiting == 0
    decode.free_blocks = list(range(1, decode.num_blocks + 1))
    await settle(router, cluster)
    await router.shutdown()


def test_a_finished_stream_wakes_a_request_waiting_for_room(
        cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Freed blocks reported in a step batch wake the waiters (no polling needed)."""
    monkeypatch.setattr(placement_mod, "ROOM_POLL_S", 1000.0)

    async def go() -> None:
        router, decode, first = await a_decoding_in_a_pool_of_one(cluster)
        second = asyncio.ensure_future(collect(router, request_id="b"))
        await until(lambda: router.num_queued == 1, "b waits for room")
        for toks, _ in await asyncio.gather(first, second):
            assert toks == expected(PROMPT, 12)
        await end_in_a_pool_of_one(router, decode, cluster)
    run(go())


# -- placement -------------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["decode", "prefill", "colocated"])
def test_unplaceable_role_fails_new_requests_at_once_but_placed_again_ones_wait(
        cluster: FakeCluster, role: str) -> None:
    """No alive node can host the role's replacement: a new request fails at once with
    the reason, while a request placed again (its worker died) waits for the
    replacement and finishes token-identical."""
    async def go() -> None:
        mode = "colocated" if role == "colocated" else "disaggregated"
        router = await start(cluster, mode=mode, workers=1, worker_wait_s=60.0)
        victim = cluster.live(role)[0]
        if role == "prefill":
            victim.prefill_gate.clear()
        task = asyncio.ensure_future(collect(router, params=LONG, request_id="r"))
        await until(lambda: "r" in router.requests and (
            ("prefill", "r@1") in victim.calls if role == "prefill"
            else len(router.requests["r"].generated) > 3), "under way")
        cluster.ready.clear()  # its replacement will not come up yet
        why = f"no alive node can host a {role} worker (test)"
        router.registry.unplaceable[role] = why
        victim.die()
        await until(lambda: not router.registry.live(role) and router.requests["r"].placements
                    == 2, "placed again, waiting")
        new = asyncio.ensure_future(collect(router, request_id="n"))
        await until(new.done, "the new request refused")
        with pytest.raises(NoWorkersError, match=re.escape(why)):
            new.result()
        assert not task.done()
        cluster.ready.set()
        toks, final = await task
        assert toks == expected(PROMPT, 200) and final.finish_reason == "length"
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_concurrent_requests_spread_over_decode_workers(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster, decode_workers=2)
        prefill = cluster.live("prefill")[0]
        prefill.prefill_gate.clear()
        tasks = [asyncio.ensure_future(collect(router, request_id=r)) for r in "xy"]
        await until(lambda: sum(m == "prefill" for m, _ in prefill.calls) == 2, "both")
        assert sorted(len(a.reserved) for a in cluster.live("decode")) == [1, 1]
        prefill.prefill_gate.set()
        for toks, _ in await asyncio.gather(*tasks):
            assert toks == expected(PROMPT, 12)
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_full_or_dead_decode_worker_is_skipped(cluster: FakeCluster,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The first choice has no room, or its actor is already gone: the next one takes
    it at once (not after a wait for room), and only the worker that holds the
    reservation hears of a later cancel."""
    monkeypatch.setattr(placement_mod, "ROOM_POLL_S", 1000.0)

    async def go() -> None:
        router = await start(cluster, decode_workers=3)
        first, second, third = cluster.live("decode")
        saved, first.free_blocks = first.free_blocks, []
        cluster.ready.clear()  # no replacement comes up to wake a waiter
        second.dead = True  # calls fail as from a dead actor; its lifeline has not told
        cluster.live("prefill")[0].prefill_gate.clear()
        task = asyncio.ensure_future(collect(router, request_id="z"))
        await until(lambda: "z@1" in third.reserved, "reserved on the third")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        cluster.live("prefill")[0].prefill_gate.set()
        await until(lambda: ("abort", "z@1") in third.calls, "the third told")
        await router.lifecycle.settle()
        assert ("abort", "z@1") not in first.calls
        first.free_blocks = saved
        assert not first.reserved and not third.reserved and third.blocks_owned == 0
        cluster.ready.set()
        await router.shutdown()
    run(go())


def test_the_queue_bound_holds_for_requests_admitted_together(cluster: FakeCluster) -> None:
    """Three requests admitted at once, no room anywhere, max_queue=2: two wait, the
    third is refused (QUEUE_FULL) when it would be the third to wait."""
    async def go() -> None:
        router = await start(cluster, max_queue=2)
        decode = cluster.live("decode")[0]
        saved, decode.free_blocks = decode.free_blocks, []
        tasks = [asyncio.ensure_future(collect(router, request_id=r)) for r in "abc"]
        await until(lambda: sum(t.done() for t in tasks) == 1, "one refused")
        [refused] = [t for t in tasks if t.done()]
        with pytest.raises(QueueFullError,
                           match=re.escape("2 requests already wait for KV room "
                                           "(max_queue=2)")):
            refused.result()
        assert router.placement.waiting == 2
        decode.free_blocks = saved
        await router.placement.room_changed()
        for t in tasks:
            if t is not refused:
                assert (await t)[0] == expected(PROMPT, 12)
        assert router.placement.waiting == 0
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_concurrent_reservations_each_count_their_blocks(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster)
        decode = cluster.live("decode")[0]
        d = handle(router, decode.worker_id)
        decode.reserve_gate.clear()
        cluster.live("prefill")[0].prefill_gate.clear()
        tasks = [asyncio.ensure_future(collect(router, request_id=r)) for r in "ab"]
        await until(lambda: len(decode.calls) == 2, "both reserving")
        decode.reserve_gate.set()
        await until(lambda: len(decode.reserved) == 2, "both reserved")
        assert d.fresh_blocks == 2  # one block each, until the next step report
        cluster.live("prefill")[0].prefill_gate.set()
        for toks, _ in await asyncio.gather(*tasks):
            assert toks == expected(PROMPT, 12)
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_a_short_deadline_still_waits_for_room(cluster: FakeCluster) -> None:
    """Under a second left is still time to wait: room that comes in time is taken."""
    async def go() -> None:
        router = await start(cluster)
        decode = cluster.live("decode")[0]
        saved, decode.free_blocks = decode.free_blocks, []
        task = asyncio.ensure_future(collect(router, timeout_s=0.9))
        await until(lambda: router.num_queued == 1, "waiting for room")
        decode.free_blocks = saved
        await router.placement.room_changed()
        assert (await task)[0] == expected(PROMPT, 12)
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_deadline_passes_while_waiting_for_room(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster)
        decode = cluster.live("decode")[0]
        saved, decode.free_blocks = decode.free_blocks, []
        with pytest.raises(placement_mod.DeadlineExceeded, match="deadline"):
            await collect(router, timeout_s=0.05)
        assert router.placement.waiting == 0
        decode.free_blocks = saved
        toks, _ = await collect(router, params=PARAMS)  # the queue is free again
        assert toks == expected(PROMPT, 12)
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_room_freed_while_a_no_room_answer_is_on_its_way_is_not_missed(
        cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode worker answers "no room" to b, and before b's task resumes, a step
    batch reports a's blocks freed (room_changed with nobody waiting yet). b must look
    again rather than sleep until the next poll (here: never)."""
    monkeypatch.setattr(placement_mod, "ROOM_POLL_S", 1000.0)

    async def go() -> None:
        router, decode, first = await a_decoding_in_a_pool_of_one(cluster)
        real_reserve = decode._reserve

        async def reserve_then_free(request_id: str, tokens: list[int], params: object,
                                    age_s: float) -> list[int] | None:
            blocks = await real_reserve(request_id, tokens, params, age_s)
            if blocks is None and request_id.startswith("b"):
                await first  # a ends: its blocks are back, its last batch announced it
                await router.placement.room_changed()  # and nobody was waiting yet
            return blocks

        monkeypatch.setattr(decode, "_reserve", reserve_then_free)
        toks, _ = await collect(router, request_id="b")
        assert toks == expected(PROMPT, 12)
        await end_in_a_pool_of_one(router, decode, cluster)
    run(go())


def test_a_prompt_one_decode_pool_can_never_hold_goes_to_one_that_can(
        cluster: FakeCluster) -> None:
    """Pools differ (each sized from the memory free when its worker started): a prompt
    too big for one is the request's fault only when every decode worker refuses it."""
    async def go() -> None:
        router = await start(cluster, decode_workers=2)
        small, big = cluster.live("decode")
        small.max_prompt_blocks = 1
        prompt = list(range(1, 40))  # 3 blocks of 16
        for i in range(4):  # whichever worker placement tries first
            toks, final = await collect(router, prompt=prompt, request_id=f"p{i}")
            assert toks == expected(prompt, 12) and final.finish_reason == "length"
        assert not any(m == "start" for m, _ in small.calls)
        big.max_prompt_blocks = 2
        with pytest.raises(InvalidRequestError, match="takes prompts of at most"):
            await collect(router, prompt=prompt, request_id="nowhere")
        await settle(router, cluster)
        await router.shutdown()
    run(go())


def test_a_chat_of_more_messages_than_the_context_is_refused_before_rendering(
        cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        router = await start(cluster)
        rendered: list[int] = []
        monkeypatch.setattr(router.tokenizer, "encode_chat",
                            lambda msgs, **_k: rendered.append(len(msgs)) or [1, 2])
        many = [{"role": "user", "content": "a"}] * (router.max_model_len + 1)
        with pytest.raises(InvalidRequestError, match="cannot fit") as e:
            router.encode_chat(many)
        assert e.value.field == "chat.messages" and rendered == []
        assert router.encode_chat(many[:3]) == [1, 2] and rendered == [3]
        await router.shutdown()
    run(go())
