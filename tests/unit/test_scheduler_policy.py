"""Scheduling policies behind one interface, selected by SchedulerConfig.policy, and
the injectable clock."""

from __future__ import annotations

import pytest

from engine.block_pool import BlockPool
from engine.clock import FakeClock, MonotonicClock
from engine.config import SCHEDULER_POLICIES, SchedulerConfig
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.scheduler_fcfs import FcfsPolicy
from engine.scheduler_policy import SchedulingPolicy, make_policy
from engine.scheduler_shortest_first import ShortestFirstPolicy


def kv() -> KVCacheManager:
    return KVCacheManager(BlockPool(16), 4)


@pytest.mark.parametrize(("name", "cls"), [("fcfs", FcfsPolicy),
                                           ("shortest_first", ShortestFirstPolicy)])
def test_config_strings_select_their_policy(name: str, cls: type) -> None:
    s = Scheduler(SchedulerConfig(policy=name), kv())
    assert type(s.policy) is cls and s.policy.name == name
    assert isinstance(s.clock, MonotonicClock)


def test_every_configurable_policy_exists() -> None:
    assert {make_policy(n).name for n in SCHEDULER_POLICIES} == set(SCHEDULER_POLICIES)
    with pytest.raises(ValueError, match="unknown scheduler policy 'lifo'"):
        make_policy("lifo")


def test_an_injected_policy_decides_the_step() -> None:
    class AdmitNewestOnly(SchedulingPolicy):
        name = "newest"

        def schedule(self, sched: Scheduler) -> SchedulerOutput:
            out = SchedulerOutput()
            sched.admit(sched.waiting[-1], sched.config.max_num_batched_tokens, out)
            return out

    s = Scheduler(SchedulerConfig(), kv(), policy=AdmitNewestOnly())
    for rid in ("a", "b"):
        s.add(Request(rid, [1, 2, 3], SamplingParams()))
    out = s.schedule()
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("b", 3)]
    assert [r.request_id for r in s.running] == ["b"]


def test_add_stamps_the_wait_start_from_the_schedulers_clock() -> None:
    clock = FakeClock(start=50.0)
    s = Scheduler(SchedulerConfig(), kv(), clock=clock)
    r = Request("a", [1], SamplingParams(), arrival=0.0)
    clock.advance(2.5)
    s.add(r)
    assert r.last_scheduled == 52.5


def test_fake_clock_only_moves_forward() -> None:
    clock = FakeClock(start=1.0)
    clock.advance(0.0)
    assert clock.now() == 1.0
    with pytest.raises(ValueError):
        clock.advance(-0.1)
