"""Iteration-level scheduler: which requests run this step, and how many tokens each.

One token budget covers decode tokens and prefill chunks alike (chunked prefill, vLLM
v1 style). Who gets the budget first is a policy (engine/scheduler_policy.py), chosen
by ``SchedulerConfig.policy``:

- "fcfs" (engine/scheduler_fcfs.py, the default): running requests oldest first, then
  waiting ones in arrival order.
- "shortest_first" (engine/scheduler_shortest_first.py, prefill workers): fewest
  tokens left first, with a starvation bound of ``max_wait_s``.

Both share the mechanics here. Running requests are kept oldest first by
``Request.seniority`` (when the request first arrived anywhere: one placed again after
a preemption or a worker's death keeps its age). When the pool runs dry, the youngest
running request not already in this step is preempted: its blocks are freed and it
goes back to the front of the queue to be recomputed later (prompt + tokens so far; the
prefix cache usually makes that cheap). Nothing is admitted in a step that preempted.

The scheduler owns the running/waiting queues and the request statuses; the
KVCacheManager owns the blocks. Time comes from an injectable clock (engine/clock.py).
"""

from __future__ import annotations

import bisect
from collections import deque

from engine.clock import Clock, MonotonicClock
from engine.config import SchedulerConfig
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.scheduler_output import ScheduledChunk, SchedulerOutput
from engine.scheduler_policy import SchedulingPolicy, make_policy

__all__ = ["ScheduledChunk", "Scheduler", "SchedulerOutput"]


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, kv: KVCacheManager, *, clock: Clock | None = None,
        policy: SchedulingPolicy | None = None,
    ) -> None:
        self.config = config
        self.kv = kv
        self.clock: Clock = clock or MonotonicClock()
        self.policy = policy or make_policy(config.policy)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    # -- queue management ------------------------------------------------------------
    def add(self, req: Request) -> None:
        # Its wait for tokens starts now, on this scheduler's clock ("shortest_first"
        # serves a request that has gone max_wait_s without any first).
        req.last_scheduled = self.clock.now()
        self.waiting.append(req)

    def abort(self, req: Request) -> None:
        """Drop a request wherever it is and free its blocks. Idempotent."""
        if req.finished:
            return
        self._remove(req)
        self.kv.free(req)
        req.transition(RequestStatus.FINISHED_ABORTED)

    def fail(self, req: Request) -> None:
        """End a request the engine could not compute (finish reason "error"), wherever
        it is. Its blocks are freed even under hold_blocks (there is nothing to ship)
        and leave the prefix cache (their KV may be garbage). Idempotent."""
        if req.finished:
            return
        self._remove(req)
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
        self._join_running(req)

    def migrate(self, req: Request) -> None:
        """Take a preempted request out of the queue for good (it continues elsewhere)."""
        self.waiting.remove(req)
        req.transition(RequestStatus.MIGRATED)

    def _remove(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def has_free_seat(self) -> bool:
        return len(self.running) < self.config.max_num_seqs

    # -- one step --------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        return self.policy.schedule(self)

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance progress for every scheduled chunk and index newly full blocks."""
        for chunk in out.chunks:
            chunk.request.num_computed_tokens += chunk.num_tokens
            self.kv.cache_computed_blocks(chunk.request)

    # -- mechanics the policies call -------------------------------------------------
    def run_chunk(self, req: Request, n: int, out: SchedulerOutput) -> bool:
        """Schedule n more tokens of a running request, preempting the youngest running
        request not already in this step while the pool is short. False when that
        victim is req itself (it is preempted, not scheduled)."""
        scheduled: set[int] | None = None  # built only when the pool is short
        while not self.kv.allocate(req, n):
            if scheduled is None:
                scheduled = {id(c.request) for c in out.chunks}
            # req is not in the step yet, so there always is a victim. Under fcfs, where
            # everyone older than req is scheduled, this is simply the youngest.
            victim = next(r for r in reversed(self.running) if id(r) not in scheduled)
            self.running.remove(victim)
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                return False
        out.chunks.append(ScheduledChunk.of(req, n))
        return True

    def admit(self, req: Request, budget: int, out: SchedulerOutput) -> int:
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
        self._join_running(req)
        out.chunks.append(ScheduledChunk.of(req, n))
        return n

    def _join_running(self, req: Request) -> None:
        # After every request at least as old: a re-placed request keeps its age, so
        # the young ones that came after it are the first preemption victims, not it.
        bisect.insort_right(self.running, req, key=lambda r: r.seniority)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.transition(RequestStatus.PREEMPTED)
        self.waiting.appendleft(req)
