"""Who owns every KV block, and the checks that the pool's books balance.

Each usable block has exactly one owner category::

    running    in the block table of a request the scheduler holds (running, or
               waiting/preempted with blocks); prefill and decode alike
    reserved   in the block table of a decode-side reservation not started yet
    transfer   in the block table of a finished request whose KV is being shipped
               (hold_blocks, released by LLMEngine.release)
    cached     ref_count 0, on the free list, and the prefix cache's block for its
               hash: a later prompt may revive it
    free       ref_count 0, on the free list, nothing to revive

A block shared by several tables (a prefix hit) counts once, under the first of
running, reserved, transfer that holds it. The five counts always sum to the usable
blocks; what can go wrong is the references, and ``BlockLedger.violations`` lists it:

- a block's ref_count differs from the number of block-table entries naming it
- a block is on the free list and referenced, or unreferenced and off the free list
- a table belongs to no known request, names a block twice, or names the null block
  or a block outside the pool
- the null block is not pinned (ref_count 1, never free)
- the prefix-cache index points at a block that carries another hash
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from engine.block_pool import NULL_BLOCK, BlockPool
from engine.request import Request, RequestStatus

OWNERS = ("running", "reserved", "transfer", "cached", "free")
REQUEST_OWNERS = OWNERS[:3]  # precedence for a block shared by several tables


class BlockAccountingError(RuntimeError):
    """The pool's books do not balance: a leak, a double free waiting to happen, or a
    block two requests both think is theirs. ``violations`` lists each finding."""

    def __init__(self, violations: Sequence[str]) -> None:
        super().__init__("; ".join(violations))
        self.violations = list(violations)


@dataclass(frozen=True)
class BlockLedger:
    counts: dict[str, int]  # OWNERS -> number of blocks; sums to the usable blocks
    violations: list[str]  # empty when every invariant holds

    def check(self) -> None:
        if self.violations:
            raise BlockAccountingError(self.violations)


def build_ledger(
    pool: BlockPool, tables: Mapping[str, Sequence[int]], owner_of: Mapping[str, str]
) -> BlockLedger:
    """Classify every usable block and check the invariants.

    ``tables``: request id -> block table (the KVCacheManager's). ``owner_of``: request
    id -> one of REQUEST_OWNERS, for every request that may hold blocks.
    """
    violations: list[str] = []
    refs: Counter[int] = Counter()
    owner: dict[int, str] = {}
    rank = {o: i for i, o in enumerate(REQUEST_OWNERS)}
    for rid, table in tables.items():
        who = owner_of.get(rid)
        if who is None:
            violations.append(f"request {rid!r} holds blocks {list(table)} but is unknown")
            who = "running"  # still counted, so the totals stay whole
        if len(set(table)) != len(table):
            violations.append(f"request {rid!r} names a block twice: {list(table)}")
        if NULL_BLOCK in table:
            violations.append(f"request {rid!r} names the null block")
        bad = [b for b in table if not NULL_BLOCK < b < pool.num_blocks]
        if bad:
            violations.append(f"request {rid!r} names blocks outside the pool: {bad}")
        refs.update(table)
        for bid in table:
            if bid in bad:  # not a block of this pool (or the null block)
                continue
            if bid not in owner or rank[who] < rank[owner[bid]]:
                owner[bid] = who
    free = set(pool.free_block_ids())
    null = pool.blocks[NULL_BLOCK]
    if null.ref_count != 1 or NULL_BLOCK in free:
        violations.append("the null block is not pinned")
    for blk in pool.blocks[1:]:
        bid = blk.block_id
        if blk.ref_count != refs[bid]:
            violations.append(f"block {bid}: ref_count {blk.ref_count} but {refs[bid]} "
                              "block-table references")
        if bid in free and refs[bid]:
            violations.append(f"block {bid} is on the free list and in a block table")
        if (blk.ref_count == 0) != (bid in free):
            state = "on" if bid in free else "off"
            violations.append(f"block {bid}: ref_count {blk.ref_count} and {state} the "
                              "free list")
        if bid not in owner:
            indexed = blk.block_hash is not None and pool.lookup(blk.block_hash) == bid
            owner[bid] = "cached" if indexed else "free"
    for block_hash, bid in pool.cached_index().items():
        if pool.blocks[bid].block_hash != block_hash:
            violations.append(f"prefix cache entry points at block {bid}, whose hash differs")
    counts = dict.fromkeys(OWNERS, 0)
    for o in owner.values():
        counts[o] += 1
    return BlockLedger(counts, violations)


def request_owners(
    requests: Mapping[str, Request], held: Mapping[str, Request],
    running: Sequence[Request], waiting: Iterable[Request],
) -> tuple[dict[str, str], list[str]]:
    """An engine's request id -> owner category, and what is inconsistent between its
    maps and the scheduler's queues (each request is in exactly one place)."""
    violations: list[str] = []
    queued = [*running, *waiting]
    in_queue = {id(r) for r in queued}
    owner_of = {rid: "running" if id(req) in in_queue else "reserved"
                for rid, req in requests.items()}
    for req in queued:
        if requests.get(req.request_id) is not req:
            violations.append(f"the scheduler holds {req.request_id!r}, unknown to the engine")
    for rid, req in requests.items():
        if req.finished:
            violations.append(f"{rid!r} is finished ({req.status.name}) but still in flight")
        elif owner_of[rid] == "reserved" and req.status is not RequestStatus.WAITING:
            violations.append(f"{rid!r} is {req.status.name} but in no scheduler queue")
    for rid in held:
        if rid in requests:
            violations.append(f"{rid!r} is both in flight and held for a transfer")
        else:
            owner_of[rid] = "transfer"
    return owner_of, violations
