"""First come, first served: the engine's default (decode and colocated workers).

Running requests, oldest first, get what they need (1 token when decoding, the next
chunk when a prompt is still being prefilled); when the pool runs dry the youngest
running request is preempted. Then, if nobody was preempted, waiting requests are
admitted in arrival order while the budget, the seat limit and the pool allow. A
waiting request the pool cannot take blocks those behind it (arrival order is kept),
and decode never waits behind a new prompt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.scheduler_output import SchedulerOutput
from engine.scheduler_policy import SchedulingPolicy

if TYPE_CHECKING:
    from engine.scheduler import Scheduler


class FcfsPolicy(SchedulingPolicy):
    name = "fcfs"

    def schedule(self, sched: Scheduler) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = sched.config.max_num_batched_tokens
        i = 0
        # Preemption removes requests younger than running[i] only, so i stays valid.
        while i < len(sched.running) and budget > 0:
            req = sched.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not sched.run_chunk(req, n, out):
                break  # req itself was preempted: nothing younger is left to run
            budget -= n
            i += 1
        if out.preempted:
            return out  # the pool is short: admitting now would only preempt again
        while sched.waiting and budget > 0 and sched.has_free_seat:
            n = sched.admit(sched.waiting[0], budget, out)
            if n == 0:
                break  # wait for blocks to free up; keep arrival order
            budget -= n
        return out
