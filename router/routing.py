"""Routing policy: which prefill worker, which decode worker.

Prefill: prefix-cache affinity first (the worker that already saw the longest run of
this prompt's blocks probably still caches them), queued tokens second. The router
keeps, per prefill worker, a bounded LRU of the block hashes it sent there; the hashes
are the engine's own chained block hashes, so they agree with the workers' caches.

Decode: router/placement.py asks the live decode workers in order of estimated KV
usage (ties: fewer requests), taking the first that has room.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.block_pool import hash_block_tokens

AFFINITY_CAPACITY = 65536  # hashes remembered per prefill worker


@dataclass
class PrefillLoad:
    worker_id: str
    outstanding_tokens: int = 0
    hashes: OrderedDict[int, None] = field(default_factory=OrderedDict)

    def matched_blocks(self, hashes: Sequence[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.hashes:
                break
            n += 1
        return n

    def remember(self, hashes: Sequence[int]) -> None:
        for h in hashes:
            self.hashes[h] = None
            self.hashes.move_to_end(h)
        while len(self.hashes) > AFFINITY_CAPACITY:
            self.hashes.popitem(last=False)


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    out: list[int] = []
    for i in range(len(token_ids) // block_size):
        out.append(hash_block_tokens(out[-1] if out else None,
                                     token_ids[i * block_size : (i + 1) * block_size]))
    return out


def pick_prefill(loads: Sequence[PrefillLoad], hashes: Sequence[int], block_size: int
                 ) -> PrefillLoad:
    """Longest cached prefix wins, net of the work already queued there."""
    def score(p: PrefillLoad) -> tuple[int, int]:
        return (p.matched_blocks(hashes) * block_size - p.outstanding_tokens,
                -p.outstanding_tokens)

    return max(loads, key=score)
