"""Block pool and KV cache manager: exact block ids, eviction order, prefix hits."""

from __future__ import annotations

import pytest

from engine.block_pool import NULL_BLOCK, BlockPool, NoFreeBlocksError, hash_block_tokens
from engine.kv_cache_manager import KVCacheManager, PrefixHit
from engine.request import Request
from engine.sampling_params import SamplingParams


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4))


def test_allocation_order_and_null_block() -> None:
    pool = BlockPool(6)
    assert pool.num_free_blocks == 5
    assert pool.get_new_blocks(3) == [1, 2, 3]
    assert NULL_BLOCK not in pool.free_block_ids()
    assert pool.get_new_blocks(2) == [4, 5]
    with pytest.raises(NoFreeBlocksError):
        pool.get_new_blocks(1)


def test_free_appends_in_given_order_and_is_reused_lru() -> None:
    pool = BlockPool(6)
    a = pool.get_new_blocks(2)  # [1, 2]
    b = pool.get_new_blocks(2)  # [3, 4]
    pool.free_blocks(reversed(a))  # tail first: 2 then 1
    assert pool.free_block_ids() == [5, 2, 1]
    pool.free_blocks(reversed(b))
    assert pool.free_block_ids() == [5, 2, 1, 4, 3]
    assert pool.get_new_blocks(3) == [5, 2, 1]


def test_double_free_is_an_error() -> None:
    pool = BlockPool(4)
    (b,) = pool.get_new_blocks(1)
    pool.free_blocks([b])
    with pytest.raises(RuntimeError):
        pool.free_blocks([b])


def test_chained_hash_depends_on_prefix() -> None:
    h1 = hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(h1, [3, 4]) != hash_block_tokens(hash_block_tokens(None, [9, 9]),
                                                              [3, 4])
    assert hash_block_tokens(None, [1, 2]) == h1  # stable


def test_prefix_hit_revives_cached_free_blocks_and_eviction_clears_them() -> None:
    pool = BlockPool(8)
    kv = KVCacheManager(pool, block_size=4)
    a = req("a", list(range(10)))  # 2 full blocks + 2 tokens
    assert kv.find_prefix(a).num_tokens == 0
    assert kv.allocate(a, 10)
    assert kv.block_table("a") == [1, 2, 3]
    a.num_computed_tokens = 10
    kv.cache_computed_blocks(a)
    kv.free(a)
    assert pool.free_block_ids() == [4, 5, 6, 7, 3, 2, 1]

    b = req("b", [*range(8), 42, 43, 44])  # shares the two full blocks
    hit = kv.find_prefix(b)
    assert hit == PrefixHit([1, 2], 8)  # nothing to restore: no spill tier
    assert kv.allocate(b, 3, hit)
    assert kv.block_table("b") == [1, 2, 4]
    assert pool.blocks[1].ref_count == 1
    assert pool.free_block_ids() == [5, 6, 7, 3]

    # Evicting cached block 3 (a's partial tail, never cached) is harmless; block 1 stays.
    c = req("c", list(range(100, 116)))
    assert kv.allocate(c, 16)
    assert kv.block_table("c") == [5, 6, 7, 3]
    assert pool.num_free_blocks == 0
    assert not kv.allocate(req("d", [1]), 1)  # nothing left, nothing changed
    assert "d" not in kv.req_blocks


def test_full_prompt_hit_leaves_last_token_to_compute() -> None:
    pool = BlockPool(8)
    kv = KVCacheManager(pool, block_size=4)
    a = req("a", list(range(8)))
    assert kv.allocate(a, 8)
    a.num_computed_tokens = 8
    kv.cache_computed_blocks(a)
    b = req("b", list(range(8)))
    hit = kv.find_prefix(b)
    assert hit.num_tokens == 4  # not 8: the last token must produce logits
    assert pool.prefix_queries == 1 and pool.prefix_hits == 1


def test_evicted_hash_is_no_longer_a_hit() -> None:
    pool = BlockPool(3)  # 2 usable
    kv = KVCacheManager(pool, block_size=2)
    a = req("a", [1, 2, 3])
    assert kv.allocate(a, 3)
    a.num_computed_tokens = 3
    kv.cache_computed_blocks(a)
    kv.free(a)
    other = req("o", [7, 7, 7, 7])
    assert kv.allocate(other, 4)  # takes both blocks, evicting a's cached block
    kv.free(other)
    assert kv.find_prefix(req("b", [1, 2, 3])).num_tokens == 0


def test_prefix_caching_off() -> None:
    pool = BlockPool(8, enable_prefix_caching=False)
    kv = KVCacheManager(pool, block_size=4)
    a = req("a", list(range(9)))
    assert kv.allocate(a, 9)
    a.num_computed_tokens = 9
    kv.cache_computed_blocks(a)
    kv.free(a)
    assert kv.find_prefix(req("b", list(range(9)))).num_tokens == 0
