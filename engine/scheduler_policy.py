"""The interface every scheduling policy implements, and the policies by name.

A policy decides only the order in which requests get a step's token budget; the
Scheduler supplies the mechanics it calls (``run_chunk``: allocate, preempting if
needed; ``admit``: prefix lookup and allocation for a waiting request) and owns the
queues, the statuses and the blocks. A policy keeps no per-request state of its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from engine.scheduler_output import SchedulerOutput

if TYPE_CHECKING:
    from engine.scheduler import Scheduler


class SchedulingPolicy(ABC):
    name: str  # the SchedulerConfig.policy string that selects it

    @abstractmethod
    def schedule(self, sched: Scheduler) -> SchedulerOutput:
        """Fill one step, at most ``sched.config.max_num_batched_tokens`` tokens."""


def make_policy(name: str) -> SchedulingPolicy:
    """The policy a SchedulerConfig.policy string names."""
    from engine.scheduler_fcfs import FcfsPolicy
    from engine.scheduler_shortest_first import ShortestFirstPolicy

    policies: dict[str, type[SchedulingPolicy]] = {
        p.name: p for p in (FcfsPolicy, ShortestFirstPolicy)}
    if name not in policies:
        raise ValueError(f"unknown scheduler policy {name!r}; one of {sorted(policies)}")
    return policies[name]()
