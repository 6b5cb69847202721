"""Iteration-level scheduler: which requests run this step, and how many tokens each.

One token budget covers decode tokens and prefill chunks alike (chunked prefill, vLLM
v1 style). Each step:

1. Running requests, oldest first, get what they need (1 token when decoding, the next
   chunk when a prompt is still being prefilled). When the pool runs dry, the youngest
   running request is preempted: its blocks are freed and it goes back to the front of
   the queue to be recomputed later (prompt + tokens so far; the prefix cache usually
   makes that cheap).
2. If nobody was preempted, waiting requests are admitted in arrival order while the
   budget, the seat limit and the pool allow, after a prefix-cache lookup.

The scheduler owns the running/waiting queues and the request statuses; the
KVCacheManager owns the blocks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.config import SchedulerConfig
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus


@dataclass
class ScheduledChunk:
    request: Request
    start: int  # request.num_computed_tokens when scheduled
    num_tokens: int  # tokens computed this step: token_ids[start : start + num_tokens]
    samples: bool  # the chunk reaches the end of the known tokens, so a token is sampled

    @classmethod
    def of(cls, req: Request, n: int) -> ScheduledChunk:
        start = req.num_computed_tokens
        return cls(req, start, n, start + n == req.num_tokens)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    # -- queue management ------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def abort(self, req: Request) -> None:
        """Drop a request wherever it is and free its blocks. Idempotent."""
        if req.finished:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
        req.transition(RequestStatus.FINISHED_ABORTED)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """End a running request; its blocks are freed unless it holds them (hold_blocks),
        in which case the owner frees them later with ``kv.free``."""
        self.running.remove(req)
        if not req.hold_blocks:
            self.kv.free(req)
        req.transition(status)

    def add_running(self, req: Request) -> None:
        """Join a request whose KV is already in its (allocated) blocks to the batch."""
        req.transition(RequestStatus.RUNNING)
        self.running.append(req)

    def migrate(self, req: Request) -> None:
        """Take a preempted request out of the queue for good (it continues elsewhere)."""
        self.waiting.remove(req)
        req.transition(RequestStatus.MIGRATED)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the policy ------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._allocate_or_preempt(req, n, out):
                break  # req itself was preempted: nothing younger is left to run
            out.chunks.append(ScheduledChunk.of(req, n))
            budget -= n
            i += 1
        if not out.preempted:
            budget = self._admit_waiting(budget, out)
        return out

    def _allocate_or_preempt(self, req: Request, n: int, out: SchedulerOutput) -> bool:
        while not self.kv.allocate(req, n):
            victim = self.running.pop()  # the youngest
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.transition(RequestStatus.PREEMPTED)
        self.waiting.appendleft(req)

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hit = self.kv.find_prefix(req)
            n = min(req.num_tokens - hit.num_tokens, budget)
            if not self.kv.allocate(req, n, hit):
                break  # wait for blocks to free up; keep arrival order
            self.waiting.popleft()
            req.num_computed_tokens = hit.num_tokens
            if req.status is RequestStatus.WAITING:
                req.num_cached_tokens = hit.num_tokens
            req.transition(RequestStatus.RUNNING)
            self.running.append(req)
            out.chunks.append(ScheduledChunk.of(req, n))
            budget -= n
        return budget

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance progress for every scheduled chunk and index newly full blocks."""
        for chunk in out.chunks:
            chunk.request.num_computed_tokens += chunk.num_tokens
            self.kv.cache_computed_blocks(chunk.request)
