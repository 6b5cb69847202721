"""The prefix cache's second tier: KV blocks evicted from the pool, kept in host memory.

When the pool hands out a free block that still holds a cached prefix
(``BlockPool.get_new_blocks`` evicts it), its contents are copied here under its hash
before anything overwrites them. A later prompt whose prefix runs on past the pool's
hits into this tier gets those blocks back -- new pool blocks, written from here and
indexed under their hashes -- instead of recomputing them::

    prompt blocks:  | h0 | h1 | h2 | h3 | h4 | ...
    pool index:     | hit| hit|miss
    spill tier:               | hit| hit|miss        -> h2, h3 restored, h4.. computed

Exclusive and LRU: a restored block leaves the tier (it is a pool block again, and
comes back here if evicted again); when the tier is over its byte bound, the block
spilled longest ago is dropped for good.

Blocks move through the same gather/scatter as KV transfers (the engine's
``read``/``write`` callables), so a quantized pool's rows carry their scales here and
back (kernels.kv_quant). The tier stores them through a SpillCodec (engine.kv_spill_codec):
as they are, or, for a float pool on CPU, as int8 rows -- about a quarter of fp32.

Ownership: the tier owns its host copies and nothing else. Its blocks are not pool
blocks: the block ledger never counts them (pool_state reports them apart, as
"spill_blocks"). Single-threaded, like the engine that drives it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.block_pool import BlockHash
from engine.config import CacheConfig
from engine.kv_layout import KVLayout
from engine.kv_spill_codec import SpillCodec, resolve_spill_dtype

ReadBlocks = Callable[[list[int]], torch.Tensor]  # block ids -> (n, *block_shape)
WriteBlocks = Callable[[list[int], torch.Tensor], None]


@dataclass
class SpillCounters:
    """Since the engine started. Blocks and bytes as the tier stores them (encoded)."""

    queries: int = 0  # blocks looked up here (after a miss in the pool)
    hits: int = 0  # blocks found here
    spilled_blocks: int = 0
    spilled_bytes: int = 0
    restored_blocks: int = 0
    restored_bytes: int = 0
    dropped_blocks: int = 0  # pushed out by the byte bound (LRU)


class KVSpillTier:
    """A bounded LRU map of block hash -> encoded block contents in host memory."""

    def __init__(self, capacity_bytes: int, codec: SpillCodec, read: ReadBlocks,
                 write: WriteBlocks) -> None:
        if capacity_bytes <= 0:
            raise ValueError("a spill tier needs capacity_bytes > 0")
        self.capacity_bytes = capacity_bytes
        self.codec = codec
        self._read = read
        self._write = write
        self._entries: OrderedDict[BlockHash, torch.Tensor] = OrderedDict()  # oldest first
        self.bytes_used = 0
        self.counters = SpillCounters()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._entries

    def hashes(self) -> list[BlockHash]:
        """Entries in eviction order (first dropped first); for tests and audits."""
        return list(self._entries)

    # -- pool -> tier ------------------------------------------------------------------
    def spill(self, evicted: Sequence[tuple[int, BlockHash]]) -> None:
        """Copy evicted pool blocks here (their contents are still intact: the pool calls
        this before handing the blocks out). The pool's eviction hook."""
        if not evicted:
            return
        blocks = self._read([bid for bid, _ in evicted])  # (n, *block_shape) on the pool's device
        for (_, block_hash), entry in zip(evicted, self.codec.encode(blocks), strict=True):
            self._put(block_hash, entry)

    def _put(self, block_hash: BlockHash, entry: torch.Tensor) -> None:
        size = entry.nbytes
        if size > self.capacity_bytes:
            return  # one block larger than the whole tier: nothing to keep
        old = self._entries.pop(block_hash, None)
        if old is not None:
            self.bytes_used -= old.nbytes
        self._entries[block_hash] = entry
        self.bytes_used += size
        self.counters.spilled_blocks += 1
        self.counters.spilled_bytes += size
        while self.bytes_used > self.capacity_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.bytes_used -= dropped.nbytes
            self.counters.dropped_blocks += 1

    # -- tier -> pool ------------------------------------------------------------------
    def longest_run(self, hashes: Sequence[BlockHash]) -> list[BlockHash]:
        """The leading hashes found here, up to the first miss (a prefix lookup)."""
        run: list[BlockHash] = []
        for h in hashes:
            self.counters.queries += 1
            if h not in self._entries:
                break
            self.counters.hits += 1
            run.append(h)
        return run

    def take(self, hashes: Sequence[BlockHash]) -> list[torch.Tensor]:
        """Remove these entries (all present: a lookup just found them) and return them,
        before the pool allocates their new blocks (which may spill more blocks here and
        would otherwise push these out)."""
        entries = [self._entries.pop(h) for h in hashes]
        self.bytes_used -= sum(e.nbytes for e in entries)
        return entries

    def restore(self, block_ids: list[int], entries: list[torch.Tensor]) -> None:
        """Write taken entries into pool blocks ``block_ids`` (freshly allocated)."""
        if not block_ids:
            return
        self._write(block_ids, self.codec.decode(entries))
        self.counters.restored_blocks += len(block_ids)
        self.counters.restored_bytes += sum(e.nbytes for e in entries)

    def stats_fields(self) -> dict[str, int]:
        """EngineStats' spill fields."""
        c = self.counters
        return {"spill_blocks": len(self), "spill_capacity_bytes": self.capacity_bytes,
                "spill_hits": c.hits, "spilled_bytes": c.spilled_bytes,
                "restored_bytes": c.restored_bytes}

    def clear(self) -> None:
        self._entries.clear()
        self.bytes_used = 0


def build_spill_tier(cache: CacheConfig, layout: KVLayout, device: torch.device,
                     read: ReadBlocks, write: WriteBlocks) -> KVSpillTier | None:
    """The tier an engine of this config gets: None when spill_memory_bytes is 0 or the
    prefix cache is off (nothing would ever be looked up)."""
    if cache.spill_memory_bytes <= 0 or not cache.enable_prefix_caching:
        return None
    kind = resolve_spill_dtype(cache.spill_dtype, layout.storage_dtype, device)
    codec = SpillCodec(kind, layout.storage_dtype, device)
    return KVSpillTier(cache.spill_memory_bytes, codec, read, write)
