"""KV cache manager edges the mutation run found untested: the last-token rule for a
recomputed (preempted) request, partial blocks, chained hashes, counters, and pools
exactly too small once revived prefix blocks are counted."""

from __future__ import annotations

from engine.block_pool import BlockPool, hash_block_tokens
from engine.kv_cache_manager import KVCacheManager, PrefixHit
from engine.request import Request
from engine.sampling_params import SamplingParams

BS = 4


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4))


def compute(kv: KVCacheManager, r: Request) -> None:
    """Allocate and 'compute' all of r's tokens after a prefix lookup; index its blocks."""
    hit = kv.find_prefix(r)
    assert kv.allocate(r, r.num_tokens - hit.num_tokens, hit)
    r.num_computed_tokens = r.num_tokens
    kv.cache_computed_blocks(r)


def test_hashes_chain_each_block_to_its_parent() -> None:
    kv = KVCacheManager(BlockPool(8), BS)
    r = req("a", list(range(12)))
    compute(kv, r)
    h0 = hash_block_tokens(None, [0, 1, 2, 3])
    h1 = hash_block_tokens(h0, [4, 5, 6, 7])
    assert r.block_hashes == [h0, h1, hash_block_tokens(h1, [8, 9, 10, 11])]


def test_a_partial_last_block_is_never_hashed() -> None:
    pool = BlockPool(8)
    kv = KVCacheManager(pool, BS)
    a = req("a", list(range(7)))
    assert kv.find_prefix(a) == PrefixHit([], 0)
    assert len(a.block_hashes) == 1  # tokens 4..6 are not a block yet
    compute(kv, a)
    a.append_token(7)  # now the second block is full: its hash is of all four tokens
    kv.allocate(a, 1)
    a.num_computed_tokens = 8
    kv.cache_computed_blocks(a)
    kv.free(a)
    hit = kv.find_prefix(req("b", [*range(8), 50, 51]))
    assert hit == PrefixHit([1, 2], 8)  # under the full block's hash, not a partial one


def test_a_recomputed_request_still_computes_its_last_token() -> None:
    # A preempted request keeps the hashes of every block it had computed; its lookup
    # must still stop one token short, or nothing would produce its next logits.
    pool = BlockPool(8)
    kv = KVCacheManager(pool, BS)
    r = req("r", list(range(8)))
    compute(kv, r)
    assert len(r.block_hashes) == 2
    kv.free(r)
    r.num_computed_tokens = 0  # what preemption does
    hit = kv.find_prefix(r)
    assert hit.num_tokens == 4 and len(hit.block_ids) == 1


def test_a_request_with_kv_gets_no_lookup() -> None:
    kv = KVCacheManager(BlockPool(8), BS)
    compute(kv, req("a", list(range(9))))
    b = req("b", list(range(9)))
    b.num_computed_tokens = 1
    assert kv.find_prefix(b) == PrefixHit([], 0)
    assert kv.pool.prefix_queries == 1  # only a's lookup (a miss on its first block)


def test_lookups_without_prefix_caching_are_empty_lists() -> None:
    kv = KVCacheManager(BlockPool(8, enable_prefix_caching=False), BS)
    assert kv.find_prefix(req("a", list(range(9)))) == PrefixHit([], 0)


def test_counters_count_every_block_looked_up_and_found() -> None:
    pool = BlockPool(16)
    kv = KVCacheManager(pool, BS)
    compute(kv, req("a", list(range(12))))
    assert (pool.prefix_queries, pool.prefix_hits) == (1, 0)  # stops at the first miss
    compute(kv, req("b", [*range(8), 90, 91, 92, 93, 94]))
    assert (pool.prefix_queries, pool.prefix_hits) == (1 + 3, 2)  # 2 hits, then a miss


def pool_with_cached_prefix(num_blocks: int, others: int) -> tuple[KVCacheManager, list[int]]:
    """A pool whose blocks 1 2 hold a freed 8-token prefix (cached, ref_count 0) and
    where another request holds ``others`` blocks."""
    kv = KVCacheManager(BlockPool(num_blocks), BS)
    a = req("a", list(range(8)))
    assert kv.allocate(a, 8)
    a.num_computed_tokens = 8
    kv.cache_computed_blocks(a)
    kv.free(a)
    assert kv.allocate(req("other", [500] * (others * BS)), others * BS)
    return kv, kv.block_table("other")


def test_revived_prefix_blocks_count_against_the_free_blocks() -> None:
    # b = the cached 8 tokens + 3 more: revives 2 free blocks and needs 1 new one.
    kv, _ = pool_with_cached_prefix(num_blocks=6, others=2)  # free: 3 (2 cached)
    b = req("b", [*range(8), 9, 9, 9])
    hit = kv.find_prefix(b)
    assert hit.block_ids == [1, 2]
    assert kv.allocate(b, 3, hit)
    assert kv.block_table("b") == [1, 2, 5] and kv.pool.num_free_blocks == 0


def test_a_pool_one_block_short_once_revived_blocks_count_changes_nothing() -> None:
    kv, _ = pool_with_cached_prefix(num_blocks=6, others=3)  # free: 2, both cached
    b = req("b", [*range(8), 9, 9, 9])
    hit = kv.find_prefix(b)
    assert hit.block_ids == [1, 2]
    assert not kv.allocate(b, 3, hit)  # 1 new + 2 revived > 2 free
    assert kv.block_table("b") == [] and kv.pool.num_free_blocks == 2
    assert [kv.pool.blocks[i].ref_count for i in (1, 2)] == [0, 0]


def test_prefix_blocks_already_in_use_cost_nothing() -> None:
    kv = KVCacheManager(BlockPool(5), BS)  # 4 usable
    a = req("a", list(range(8)))
    compute(kv, a)  # blocks 1 2, still running
    assert kv.allocate(req("other", [500] * 4), 4)  # block 3
    b = req("b", [*range(8), 9])
    hit = kv.find_prefix(b)
    assert kv.allocate(b, 1, hit)  # exactly the one free block: shared ones are free
    assert kv.block_table("b") == [1, 2, 4]
    assert kv.pool.blocks[1].ref_count == 2
