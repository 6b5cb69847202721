"""The block ledger: exact per-owner counts, and each broken invariant is caught.

The first half builds pools and tables by hand (and breaks them on purpose); the
second drives a real engine (random tiny weights, CPU) through every stage a request
can be aborted at and checks the counts and the audit after each.
"""

from __future__ import annotations

import pytest

from engine.block_ledger import BlockAccountingError, build_ledger
from engine.block_pool import BlockPool
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.kv_cache_manager import KVCacheManager
from engine.llm_engine import LLMEngine
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams

BS = 4


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4))


def computed(kv: KVCacheManager, r: Request, hit_tokens: int = 0) -> None:
    """Allocate all of r's tokens after a prefix lookup, as if computed and cached."""
    hit = kv.find_prefix(r)
    assert hit.num_tokens == hit_tokens
    assert kv.allocate(r, r.num_tokens - hit.num_tokens, hit)
    r.num_computed_tokens = r.num_tokens
    kv.cache_computed_blocks(r)


def counts(pool: BlockPool, kv: KVCacheManager, owners: dict[str, str]) -> dict[str, int]:
    ledger = build_ledger(pool, kv.req_blocks, owners)
    assert ledger.violations == []
    assert sum(ledger.counts.values()) == pool.num_usable_blocks
    return ledger.counts


def test_shared_prefix_blocks_count_once_under_the_strongest_owner() -> None:
    pool = BlockPool(12)
    kv = KVCacheManager(pool, BS)
    a, b, c = req("a", list(range(10))), req("b", list(range(9))), req("c", [50] * 6)
    computed(kv, a)  # blocks 1 2 3: two full (cached), one partial
    computed(kv, b, hit_tokens=8)  # shares 1 2, gets 4
    computed(kv, c)  # 5 6
    owners = {"a": "transfer", "b": "running", "c": "reserved"}
    assert counts(pool, kv, owners) == {"running": 3, "reserved": 2, "transfer": 1,
                                        "cached": 0, "free": 5}
    kv.free(b)  # 1 2 stay a's; 4 had no full block to cache
    assert counts(pool, kv, {"a": "transfer", "c": "reserved"}) == {
        "running": 0, "reserved": 2, "transfer": 3, "cached": 0, "free": 6}
    kv.free(a)  # its two full blocks stay in the prefix cache
    assert counts(pool, kv, {"c": "reserved"}) == {
        "running": 0, "reserved": 2, "transfer": 0, "cached": 2, "free": 7}
    pool.get_new_blocks(9)  # evicts everything on the free list
    # the 9 new blocks are owned by nobody's table: ref counts say 1, tables say 0
    assert len(build_ledger(pool, kv.req_blocks, {"c": "reserved"}).violations) == 9


def test_a_duplicate_full_block_is_not_a_cache_entry() -> None:
    pool = BlockPool(8)
    kv = KVCacheManager(pool, BS)
    a, b = req("a", list(range(8))), req("b", list(range(8)))
    computed(kv, a)
    # b allocated before a's blocks were cached: computes its own copy of both
    assert kv.allocate(b, 8)
    b.num_computed_tokens = 8
    kv.cache_computed_blocks(b)  # hashes set, index keeps a's (first writer wins)
    kv.free(a)
    kv.free(b)
    assert counts(pool, kv, {}) == {"running": 0, "reserved": 0, "transfer": 0,
                                    "cached": 2, "free": 5}


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda pool, kv: setattr(pool.blocks[2], "ref_count", 2), "ref_count 2 but 1"),
        (lambda pool, kv: pool.free_blocks([2]), "ref_count 0 but 1"),
        (lambda pool, kv: pool.free_blocks([2]), "block 2 is on the free list and in a"),
        (lambda pool, kv: kv.req_blocks.__setitem__("ghost", []), "'ghost' holds blocks"),
        (lambda pool, kv: kv.req_blocks["a"].append(1), "names a block twice"),
        (lambda pool, kv: kv.req_blocks["a"].append(0), "null block"),
        (lambda pool, kv: kv.req_blocks["a"].append(99), "outside the pool: [99]"),
        (lambda pool, kv: setattr(pool.blocks[0], "ref_count", 0), "null block is not"),
        (lambda pool, kv: setattr(pool.blocks[1], "block_hash", 7), "hash differs"),
        (lambda pool, kv: pool.get_new_blocks(1), "block 4: ref_count 1 but 0"),
    ],
)  # fmt: skip
def test_each_broken_invariant_is_reported(corrupt, message: str) -> None:  # type: ignore[no-untyped-def]
    pool = BlockPool(8)
    kv = KVCacheManager(pool, BS)
    computed(kv, req("a", list(range(12))))  # blocks 1 2 3
    assert build_ledger(pool, kv.req_blocks, {"a": "running"}).violations == []
    corrupt(pool, kv)
    ledger = build_ledger(pool, kv.req_blocks, {"a": "running"})
    assert any(message in v for v in ledger.violations), ledger.violations
    with pytest.raises(BlockAccountingError):
        ledger.check()


# -- a real engine, aborted at every stage ---------------------------------------------
PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def engine(num_blocks: int = 17, budget: int = 8) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model="dummy:tiny-llama3",
        cache=CacheConfig(block_size=BS, num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=4)))


def blocks(e: LLMEngine) -> tuple[int, int, int, int, int]:
    """(running, reserved, transfer, cached, free) after an audit that must pass."""
    e.audit()
    s = e.pool_state()
    assert s["violations"] == 0
    out = tuple(s[f"blocks_{o}"] for o in ("running", "reserved", "transfer", "cached", "free"))
    assert sum(out) == s["usable"] == 16
    assert s["free"] == out[3] + out[4]  # allocatable = cached + free
    assert s["used"] == out[0] + out[1] + out[2]
    return out  # type: ignore[return-value]


def prompt(n: int, base: int = 10) -> list[int]:
    return list(range(base, base + n))


def test_abort_while_waiting() -> None:
    e = engine()
    e.add_request(prompt(10), PARAMS, "w")
    assert blocks(e) == (0, 0, 0, 0, 16)
    out = e.abort("w")
    assert out is not None and out.finish_reason == "abort"
    assert blocks(e) == (0, 0, 0, 0, 16)


def test_abort_mid_prefill_keeps_the_finished_chunk_cached() -> None:
    e = engine(budget=8)
    e.add_request(prompt(20), PARAMS, "p")
    assert e.step() == []  # 8 of 20 tokens: two full blocks, no token yet
    assert blocks(e) == (2, 0, 0, 0, 14)
    e.abort("p")
    assert blocks(e) == (0, 0, 0, 2, 14)


def test_abort_while_decoding() -> None:
    e = engine(budget=64)
    e.add_request(prompt(10), PARAMS, "d")
    e.step()  # prefill 10 tokens (3 blocks) and sample the 11th
    e.step()
    e.step()  # 12 tokens computed: still 3 blocks
    assert blocks(e) == (3, 0, 0, 0, 13)
    e.step()  # the 13th token's KV needs a 4th block
    assert blocks(e) == (4, 0, 0, 0, 12)
    e.abort("d")
    assert blocks(e) == (0, 0, 0, 3, 13)  # 13 computed tokens: 3 full blocks cached


def test_abort_a_preempted_request() -> None:
    # 16 usable blocks; two 32-token prompts fill 8 each, so decoding preempts one.
    e = engine(num_blocks=17, budget=64)
    e.add_request(prompt(32, 10), PARAMS, "old")
    e.add_request(prompt(32, 100), PARAMS, "young")
    e.step()
    assert blocks(e) == (16, 0, 0, 0, 0)
    e.step()  # both need a 9th block: the youngest goes back to the queue, its 8 full
    # blocks cached; old's 9th evicts the first of them (young's tail block)
    young = e.requests["young"]
    assert young.status is RequestStatus.PREEMPTED and e.kv.block_table("young") == []
    assert blocks(e) == (9, 0, 0, 7, 0)
    e.abort("young")
    assert blocks(e) == (9, 0, 0, 7, 0)
    assert e.requests["old"].status is RequestStatus.RUNNING


def test_abort_a_reservation_and_start_another() -> None:
    e = engine()
    assert e.reserve(prompt(10), PARAMS, "r1") == [1, 2, 3]
    assert e.reserve(prompt(6, 200), PARAMS, "r2") == [4, 5]
    assert blocks(e) == (0, 5, 0, 0, 11)
    e.abort("r1")
    assert blocks(e) == (0, 2, 0, 0, 14)  # nothing computed here: nothing cached
    assert e.start_prefilled("r2", first_token=7) is None
    assert blocks(e) == (2, 0, 0, 0, 14)  # its full block is indexed, but in use
    assert e.pool.lookup(e.requests["r2"].block_hashes[0]) == 4
    e.step()
    assert blocks(e) == (2, 0, 0, 0, 14)
    e.abort("r2")
    assert blocks(e) == (0, 0, 0, 1, 15)


def test_held_blocks_are_transfer_until_released_or_aborted() -> None:
    e = engine(budget=64)
    one = SamplingParams(temperature=0.0, max_tokens=1)
    e.add_request(prompt(10), one, "h1", hold_blocks=True)
    e.add_request(prompt(9, 300), one, "h2", hold_blocks=True)
    outs = e.step()
    assert [o.finish_reason for o in outs] == ["length", "length"]
    assert blocks(e) == (0, 0, 6, 0, 10)
    assert e.abort("h1") is None  # finished already: the abort releases its blocks
    assert blocks(e) == (0, 0, 3, 2, 11)
    e.release("h2")
    assert blocks(e) == (0, 0, 0, 4, 12)
    assert e.pool_state()["held"] == 0


def test_a_shared_prefix_counts_once() -> None:
    e = engine(budget=64)
    e.add_request(prompt(12), PARAMS, "a")
    e.step()  # a: 12 computed, blocks 1 2 3 full and cached
    e.add_request(prompt(12), PARAMS, "b")
    e.step()  # b hits 8 tokens (1 2) and computes the rest in 5; a's 13th token takes 4
    assert e.kv.block_table("a") == [1, 2, 3, 4]
    assert e.kv.block_table("b") == [1, 2, 5]
    assert e.pool.blocks[1].ref_count == e.pool.blocks[2].ref_count == 2
    assert blocks(e) == (5, 0, 0, 0, 11)


def test_a_failed_request_leaves_nothing_behind() -> None:
    e = engine(budget=64)
    e.add_request(prompt(12), PARAMS, "ok")
    e.add_request(prompt(12, 300), PARAMS, "bad")
    e.step()
    out = e.abort("bad", error="injected")
    assert out is not None and out.finish_reason == "error" and out.error == "injected"
    # bad's 3 full blocks left the prefix cache with it (an abort would keep them)
    assert blocks(e) == (3, 0, 0, 0, 13)
    assert e.pool.cached_index().keys() == set(e.requests["ok"].block_hashes)
    assert e.pool.lookup(e.requests["ok"].block_hashes[0]) is not None


def test_audit_names_a_request_in_two_places() -> None:
    e = engine()
    e.add_request(prompt(5), PARAMS, "x")
    e.held["x"] = e.requests["x"]
    with pytest.raises(BlockAccountingError, match="both in flight and held"):
        e.audit()
    assert e.pool_state()["violations"] == 1
