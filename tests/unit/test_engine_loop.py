"""EngineLoop's last resort: a step that raises outside the engine's per-request
isolation ends every request with finish reason "error" (blocks freed), not a hang."""

from __future__ import annotations

import threading

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine_loop import EngineLoop
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


def test_a_step_that_raises_fails_every_request_with_an_error() -> None:
    engine = LLMEngine(EngineConfig(
        model="dummy:tiny-llama3", cache=CacheConfig(block_size=4, num_blocks=33),
        scheduler=SchedulerConfig(max_num_batched_tokens=8)))
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    engine.add_request(list(range(10, 30)), params, "a")
    engine.add_request(list(range(40, 45)), params, "b")
    engine.step()  # a mid-prefill, holding blocks

    def broken_schedule():  # type: ignore[no-untyped-def]
        raise RuntimeError("scheduler bug")

    engine.scheduler.schedule = broken_schedule  # type: ignore[method-assign]
    finals: list[RequestOutput] = []
    done = threading.Event()

    def on_outputs(outs: list[RequestOutput]) -> None:
        finals.extend(o for o in outs if o.finished)
        if len(finals) == 2:
            done.set()

    loop = EngineLoop(engine, on_outputs)
    loop.start()
    try:
        assert done.wait(timeout=30)
    finally:
        loop.stop()
    assert sorted(o.request_id for o in finals) == ["a", "b"]
    assert {o.finish_reason for o in finals} == {"error"}
    assert all(o.error == "engine step failed: RuntimeError: scheduler bug" for o in finals)
    engine.audit()
    state = engine.pool_state()
    assert state["requests"] == 0 and state["used"] == 0
