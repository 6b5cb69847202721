"""Block pool edges the mutation run found untested: the hash's exact bytes, pool-size
limits, usage, the null block in a free list, and hashes cleared on eviction."""

from __future__ import annotations

import pytest

from engine.block_pool import NULL_BLOCK, BlockPool, NoFreeBlocksError, hash_block_tokens

HASH_OF_MINUS_ONE = 304722905723479072097853948746032716701  # hash of [-1, 2**40]


def test_block_hash_is_pinned() -> None:
    # The router and every worker compute these independently (prefix-affinity routing),
    # possibly from different releases: the bytes hashed must never drift.
    root = hash_block_tokens(None, [1, 2, 3])
    assert root == 130008772778334795783778455270116877856
    assert hash_block_tokens(root, [4, 5, 6]) == 210881119078708530898722437469373047359
    assert hash_block_tokens(None, []) == 117322466856742618682014964965575834438
    # Signed 64-bit items: any id a tokenizer could produce hashes the same everywhere.
    assert hash_block_tokens(None, [-1, 2**40]) == HASH_OF_MINUS_ONE


def test_smallest_pool_is_the_null_block_and_one_more() -> None:
    pool = BlockPool(2)
    assert pool.num_usable_blocks == 1 and pool.get_new_blocks(1) == [1]
    with pytest.raises(ValueError) as e:
        BlockPool(1)
    assert str(e.value) == "a block pool needs the null block and at least one more"


def test_usage_counts_held_blocks_only() -> None:
    pool = BlockPool(5)  # 4 usable
    assert pool.usage() == 0.0
    (b,) = pool.get_new_blocks(1)
    assert pool.usage() == 0.25
    pool.cache_block(b, 99)
    pool.free_blocks([b])  # cached but free: not in use
    assert pool.usage() == 0.0


def test_errors_say_how_many() -> None:
    pool = BlockPool(3)
    with pytest.raises(NoFreeBlocksError, match="asked for 3 blocks, 2 free"):
        pool.get_new_blocks(3)
    (b,) = pool.get_new_blocks(1)
    pool.free_blocks([b])
    with pytest.raises(RuntimeError, match=f"block {b} freed more often than it was taken"):
        pool.free_blocks([b])


def test_the_null_block_in_a_free_list_is_skipped_not_a_stop() -> None:
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    pool.free_blocks([NULL_BLOCK, b, NULL_BLOCK, a])
    assert pool.free_block_ids() == [3, b, a]
    assert pool.blocks[NULL_BLOCK].ref_count == 1


def test_eviction_and_uncache_clear_the_hash() -> None:
    pool = BlockPool(3)
    a, b = pool.get_new_blocks(2)
    pool.cache_block(a, 11)
    pool.cache_block(b, 22)
    pool.uncache(b)
    assert pool.blocks[b].block_hash is None and pool.lookup(22) is None
    pool.uncache(b)  # nothing left to forget
    pool.free_blocks([a, b])
    assert pool.get_new_blocks(1) == [a]  # evicted: its hash goes with it
    assert pool.blocks[a].block_hash is None and pool.lookup(11) is None
    assert pool.cached_index() == {}


def test_uncache_keeps_the_index_of_a_duplicates_original() -> None:
    pool = BlockPool(3)
    a, b = pool.get_new_blocks(2)
    pool.cache_block(a, 5)
    pool.cache_block(b, 5)  # a duplicate: hashed, not indexed
    pool.uncache(b)
    assert pool.lookup(5) == a and pool.blocks[a].block_hash == 5


def test_reset_prefix_cache_forgets_every_hash() -> None:
    pool = BlockPool(4)
    ids = pool.get_new_blocks(3)
    for i, bid in enumerate(ids):
        pool.cache_block(bid, 100 + i)
    pool.free_blocks(ids[:2])
    pool.reset_prefix_cache()
    assert pool.cached_index() == {}
    assert all(pool.blocks[b].block_hash is None for b in ids)
    assert all(pool.lookup(100 + i) is None for i in range(3))
    pool.cache_block(ids[2], 7)  # a block may be cached again after a reset
    assert pool.lookup(7) == ids[2]


def test_caching_twice_keeps_the_first_hash() -> None:
    pool = BlockPool(3)
    (a,) = pool.get_new_blocks(1)
    pool.cache_block(a, 1)
    pool.cache_block(a, 2)
    assert pool.blocks[a].block_hash == 1 and pool.lookup(2) is None


def test_caching_off_indexes_nothing() -> None:
    pool = BlockPool(3, enable_prefix_caching=False)
    (a,) = pool.get_new_blocks(1)
    pool.cache_block(a, 1)
    assert pool.blocks[a].block_hash is None and pool.cached_index() == {}
