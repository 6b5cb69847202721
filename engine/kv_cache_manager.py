"""Block tables per request on top of the BlockPool, with prefix-cache lookups.

Token regions of a request with block_size 4 (``|`` marks block boundaries)::

    token_ids:     | t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 .. .. |
    computed:      |<------------- num_computed ---->|
    hashed/cached: |<------ full, computed ------>|
    this step:                                   |<-n->|

Block tables are append-only while a request runs. A request's blocks are freed when it
finishes, is aborted or is preempted; the caller decides when (see Scheduler).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from engine.block_pool import BlockHash, BlockPool, hash_block_tokens
from engine.config import cdiv
from engine.request import Request

if TYPE_CHECKING:
    from engine.kv_spill import KVSpillTier


class PrefixHit(NamedTuple):
    """Pool blocks to revive, then spilled blocks to restore (engine.kv_spill);
    ``num_tokens`` covers both."""

    block_ids: list[int]
    num_tokens: int
    restore: tuple[BlockHash, ...] = ()


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int,
                 spill: KVSpillTier | None = None) -> None:
        self.pool = pool
        self.block_size = block_size
        self.req_blocks: dict[str, list[int]] = {}
        self.spill = spill  # the prefix cache's second tier, or None
        if spill is not None:
            pool.on_evict = spill.spill

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix, in the pool and in the spill tier: after it, no
        prompt hits (what a benchmark's cold run needs; a pool-only reset would let the
        spill tier bring the prefixes back)."""
        self.pool.reset_prefix_cache()
        if self.spill is not None:
            self.spill.clear()

    def block_table(self, request_id: str) -> list[int]:
        return self.req_blocks.get(request_id, [])

    def num_blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def find_prefix(self, req: Request) -> PrefixHit:
        """Longest cached prefix of a request with no KV yet, as whole blocks.

        At most ``num_tokens - 1`` tokens may hit: the last token must be computed to
        produce logits.
        """
        if not self.pool.enable_prefix_caching or req.num_computed_tokens:
            return PrefixHit([], 0)
        self._update_hashes(req, req.num_tokens - 1)
        hashes = req.block_hashes[: (req.num_tokens - 1) // self.block_size]
        hits: list[int] = []
        for h in hashes:
            self.pool.prefix_queries += 1
            bid = self.pool.lookup(h)
            if bid is None:
                break
            self.pool.prefix_hits += 1
            hits.append(bid)
        restore: tuple[BlockHash, ...] = ()
        if self.spill is not None and len(hits) < len(hashes):
            restore = tuple(self.spill.longest_run(hashes[len(hits):]))
        return PrefixHit(hits, (len(hits) + len(restore)) * self.block_size, restore)

    def allocate(self, req: Request, num_new_tokens: int, hit: PrefixHit | None = None) -> bool:
        """Make room for ``num_new_tokens`` more tokens (after the prefix hit, if any).

        Returns False, changing nothing, when the pool cannot supply the blocks.
        """
        blocks = self.req_blocks.get(req.request_id, [])
        hit_ids = hit.block_ids if hit else []
        total = req.num_computed_tokens + (hit.num_tokens if hit else 0) + num_new_tokens
        need = self.num_blocks_needed(total) - len(blocks) - len(hit_ids)
        # Reviving a free cached block takes it off the free list too.
        revived = sum(1 for b in hit_ids if self.pool.blocks[b].ref_count == 0)
        if need + revived > self.pool.num_free_blocks:
            return False
        self.pool.touch(hit_ids)
        restore = hit.restore if hit else ()
        # Taken before allocating: the new blocks' evictions spill into the tier too.
        entries = self.spill.take(restore) if self.spill is not None and restore else []
        new = self.pool.get_new_blocks(max(need, 0))
        if restore:
            # need counts these: the hit's tokens include them, its block ids do not.
            assert self.spill is not None
            self.spill.restore(new[: len(restore)], entries)
            for bid, h in zip(new, restore, strict=False):
                self.pool.cache_block(bid, h)
        self.req_blocks[req.request_id] = blocks + hit_ids + new
        return True

    def cache_computed_blocks(self, req: Request) -> None:
        """Index the request's full, computed blocks in the prefix cache."""
        if not self.pool.enable_prefix_caching:
            return
        n_full = req.num_computed_tokens // self.block_size
        self._update_hashes(req, n_full * self.block_size)
        blocks = self.req_blocks[req.request_id]
        for i in range(n_full):
            self.pool.cache_block(blocks[i], req.block_hashes[i])

    def free(self, req: Request, *, discard: bool = False) -> None:
        """Return all of a request's blocks to the pool, tail first (evicted first).

        ``discard``: the request failed and its KV may be garbage, so the blocks only it
        holds leave the prefix cache too. Blocks other requests also hold are kept: they
        were computed by whichever request cached them first, and serve those requests.
        """
        blocks = self.req_blocks.pop(req.request_id, [])
        if discard:
            for bid in blocks:
                if self.pool.blocks[bid].ref_count == 1:
                    self.pool.uncache(bid)
        self.pool.free_blocks(reversed(blocks))

    def _update_hashes(self, req: Request, upto_tokens: int) -> None:
        bs = self.block_size
        hashes = req.block_hashes
        for i in range(len(hashes), upto_tokens // bs):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent, req.token_ids[i * bs : (i + 1) * bs]))
