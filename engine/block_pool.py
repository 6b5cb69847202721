"""Logical KV blocks: ref counts, a free list in eviction order, and the prefix cache.

Plain Python, no tensors (the tensors live in the model runner's cache, see kv_layout).

Block states::

    in use      ref_count > 0, not in the free list
    free        ref_count == 0, in the free list; if it has a hash, it is also a cached
                prefix block that a later request may revive (a "hit") until evicted

The free list is ordered for eviction: new allocations take from the front (least
recently freed first), freed blocks join the back. Block 0 is the null block: never
allocated, never freed, used to pad block tables.

Ownership: whoever gets a block from ``get_new_blocks`` or ``touch`` holds one
reference and must give it back with ``free_blocks`` exactly once.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

NULL_BLOCK = 0
BlockHash = int


class NoFreeBlocksError(RuntimeError):
    """Asked for more blocks than are free (callers check num_free_blocks first)."""


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None  # set once the block is full and cached


def hash_block_tokens(parent: BlockHash | None, tokens: Sequence[int]) -> BlockHash:
    """Chained hash: a block's identity is its tokens *and* everything before them.

    128-bit BLAKE2b rather than Python's hash(): stable across processes (the router
    computes the same hashes for prefix-affinity routing) and collisions, which would
    silently serve another prompt's KV, are out of reach.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update((parent or 0).to_bytes(16, "little"))
    h.update(array("q", tokens).tobytes())
    return int.from_bytes(h.digest(), "little")


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError("a block pool needs the null block and at least one more")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.blocks[NULL_BLOCK].ref_count = 1  # pinned forever
        # Insertion order is eviction order; values unused.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self._cached: dict[BlockHash, int] = {}
        self.prefix_queries = 0  # blocks looked up
        self.prefix_hits = 0  # blocks found
        # Called with (block id, hash) of the indexed prefix blocks get_new_blocks evicts,
        # before their contents are overwritten (engine.kv_spill keeps them).
        self.on_evict: Callable[[list[tuple[int, BlockHash]]], None] | None = None

    # -- queries ---------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, including evictable cached ones)."""
        return len(self._free)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def usage(self) -> float:
        """Fraction of usable blocks held by requests (cached-but-free blocks count free)."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def free_block_ids(self) -> list[int]:
        """Free list in eviction order (front = evicted first); for tests and debugging."""
        return list(self._free)

    def cached_index(self) -> dict[BlockHash, int]:
        """A copy of the prefix-cache index (hash -> block id); for audits and tests."""
        return dict(self._cached)

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._cached.get(block_hash) if self.enable_prefix_caching else None

    # -- allocation ------------------------------------------------------------------
    def get_new_blocks(self, n: int) -> list[int]:
        """Take n blocks from the front of the free list (evicting their cached hashes)."""
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        out = []
        evicted: list[tuple[int, BlockHash]] = []
        for _ in range(n):
            bid, _ = self._free.popitem(last=False)
            blk = self.blocks[bid]
            if blk.block_hash is not None:  # evict from the prefix cache
                if self._cached.get(blk.block_hash) == bid:
                    del self._cached[blk.block_hash]
                    evicted.append((bid, blk.block_hash))
                blk.block_hash = None
            blk.ref_count = 1
            out.append(bid)
        if evicted and self.on_evict is not None:
            self.on_evict(evicted)
        return out

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cached blocks (a prefix hit); revives free ones."""
        for bid in block_ids:
            blk = self.blocks[bid]
            if blk.ref_count == 0:
                del self._free[bid]
            blk.ref_count += 1

    def free_blocks(self, block_ids: Iterable[int]) -> None:
        """Drop one reference each; blocks reaching zero join the back of the free list.

        Callers pass a request's blocks tail first, so that a sequence's last blocks
        (least likely to be shared as a prefix) are evicted before its first ones.
        """
        for bid in block_ids:
            if bid == NULL_BLOCK:
                continue
            blk = self.blocks[bid]
            if blk.ref_count <= 0:
                raise RuntimeError(f"block {bid} freed more often than it was taken")
            blk.ref_count -= 1
            if blk.ref_count == 0:
                self._free[bid] = None

    def cache_block(self, block_id: int, block_hash: BlockHash) -> None:
        """Register a full block under its chained hash so later prompts can reuse it."""
        if not self.enable_prefix_caching:
            return
        blk = self.blocks[block_id]
        if blk.block_hash is not None:
            return
        blk.block_hash = block_hash
        # First writer wins: a duplicate block stays private and is simply not indexed.
        self._cached.setdefault(block_hash, block_id)

    def uncache(self, block_id: int) -> None:
        """Forget a block's prefix-cache entry (its KV is suspect: a request failed)."""
        blk = self.blocks[block_id]
        if blk.block_hash is None:
            return
        if self._cached.get(blk.block_hash) == block_id:
            del self._cached[blk.block_hash]
        blk.block_hash = None

    def reset_prefix_cache(self) -> None:
        for bid in list(self._cached.values()):
            self.blocks[bid].block_hash = None
        self._cached.clear()
