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

That is the "fcfs" policy. Prefill workers use "shortest_first" instead: running and
waiting requests together, by the tokens each still has to compute, fewest first, so a
short prompt that arrives behind a long one starts at the next step and the long one
takes what budget is left. A request that has gone ``max_wait_s`` without being given
any tokens goes first, so long prompts are never starved (one that gets the leftover
budget each step is progressing and keeps its place). Preemption works the same in
both: the victim is the youngest running request not already scheduled in this step.

The scheduler owns the running/waiting queues and the request statuses; the
KVCacheManager owns the blocks.
"""

from __future__ import annotations

import time
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

    def fail(self, req: Request) -> None:
        """End a request the engine could not compute (finish reason "error"), wherever
        it is. Its blocks are freed even under hold_blocks (there is nothing to ship)
        and leave the prefix cache (their KV may be garbage). Idempotent."""
        if req.finished:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req, discard=True)
        req.transition(RequestStatus.FINISHED_ERROR)

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
        if self.config.policy == "shortest_first":
            return self._schedule_shortest_first()
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

    def _schedule_shortest_first(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        now = time.monotonic()
        for req in sorted([*self.running, *self.waiting], key=lambda r: self._rank(r, now)):
            if budget <= 0:
                break
            if req.status is RequestStatus.RUNNING:
                n = min(req.num_tokens - req.num_computed_tokens, budget)
                if n > 0 and self._allocate_or_preempt(req, n, out):
                    out.chunks.append(ScheduledChunk.of(req, n))
                    req.last_scheduled = now
                    budget -= n
            elif not out.preempted and len(self.running) < self.config.max_num_seqs:
                # (Requests preempted in this step are waiting again, and nothing is
                # admitted after a preemption.) A waiting request the pool cannot take
                # now is passed over, not waited for: a shorter one behind it may fit.
                n = self._admit(req, budget, out)
                if n:
                    req.last_scheduled = now
                    budget -= n
        return out

    def _rank(self, req: Request, now: float) -> tuple[int, float]:
        if now - req.last_scheduled >= self.config.max_wait_s:
            return (0, req.last_scheduled)  # starving: longest without tokens first
        return (1, req.num_tokens - req.num_computed_tokens)

    def _allocate_or_preempt(self, req: Request, n: int, out: SchedulerOutput) -> bool:
        scheduled: set[int] | None = None  # built only when the pool is short
        while not self.kv.allocate(req, n):
            if scheduled is None:
                scheduled = {id(c.request) for c in out.chunks}
            # The youngest running request not already in this step; req is not, so
            # there always is one. Under fcfs this is simply the youngest.
            victim = next(r for r in reversed(self.running) if id(r) not in scheduled)
            self.running.remove(victim)
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
            n = self._admit(self.waiting[0], budget, out)
            if n == 0:
                break  # wait for blocks to free up; keep arrival order
            budget -= n
        return budget

    def _admit(self, req: Request, budget: int, out: SchedulerOutput) -> int:
        """Start a waiting request with up to ``budget`` tokens after a prefix-cache
        lookup; the tokens scheduled, 0 if the pool cannot take it now."""
        hit = self.kv.find_prefix(req)
        n = min(req.num_tokens - hit.num_tokens, budget)
        if not self.kv.allocate(req, n, hit):
            return 0
        self.waiting.remove(req)
        req.num_computed_tokens = hit.num_tokens
        if req.status is RequestStatus.WAITING:
            req.num_cached_tokens = hit.num_tokens
        req.transition(RequestStatus.RUNNING)
        self.running.append(req)
        out.chunks.append(ScheduledChunk.of(req, n))
        return n

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance progress for every scheduled chunk and index newly full blocks."""
        for chunk in out.chunks:
            chunk.request.num_computed_tokens += chunk.num_tokens
            self.kv.cache_computed_blocks(chunk.request)
