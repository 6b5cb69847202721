"""Shortest first: the prefill workers' policy (``--prefill-policy``).

Running and waiting requests together, by the tokens each still has to compute, fewest
first, so a short prompt that arrives behind a long one starts at the next step and the
long one takes what budget is left. A request that has gone ``max_wait_s`` without
being given any tokens (by the scheduler's clock) goes first, longest-waiting first, so
long prompts are never starved; one that gets the leftover budget each step is
progressing and keeps its place. A waiting request the pool cannot take is passed over,
not waited for: a shorter one behind it may fit. Preemption picks the youngest running
request not already in this step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.request import Request, RequestStatus
from engine.scheduler_output import SchedulerOutput
from engine.scheduler_policy import SchedulingPolicy

if TYPE_CHECKING:
    from engine.scheduler import Scheduler


class ShortestFirstPolicy(SchedulingPolicy):
    name = "shortest_first"

    def schedule(self, sched: Scheduler) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = sched.config.max_num_batched_tokens
        now = sched.clock.now()
        max_wait = sched.config.max_wait_s
        order = sorted([*sched.running, *sched.waiting], key=lambda r: _rank(r, now, max_wait))
        for req in order:
            if budget <= 0:
                break
            if req.status is RequestStatus.RUNNING:
                n = min(req.num_tokens - req.num_computed_tokens, budget)
                if n > 0 and sched.run_chunk(req, n, out):
                    req.last_scheduled = now
                    budget -= n
            elif not out.preempted and sched.has_free_seat:
                # (Requests preempted in this step are waiting again, and nothing is
                # admitted after a preemption.)
                n = sched.admit(req, budget, out)
                if n:
                    req.last_scheduled = now
                    budget -= n
        return out


def _rank(req: Request, now: float, max_wait_s: float) -> tuple[int, float]:
    if now - req.last_scheduled >= max_wait_s:
        return (0, req.last_scheduled)  # starving: longest without tokens first
    return (1, req.num_tokens - req.num_computed_tokens)
