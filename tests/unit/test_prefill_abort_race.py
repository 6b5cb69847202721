"""An abort that reaches a prefill worker after the engine step that finished the
prompt, but before the worker's coroutine picks the result up: the KV must not be sent.
The router frees the decode side's reservation once the abort is answered, and with
cuda-ipc a send after that would write into blocks another request may own by then."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from engine.config import CacheConfig, EngineConfig
from engine.sampling_params import SamplingParams
from messages import Endpoint, PrefillAborted, PrefillTask
from prefill_worker.worker import PrefillWorker
from runtime.config import WorkerConfig

CFG = WorkerConfig(worker_id="prefill-t", role="prefill", kv_transfer="ray",
                   engine=EngineConfig(model="dummy:tiny-llama3",
                                       cache=CacheConfig(block_size=4, num_blocks=33)),
                   transfer_timeout_s=5.0, watermark=0.0)


def test_an_abort_between_the_last_step_and_the_send_stops_the_send() -> None:
    worker = PrefillWorker(CFG)
    sent: list[str] = []

    def send(*args: Any) -> Any:
        sent.append(args[-1])
        raise AssertionError("sent the KV of an aborted request")

    async def prepare(*_a: Any) -> None:
        return None

    worker.sender.send = send  # type: ignore[method-assign]
    worker.sender.prepare = prepare  # type: ignore[method-assign]
    real_resolve = worker._resolve
    answered: list[bool] = []
    tasks: list[asyncio.Task[None]] = []

    def resolve_after_an_abort(out: Any, blocks: list[int]) -> None:
        async def abort_then_resolve() -> None:
            answered.append(await worker.abort(out.request_id))
            real_resolve(out, blocks)
        tasks.append(asyncio.ensure_future(abort_then_resolve()))

    worker._resolve = resolve_after_an_abort  # type: ignore[method-assign]

    async def go() -> None:
        task = PrefillTask("r@k.1", list(range(1, 30)), SamplingParams(max_tokens=8),
                           Endpoint("ray", "decode-t", worker.kv_spec()), [1, 2, 3, 4, 5, 6, 7, 8])
        with pytest.raises(PrefillAborted):
            await asyncio.wait_for(worker.prefill(task), 30)
        for _ in range(100):  # the release runs at the engine's next step boundary
            if (await worker.pool_state())["free"] == worker.engine.num_usable_blocks:
                break
            await asyncio.sleep(0.05)

    try:
        asyncio.run(go())
        assert answered == [True] and sent == []
        assert worker.engine.pool.num_free_blocks == worker.engine.num_usable_blocks
    finally:
        worker.shutdown()


def test_an_abort_answers_without_waiting_for_a_long_step() -> None:
    """A long prompt's step can take many seconds on a CPU; the decode side's
    reservation is freed only once the prefill worker answers the abort, so the answer
    must not wait for the step boundary -- only for a send under way."""
    worker = PrefillWorker(CFG)
    sent: list[str] = []
    worker.sender.send = lambda *a: sent.append(a[-1])  # type: ignore[method-assign]
    step_may_end, step_ended = threading.Event(), threading.Event()

    async def go() -> tuple[bool, bool]:
        task = PrefillTask("r@k.1", list(range(1, 30)), SamplingParams(max_tokens=8),
                           Endpoint("ray", "decode-t", worker.kv_spec()), [1, 2, 3, 4, 5])
        def long_step(_e: object) -> None:  # the engine is in a long step
            step_may_end.wait(10)
            step_ended.set()

        worker.loop.call(long_step)
        prefill = asyncio.ensure_future(worker.prefill(task))
        await asyncio.sleep(0)  # the prefill has queued its request behind that step
        answer = await asyncio.wait_for(worker.abort("r@k.1"), 30)
        engine_still_busy = not step_ended.is_set()
        step_may_end.set()
        with pytest.raises(PrefillAborted):
            await asyncio.wait_for(prefill, 30)
        return answer, engine_still_busy

    try:
        answer, engine_still_busy = asyncio.run(go())
        assert answer and engine_still_busy and sent == []
        assert worker.engine.pool.num_free_blocks == worker.engine.num_usable_blocks
    finally:
        step_may_end.set()
        worker.shutdown()
