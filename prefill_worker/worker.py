"""Prefill worker: a Ray actor that turns prompts into KV blocks and a first token.

Prompts from many requests are batched by the engine's scheduler under one token
budget (long prompts are chunked), with the prefix cache on. For each request::

    prefill(task) -> engine.add_request(max_tokens=1, hold_blocks=True)
                  -> first token sampled; the request finishes but keeps its blocks
                  -> kvtransfer.send(blocks -> task.dest)   (on the engine thread)
                  -> engine.release(blocks)                  (kept as prefix cache)
                  -> PrefillResult(first token, transfer handle)

Who frees what: the blocks are released only after ``send`` returned, i.e. once the
backend no longer needs them (see kvtransfer.base); an abort or a failed send releases
them too. Full blocks stay in the pool as evictable prefix cache.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from decode_worker.messages import WorkerStats, worker_stats
from engine.engine_loop import EngineLoop
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.worker_config import WorkerConfig
from kvtransfer import TransferHandle, make_sender
from prefill_worker.messages import PrefillResult, PrefillTask


class PrefillAborted(RuntimeError):
    """The request was cancelled while it was being prefilled."""


class PrefillWorker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.worker_id = config.worker_id
        self.engine = LLMEngine(config.engine, detokenize=False)
        self.sender = make_sender(config.kv_transfer, config.worker_id)
        self._pending: dict[str, asyncio.Future[RequestOutput]] = {}
        self._aloop: asyncio.AbstractEventLoop | None = None
        self.loop = EngineLoop(self.engine, self._on_outputs, name=f"{self.worker_id}-engine")
        self.loop.start()

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        """Engine thread: resolve the futures of requests whose prefill finished."""
        for out in outputs:
            if out.finished and self._aloop is not None:
                self._aloop.call_soon_threadsafe(self._resolve, out)

    def _resolve(self, out: RequestOutput) -> None:
        fut = self._pending.pop(out.request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(out)

    async def _call(self, fn):  # type: ignore[no-untyped-def]
        return await asyncio.wrap_future(self.loop.call(fn))

    def ping(self) -> str:
        return self.worker_id

    async def prefill(self, task: PrefillTask) -> PrefillResult:
        self._aloop = asyncio.get_running_loop()
        rid = task.request_id
        fut: asyncio.Future[RequestOutput] = self._aloop.create_future()
        self._pending[rid] = fut
        params = dataclasses.replace(task.params, max_tokens=1)
        try:
            await self._call(lambda e: e.add_request(task.token_ids, params, rid,
                                                     hold_blocks=True))
        except BaseException:
            self._pending.pop(rid, None)
            raise
        out = await fut
        if out.finish_reason == "abort":
            raise PrefillAborted(f"request {rid} was aborted during prefill")
        first = out.token_ids[0]
        lp = out.logprobs[0] if out.logprobs else None
        m = out.metrics
        queue_s = (m.first_scheduled - m.arrival) if m and m.first_scheduled else 0.0
        prefill_s = (m.first_token - m.first_scheduled) if m and m.first_token and \
            m.first_scheduled else 0.0
        # max_tokens=1 always "finishes" with length; only a real end (EOS, stop token,
        # or the client's own max_tokens of 1) ends the request here.
        ends = out.finish_reason == "stop" or task.params.max_tokens == 1
        handle: TransferHandle | None = None
        t0 = time.perf_counter()
        try:
            if not ends:
                handle = await self._call(lambda e: self._send(e, task))
        finally:
            await self._call(lambda e: e.release(rid))
        return PrefillResult(
            request_id=rid, first_token=first, logprobs=lp,
            finish_reason=out.finish_reason if ends else None,
            num_cached_tokens=out.num_cached_tokens, handle=handle,
            queue_seconds=queue_s, prefill_seconds=prefill_s,
            transfer_seconds=time.perf_counter() - t0,
        )

    def _send(self, engine: LLMEngine, task: PrefillTask) -> TransferHandle:
        """Engine thread: ship the prompt's blocks (the held ones) to the decode worker."""
        n = engine.kv.num_blocks_needed(len(task.token_ids))
        src = engine.kv.block_table(task.request_id)[:n]
        return self.sender.send(engine.runner.kv_cache, src, task.dest, task.dest_block_ids,
                                task.request_id)

    async def abort(self, request_id: str) -> bool:
        """Cancel a prefill; its blocks return to the pool. True if it was here."""
        def do(engine: LLMEngine) -> bool:
            if request_id in engine.requests or request_id in engine.held:
                out = engine.abort(request_id)
                if out is not None and self._aloop is not None:
                    self._aloop.call_soon_threadsafe(self._resolve, out)
                return True
            return False

        return await self._call(do)

    async def stats(self) -> WorkerStats:
        return await self._call(lambda e: worker_stats(self.worker_id, "prefill", e.stats(),
                                                       self.loop.steps, self.loop.busy_seconds))

    async def pool_state(self) -> dict[str, int]:
        """Block accounting read from the pool itself (tests check for leaks with it)."""
        return await self._call(lambda e: e.pool_state())

    def shutdown(self) -> None:
        self.loop.stop()
