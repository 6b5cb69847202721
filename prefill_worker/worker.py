"""Prefill worker: a Ray actor that turns prompts into KV blocks and a first token.

Prompts from many requests are batched by the engine's scheduler under one token
budget (long prompts are chunked; the router configures the "shortest_first" policy and
the prefill step budget), with the prefix cache on. For each request::

    prefill(task) -> engine.add_request(max_tokens=1, hold_blocks=True)
                  -> first token sampled; the request finishes but keeps its blocks,
                     whose ids are read at the end of that step (engine thread)
                  -> kvtransfer.send(blocks -> task.dest)   (own thread, or the engine
                                                             thread for GPU backends)
                  -> engine.release(blocks)                  (kept as prefix cache)
                  -> PrefillResult(first token, transfer handle)

The send does not wait for a step boundary when the backend allows it
(``send_off_engine_thread``), and the result does not wait for the release: a short
prompt's first token is not held up by the long prompt's chunk the engine is busy with.

Who frees what: the blocks are released only after ``send`` returned, i.e. once the
backend no longer needs them (see kvtransfer.base); an abort or a failed send releases
them too (an abort that arrives during the send is applied when the send returns, so
blocks are never reused while being read; one that arrives after the prompt's last step
but before its send stops the send). Full blocks stay in the pool as evictable prefix
cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from concurrent.futures import Future

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from kvtransfer import TransferHandle, make_sender
from messages import PrefillAborted, PrefillFailed, PrefillResult, PrefillTask
from runtime.config import WorkerConfig
from runtime.worker_base import WorkerBase

log = logging.getLogger(__name__)


class PrefillWorker(WorkerBase):
    def __init__(self, config: WorkerConfig) -> None:
        self.sender = make_sender(config.kv_transfer, config.worker_id)
        # request id -> (output, the held block ids) once its prefill step is done
        self._pending: dict[str, asyncio.Future[tuple[RequestOutput, list[int]]]] = {}
        self._sending: dict[str, _Send] = {}  # request id -> its KV send under way
        self._aloop: asyncio.AbstractEventLoop | None = None
        super().__init__(config, LLMEngine(config.engine, detokenize=False))

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        """Engine thread: resolve the futures of requests whose prefill finished, with
        the ids of the blocks they hold (read here, where the engine may be touched)."""
        for out in outputs:
            if out.finished and self._aloop is not None:
                blocks = self.engine.held_blocks(out.request_id)
                self._aloop.call_soon_threadsafe(self._resolve, out, blocks)

    def _resolve(self, out: RequestOutput, blocks: list[int]) -> None:
        fut = self._pending.pop(out.request_id, None)
        if fut is not None and not fut.done():
            fut.set_result((out, blocks))

    async def prefill(self, task: PrefillTask) -> PrefillResult:
        self._aloop = asyncio.get_running_loop()
        rid = task.request_id
        if rid in self.aborted:
            raise PrefillAborted(f"request {rid} was aborted before its prefill arrived")
        fut: asyncio.Future[tuple[RequestOutput, list[int]]] = self._aloop.create_future()
        self._pending[rid] = fut
        params = dataclasses.replace(task.params, max_tokens=1)
        try:
            await self._call(lambda e: e.add_request(task.token_ids, params, rid,
                                                     hold_blocks=True))
        except BaseException:
            self._pending.pop(rid, None)
            raise
        out, blocks = await fut
        if out.finish_reason == "abort":
            raise PrefillAborted(f"request {rid} was aborted during prefill")
        if out.finish_reason == "error":  # this request broke its step, alone
            raise PrefillFailed(f"request {rid}: {out.error or 'the engine step failed'}")
        first = out.token_ids[0]
        lp = out.logprobs[0] if out.logprobs else None
        m = out.times
        queue_s = (m.first_scheduled - m.arrival) if m and m.first_scheduled else 0.0
        prefill_s = (m.first_token - m.first_scheduled) if m and m.first_token and \
            m.first_scheduled else 0.0
        # max_tokens=1 always "finishes" with length; only a real end (EOS, stop token,
        # or the client's own max_tokens of 1) ends the request here.
        ends = out.finish_reason == "stop" or task.params.max_tokens == 1
        handle: TransferHandle | None = None
        t0 = time.perf_counter()
        self._sending[rid] = send = _Send()
        # An abort may have come between the step that finished the prompt and now: it
        # was answered at once (nothing was being sent), so the router may already have
        # freed the decode side's reservation, which a send (cuda-ipc writes in place)
        # must then never touch.
        send.aborted = rid in self.aborted
        try:
            if not ends and not send.aborted:
                handle = await self._send(task, blocks)
        finally:
            del self._sending[rid]
            aborted = send.aborted
            send.done.set()
            # Not awaited: the release waits for the engine's step boundary, the result
            # need not. Commands run in order, so a later pool_state() sees it done.
            self.loop.call(lambda e: e.release(rid)).add_done_callback(_log_failure)
        if aborted:
            raise PrefillAborted(f"request {rid} was aborted during its KV transfer")
        return PrefillResult(
            request_id=rid, first_token=first, logprobs=lp,
            finish_reason=out.finish_reason if ends else None,
            num_cached_tokens=out.num_cached_tokens, handle=handle,
            queue_seconds=queue_s, prefill_seconds=prefill_s,
            transfer_seconds=time.perf_counter() - t0,
        )

    async def _send(self, task: PrefillTask, blocks: list[int]) -> TransferHandle:
        """Ship the prompt's blocks (the held ones) to the decode worker."""

        def send() -> TransferHandle:
            return self.sender.send(self.engine.kv_cache, blocks, task.dest,
                                    task.dest_block_ids, task.request_id)

        # nccl's communicator set-up (bounded by the timeout) runs here, never on the
        # engine thread: a decode worker that does not join cannot stall prefill steps.
        await self.sender.prepare(task.dest, self.engine.device, self.config.transfer_timeout_s)
        if self.sender.send_off_engine_thread:
            return await asyncio.to_thread(send)
        return await self._call(lambda _e: send())

    async def abort(self, request_id: str) -> bool:
        """Cancel a prefill; its blocks return to the pool. True if a prefill of it was
        under way. A prefill for it that arrives later is refused (runtime/aborted_ids.py).

        The answer means "no KV of it will be sent from now on" (the router frees the
        decode side's reservation once it has it): at once unless a send is under way,
        since a prefill checks ``aborted`` before it starts one. The engine drops the
        request at its next step boundary, which a long prompt's step may keep away for
        many seconds: not waited for, so the decode reservation is not held that long."""
        self.aborted.add(request_id)
        send = self._sending.get(request_id)
        if send is not None:
            # Its blocks are being read -- and, with cuda-ipc, the decode worker's blocks
            # written -- by the send: answer only once it has returned, so the router
            # frees the decode side's reservation after the last write into it. Its own
            # blocks are released when the send returns.
            send.aborted = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(send.done.wait(), self.config.transfer_timeout_s)
            return True

        def do(engine: LLMEngine) -> None:
            if not engine.has_request(request_id):
                return
            out = engine.abort(request_id)
            if out is not None and self._aloop is not None:
                self._aloop.call_soon_threadsafe(self._resolve, out, [])

        # Commands run in order: a later pool_state() (or prefill) sees it done.
        self.loop.call(do).add_done_callback(_log_failure)
        return request_id in self._pending


class _Send:
    """A KV send under way: whether it was aborted meanwhile, and when it is over."""

    def __init__(self) -> None:
        self.aborted = False
        self.done = asyncio.Event()


def _log_failure(fut: Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("releasing or aborting a prefill failed: %r", fut.exception())
