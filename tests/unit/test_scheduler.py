"""Scheduler policy with exact expectations: budgets, chunking, admission, preemption."""

from __future__ import annotations

from engine.block_pool import BlockPool
from engine.clock import FakeClock
from engine.config import SchedulerConfig
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler


def make(num_blocks: int = 32, budget: int = 8, seats: int = 4, bs: int = 4) -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks), bs)
    return Scheduler(SchedulerConfig(max_num_seqs=seats, max_num_batched_tokens=budget), kv)


def req(rid: str, n: int, base: int = 0) -> Request:
    return Request(rid, list(range(base, base + n)), SamplingParams(max_tokens=100))


def run_step(s: Scheduler, new_token: int = 7) -> list[tuple[str, int, bool]]:
    out = s.schedule()
    s.update_after_step(out)
    for c in out.chunks:
        if c.samples:
            c.request.append_token(new_token)
    return [(c.request.request_id, c.num_tokens, c.samples) for c in out.chunks]


def test_chunked_prefill_under_budget_then_decode() -> None:
    s = make(budget=8)
    s.add(req("a", 10, 0))
    s.add(req("b", 3, 100))
    assert run_step(s) == [("a", 8, False)]
    assert run_step(s) == [("a", 2, True), ("b", 3, True)]
    assert run_step(s) == [("a", 1, True), ("b", 1, True)]


def test_seat_limit() -> None:
    s = make(seats=2, budget=64)
    for i in range(3):
        s.add(req(f"r{i}", 2, 10 * i))
    assert [r for r, _, _ in run_step(s)] == ["r0", "r1"]
    assert len(s.waiting) == 1


def test_preempts_youngest_and_recomputes_later() -> None:
    # 4 usable blocks of 4 tokens: 8-token prompts a and b fill them after prefill.
    s = make(num_blocks=5, budget=64, bs=4)
    a, b = req("a", 8, 0), req("b", 8, 100)
    s.add(a)
    s.add(b)
    assert run_step(s) == [("a", 8, True), ("b", 8, True)]  # 2 blocks each, 9 tokens now
    # Next step each needs a 3rd block: a gets the pool's last one... none left -> b goes.
    out = s.schedule()
    assert [c.request.request_id for c in out.chunks] == ["a"]
    assert out.preempted == [b]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert s.waiting[0] is b
    assert s.kv.block_table("b") == []


def test_abort_frees_blocks_everywhere() -> None:
    s = make(num_blocks=9, budget=64)
    a, b = req("a", 9, 0), req("b", 5, 50)
    s.add(a)
    s.add(b)
    run_step(s)
    free_before = s.kv.pool.num_free_blocks
    s.abort(a)
    assert a.status is RequestStatus.FINISHED_ABORTED
    assert s.kv.pool.num_free_blocks == free_before + 3
    s.abort(a)  # idempotent
    s.abort(b)
    assert s.kv.pool.num_free_blocks == s.kv.pool.num_usable_blocks
    assert not s.has_work


def test_prefix_hit_counts_cached_tokens() -> None:
    s = make(budget=64)
    a = req("a", 9, 0)
    s.add(a)
    run_step(s)
    s.finish(a, RequestStatus.FINISHED_LENGTH)
    b = req("b", 9, 0)
    s.add(b)
    assert run_step(s) == [("b", 1, True)]
    assert b.num_cached_tokens == 8


def make_sf(num_blocks: int = 64, budget: int = 8, seats: int = 4, bs: int = 4,
            max_wait_s: float = 10.0, clock: FakeClock | None = None) -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks), bs)
    return Scheduler(SchedulerConfig(max_num_seqs=seats, max_num_batched_tokens=budget,
                                     policy="shortest_first", max_wait_s=max_wait_s), kv,
                     clock=clock or FakeClock())


def test_shortest_first_lets_a_short_prompt_past_a_long_ones_chunks() -> None:
    s = make_sf(budget=8)
    s.add(req("long", 30, 0))
    assert run_step(s) == [("long", 8, False)]
    s.add(req("short", 3, 100))
    # fcfs would give "long" the whole budget again; here "short" goes first and "long"
    # takes what is left.
    assert run_step(s) == [("short", 3, True), ("long", 5, False)]
    assert run_step(s) == [("short", 1, True), ("long", 7, False)]


def test_shortest_first_orders_waiting_by_length() -> None:
    s = make_sf(budget=64)
    for rid, n in (("c", 9, ), ("a", 2), ("b", 5)):
        s.add(req(rid, n, 10 * len(rid) * n))
    assert run_step(s) == [("a", 2, True), ("b", 5, True), ("c", 9, True)]


def test_shortest_first_serves_a_starving_request_first() -> None:
    clock = FakeClock()
    s = make_sf(budget=8, max_wait_s=5.0, clock=clock)
    s.add(req("old", 20, 0))
    clock.advance(5.0)  # waited max_wait_s without tokens (the paused pool below)
    s.add(req("short", 3, 100))
    assert run_step(s) == [("old", 8, False)]


def test_shortest_first_a_long_prompt_that_progresses_is_not_starving() -> None:
    clock = FakeClock()
    s = make_sf(budget=8, max_wait_s=5.0, clock=clock)
    old = req("old", 20, 0)
    s.add(old)
    clock.advance(6.0)
    assert run_step(s) == [("old", 8, False)]  # given tokens now: no longer starving
    s.add(req("short", 3, 100))
    clock.advance(4.9)
    assert run_step(s) == [("short", 3, True), ("old", 5, False)]
    clock.advance(4.9)  # 9.8 s since it arrived, but tokens every step: not starving
    assert run_step(s) == [("short", 1, True), ("old", 7, True)]


def test_shortest_first_starvation_bound_on_a_fake_clock() -> None:
    # One 8-token prompt a second takes the whole budget or most of it, so old gets no
    # tokens after its first chunk. At exactly max_wait_s without tokens it goes first.
    clock = FakeClock()
    s = make_sf(budget=8, max_wait_s=5.0, seats=8, clock=clock)
    s.add(req("old", 20, 0))
    steps = [run_step(s)]
    for k in range(1, 8):
        clock.advance(1.0)
        s.add(req(f"p{k}", 8, 100 * k))
        steps.append(run_step(s))
    assert steps == [
        [("old", 8, False)],
        [("p1", 8, True)],
        [("p1", 1, True), ("p2", 7, False)],
        [("p1", 1, True), ("p2", 1, True), ("p3", 6, False)],
        [("p1", 1, True), ("p2", 1, True), ("p3", 2, True), ("p4", 4, False)],  # 4 s
        [("old", 8, False)],  # 5 s without tokens: it takes the budget
        [("p1", 1, True), ("p2", 1, True), ("p3", 1, True), ("old", 4, True),
         ("p4", 1, False)],  # then fewest tokens left first again
        [("old", 1, True), ("p1", 1, True), ("p2", 1, True), ("p3", 1, True),
         ("p4", 3, True), ("p5", 1, False)],
    ]  # fmt: skip


def test_shortest_first_passes_over_a_prompt_the_pool_cannot_take() -> None:
    # 4 usable blocks of 4 tokens: a 20-token prompt needs 5, a 6-token one 2.
    s = make_sf(num_blocks=5, budget=64, bs=4)
    s.add(req("big", 20, 0))
    s.add(req("small", 6, 100))
    assert run_step(s) == [("small", 6, True)]
    assert [r.request_id for r in s.waiting] == ["big"]


def test_shortest_first_preemption_spares_requests_already_in_the_step() -> None:
    # 4 usable blocks of 4 tokens. The old long prompt b is mid-prefill (2 blocks); the
    # young short a is admitted first (1 block), then b's next chunk needs 2 more blocks.
    # The youngest running request is a, but it is already in this step: b must go.
    s = make_sf(num_blocks=5, budget=8, bs=4)
    b = req("b", 16, 100)
    s.add(b)
    assert run_step(s) == [("b", 8, False)]
    a = req("a", 3, 0)
    s.add(a)
    out = s.schedule()
    assert [c.request.request_id for c in out.chunks] == ["a"]
    assert out.preempted == [b] and b.status is RequestStatus.PREEMPTED
    assert a.status is RequestStatus.RUNNING and s.running == [a]


def test_a_request_placed_again_keeps_its_age_and_is_not_the_first_victim() -> None:
    # Same pool as above. "old" arrives after "young" on this worker but first arrived
    # at the router long before it (a migration): it runs first and young is preempted.
    s = make(num_blocks=5, budget=64, bs=4)
    young, old = req("young", 8, 0), req("old", 8, 100)
    old.seniority -= 60.0
    s.add(young)
    s.add(old)
    assert [r for r, _, _ in run_step(s)] == ["young", "old"]  # admitted in queue order
    assert s.running == [old, young]  # ... but ordered by age
    out = s.schedule()
    assert [c.request.request_id for c in out.chunks] == ["old"]
    assert out.preempted == [young]


def test_requests_of_equal_age_keep_their_admission_order() -> None:
    s = make(budget=64)
    reqs = [req(f"r{i}", 2, 10 * i) for i in range(3)]
    for r in reqs:
        r.seniority = 5.0
        s.add(r)
    run_step(s)
    assert s.running == reqs
