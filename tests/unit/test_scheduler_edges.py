"""Scheduler edges the mutation run found untested: a request that preempts itself
keeps its place in the starvation order, a request the pool cannot take costs no
budget, migration, budgets far smaller than a prompt, and steps that preempt."""

from __future__ import annotations

from engine.block_pool import BlockPool
from engine.clock import FakeClock
from engine.config import SchedulerConfig
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler


def make(policy: str, num_blocks: int = 32, budget: int = 8, seats: int = 4,
         clock: FakeClock | None = None) -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks), 4)
    return Scheduler(SchedulerConfig(max_num_seqs=seats, max_num_batched_tokens=budget,
                                     policy=policy, max_wait_s=5.0), kv,
                     clock=clock or FakeClock())


def req(rid: str, n: int, base: int = 0) -> Request:
    return Request(rid, list(range(base, base + n)), SamplingParams(max_tokens=100))


def run_step(s: Scheduler) -> list[tuple[str, int, bool]]:
    out = s.schedule()
    s.update_after_step(out)
    for c in out.chunks:
        if c.samples:
            c.request.append_token(7)
    return [(c.request.request_id, c.num_tokens, c.samples) for c in out.chunks]


def test_a_request_that_preempts_itself_is_not_counted_as_served() -> None:
    # 4 usable blocks. b (16 tokens) holds 2 after its first chunk; a (3 tokens) is
    # admitted first next step, so b's next chunk finds 1 block for 2: b is the youngest
    # running request not in the step, so b itself goes.
    clock = FakeClock()
    s = make("shortest_first", num_blocks=5, clock=clock)
    b = req("b", 16, 100)
    s.add(b)
    assert run_step(s) == [("b", 8, False)]
    served_at = clock.now()
    clock.advance(3.0)
    s.add(req("a", 3, 0))
    out = s.schedule()
    assert out.preempted == [b] and [c.request.request_id for c in out.chunks] == ["a"]
    assert b.last_scheduled == served_at  # its wait goes on: it got nothing


def test_a_starving_prompt_the_pool_cannot_take_is_not_counted_as_served() -> None:
    clock = FakeClock()
    s = make("shortest_first", num_blocks=2, budget=6, clock=clock)  # 1 usable block
    big = req("big", 20, 0)  # its first chunk (6 tokens) needs 2 blocks: never fits
    s.add(big)
    added_at = clock.now()
    clock.advance(5.0)  # starving: it is looked at first, and passed over
    s.add(req("small", 3, 100))
    assert run_step(s) == [("small", 3, True)]
    assert big.last_scheduled == added_at and big.status is RequestStatus.WAITING


def test_fcfs_keeps_arrival_order_when_the_head_does_not_fit() -> None:
    s = make("fcfs", num_blocks=5, budget=64)
    s.add(req("big", 20, 0))
    s.add(req("small", 3, 100))
    assert run_step(s) == []  # small waits behind big: arrival order is kept
    assert [r.request_id for r in s.waiting] == ["big", "small"]


def test_migrate_takes_a_preempted_request_out_for_good() -> None:
    s = make("fcfs", num_blocks=5, budget=64)
    a, b = req("a", 8, 0), req("b", 8, 100)
    s.add(a)
    s.add(b)
    run_step(s)
    out = s.schedule()  # both need a 3rd block: b is preempted
    assert out.preempted == [b]
    s.migrate(b)
    assert b.status is RequestStatus.MIGRATED and b.finished
    assert list(s.waiting) == [] and s.running == [a]
    assert s.kv.block_table("b") == []


def test_a_budget_smaller_than_half_a_prompt_chunks_it_exactly() -> None:
    s = make("fcfs", budget=3)
    r = req("r", 8, 0)
    s.add(r)
    assert run_step(s) == [("r", 3, False)]
    assert run_step(s) == [("r", 3, False)]
    assert run_step(s) == [("r", 2, True)]  # the last chunk reaches the end: it samples
    assert r.num_computed_tokens == 8 and r.num_tokens == 9
    assert run_step(s) == [("r", 1, True)]
    assert s.kv.block_table("r") == [1, 2, 3]  # 9 tokens computed


def test_shortest_first_chunks_a_prompt_over_a_tiny_budget() -> None:
    s = make("shortest_first", budget=3)
    s.add(req("long", 7, 0))
    assert run_step(s) == [("long", 3, False)]
    s.add(req("short", 2, 100))
    assert run_step(s) == [("short", 2, True), ("long", 1, False)]
    assert run_step(s) == [("short", 1, True), ("long", 2, False)]
    assert run_step(s) == [("long", 1, True), ("short", 1, True)]  # a tie: running order


def test_nothing_is_admitted_in_a_step_that_preempted() -> None:
    for policy in ("fcfs", "shortest_first"):
        s = make(policy, num_blocks=5, budget=64)  # 4 usable blocks
        a, b = req("a", 8, 0), req("b", 8, 100)
        s.add(a)
        s.add(b)
        run_step(s)
        s.add(req("tiny", 1, 200))  # would fit after the preemption frees b's blocks
        out = s.schedule()
        assert out.preempted == [b], policy
        assert [c.request.request_id for c in out.chunks] == ["a"], policy
        assert [r.request_id for r in s.waiting] == ["b", "tiny"], policy


def test_seat_limit_counts_running_requests_under_shortest_first() -> None:
    s = make("shortest_first", budget=64, seats=2)
    for i, n in enumerate((3, 2, 1)):
        s.add(req(f"r{i}", n, 10 * i))
    assert [r for r, _, _ in run_step(s)] == ["r2", "r1"]
    assert [r.request_id for r in s.waiting] == ["r0"]
    # Still no seat for r0; a tie in length goes by running order, oldest first.
    assert run_step(s) == [("r1", 1, True), ("r2", 1, True)]


def test_fcfs_the_youngest_running_request_can_preempt_itself() -> None:
    # 4 usable blocks: a (6 tokens) and b (8 tokens) hold 2 each after prefill; a's next
    # token fits its 2nd block, b's needs a 3rd: b is the youngest not in the step.
    s = make("fcfs", num_blocks=5, budget=64)
    a, b = req("a", 6, 0), req("b", 8, 100)
    s.add(a)
    s.add(b)
    assert run_step(s) == [("a", 6, True), ("b", 8, True)]
    out = s.schedule()
    assert [c.request.request_id for c in out.chunks] == ["a"]
    assert out.preempted == [b] and s.running == [a]


def test_fcfs_admits_with_exactly_the_budget_running_requests_leave() -> None:
    s = make("fcfs", budget=8)
    s.add(req("a", 3, 0))
    run_step(s)  # a decodes from now on: 1 token a step
    s.add(req("b", 20, 100))
    assert run_step(s) == [("a", 1, True), ("b", 7, False)]
    s.add(req("c", 5, 200))
    assert run_step(s) == [("a", 1, True), ("b", 7, False)]  # no budget left for c
    assert [r.request_id for r in s.waiting] == ["c"]


def test_fcfs_admits_with_a_single_token_of_budget() -> None:
    s = make("fcfs", budget=8)
    s.add(req("a", 7, 0))
    s.add(req("b", 4, 100))
    assert run_step(s) == [("a", 7, True), ("b", 1, False)]


def test_fcfs_admits_one_token_prompts_and_keeps_going() -> None:
    s = make("fcfs", budget=8)
    s.add(req("a", 1, 0))
    s.add(req("b", 3, 100))
    assert run_step(s) == [("a", 1, True), ("b", 3, True)]


def test_fcfs_a_budget_smaller_than_the_batch_serves_the_oldest_exactly() -> None:
    s = make("fcfs", budget=3, seats=4)
    for i in range(4):
        s.add(req(f"r{i}", 1, 10 * i))
    assert run_step(s) == [("r0", 1, True), ("r1", 1, True), ("r2", 1, True)]
    # Three decoding, three tokens of budget: the last token of budget goes to r2, the
    # third running request, not to r3 waiting behind it.
    assert run_step(s) == [("r0", 1, True), ("r1", 1, True), ("r2", 1, True)]
    assert [r.request_id for r in s.waiting] == ["r3"]
