"""Decode worker: a Ray actor that imports prefilled KV and decodes in continuous batches.

Disaggregated lifecycle of one request on this worker::

    reserve(prompt)   -> block ids for the prompt's KV (or None: no room above watermark)
    start(handle)     -> fetch the KV (kvtransfer), scatter it into the reserved blocks,
                         join the running batch with the first token from the prefill
    stream()          <- one long-lived generator: a StepBatch per engine step, carrying
                         every request's new tokens, ends, migrations and worker stats
    abort(id)         -> drop it wherever it is; its blocks return to the pool

Who frees what: reserved blocks belong to the engine from ``reserve`` on; a failed
``start`` or an ``abort`` frees them; a finished request frees them in the engine.
When the pool runs dry the engine preempts its youngest request and reports it as
"migrated" (the router re-prefills it elsewhere): nothing is recomputed here.

In colocated mode the same actor takes whole requests (``generate``) and runs chunked
prefill itself; preemption is then a local recompute.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import torch

from decode_worker.messages import StepBatch, TokenEvent, WorkerStats, worker_stats
from engine.engine_loop import EngineLoop
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.request import TokenLogprobs
from engine.sampling_params import SamplingParams
from engine.worker_config import WorkerConfig
from kernels import scatter_blocks
from kvtransfer import (
    Endpoint,
    KVSpec,
    KVTransferError,
    TransferHandle,
    check_handle,
    make_receiver,
)

log = logging.getLogger(__name__)
HEARTBEAT_S = 1.0  # an idle stream still reports stats this often


class DecodeWorker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.worker_id = config.worker_id
        migrate = "migrate" if config.role == "decode" else "recompute"
        self.engine = LLMEngine(config.engine, detokenize=False, preemption=migrate)
        self.receiver = make_receiver(config.kv_transfer)
        self.spec = KVSpec.of(self.engine.layout)
        allocate = getattr(self.receiver, "allocate", None)
        if allocate is not None:  # cuda-ipc needs a cache it can export
            self.engine.runner.kv_cache = allocate(self.engine.layout, self.engine.device)
        self._endpoint = self.receiver.endpoint(self.engine.runner.kv_cache, self.worker_id,
                                                self.spec)
        self._reserved: dict[str, list[int]] = {}
        self._last_stats: WorkerStats | None = None
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._out: asyncio.Queue[list[TokenEvent]] | None = None
        self.loop = EngineLoop(self.engine, self._on_outputs, name=f"{self.worker_id}-engine")
        self.loop.start()

    # -- plumbing ------------------------------------------------------------------------
    def _queue(self) -> asyncio.Queue[list[TokenEvent]]:
        if self._out is None:
            self._aloop = asyncio.get_running_loop()
            self._out = asyncio.Queue()
        return self._out

    def _emit(self, events: list[TokenEvent]) -> None:
        """Called on the engine thread: hand events to the actor's event loop."""
        if self._aloop is not None and self._out is not None and events:
            self._aloop.call_soon_threadsafe(self._out.put_nowait, events)

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        self._last_stats = self._stats(self.engine)  # on the engine thread: safe to read
        self._emit([_event(o) for o in outputs])

    async def _call(self, fn):  # type: ignore[no-untyped-def]
        return await asyncio.wrap_future(self.loop.call(fn))

    # -- public actor API ----------------------------------------------------------------
    def ping(self) -> str:
        return self.worker_id

    def endpoint(self) -> Endpoint:
        return self._endpoint

    async def stats(self) -> WorkerStats:
        return await self._call(self._stats)

    def _stats(self, engine: LLMEngine) -> WorkerStats:
        return worker_stats(self.worker_id, self.config.role, engine.stats(), self.loop.steps,
                            self.loop.busy_seconds)

    async def reserve(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> list[int] | None:
        """Blocks for the prompt's KV, or None if taking them would cross the watermark."""
        self._queue()
        watermark = int(self.config.watermark * self.engine.pool.num_usable_blocks)

        def do(engine: LLMEngine) -> list[int] | None:
            return engine.reserve(prompt_token_ids, params, request_id, watermark)

        blocks = await self._call(do)
        if blocks is not None:
            self._reserved[request_id] = blocks
        return blocks

    async def start(
        self,
        request_id: str,
        first_token: int,
        handle: TransferHandle,
        logprobs: TokenLogprobs | None = None,
        num_cached_tokens: int = 0,
    ) -> None:
        """Finish the KV import for a reserved request and join it to the batch.

        Raises KVTransferError (the reservation is freed) if the KV cannot be imported.
        """
        blocks = self._reserved.pop(request_id, None)
        if blocks is None:
            raise KVTransferError(f"request {request_id}: no reservation on {self.worker_id}")
        try:
            check_handle(handle, self.spec, blocks)
            staging = await self.receiver.fetch(handle, self.config.transfer_timeout_s)
        except BaseException:
            await self._call(lambda e: e.abort(request_id))
            raise
        ids = torch.tensor(blocks, dtype=torch.long)

        def join(engine: LLMEngine) -> RequestOutput | None:
            if request_id not in engine.requests:  # aborted while the KV was in flight
                return None
            if staging is not None:
                cache = engine.runner.kv_cache
                scatter_blocks(cache, ids.to(cache.device), staging.to(cache.device))
            return engine.start_prefilled(request_id, first_token, logprobs, num_cached_tokens)

        done = await self._call(join)
        if done is not None:
            self._emit([_event(done)])

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        """Colocated mode: prefill and decode here; tokens arrive through stream()."""
        self._queue()
        await self._call(lambda e: e.add_request(prompt_token_ids, params, request_id))

    async def abort(self, request_id: str) -> bool:
        """Cancel a request; True if it was here. Its blocks are back in the pool after."""
        self._reserved.pop(request_id, None)

        def do(engine: LLMEngine) -> bool:
            if request_id not in engine.requests:
                return False
            out = engine.abort(request_id)
            if out is not None:
                self._emit([_event(out)])
            return True

        return await self._call(do)

    async def stream(self) -> AsyncIterator[StepBatch]:
        """The token stream: one StepBatch per engine step (or heartbeat). Never ends."""
        q = self._queue()
        while True:
            try:
                events = await asyncio.wait_for(q.get(), timeout=HEARTBEAT_S)
            except TimeoutError:
                events = []
            while not q.empty():  # coalesce steps that piled up while the consumer was busy
                events += q.get_nowait()
            stats = self._last_stats if events and self._last_stats else await self.stats()
            yield StepBatch(self.worker_id, events, stats)

    # -- nccl backend (two GPUs); see kvtransfer/nccl.py ----------------------------------
    async def nccl_connect(self, peer_id: str, unique_id: tuple[int, ...]) -> None:
        """Join a prefill worker's communicator (blocking NCCL init, off the event loop)."""
        await asyncio.to_thread(self.receiver.connect, peer_id, unique_id)  # type: ignore[attr-defined]

    def nccl_recv(self, request_id: str, peer_id: str, num_blocks: int) -> None:
        """Post the receive for a transfer the prefill worker is about to send."""
        self.receiver.post_recv(request_id, peer_id, num_blocks, self.spec)  # type: ignore[attr-defined]

    async def pool_state(self) -> dict[str, int]:
        """Block accounting read from the pool itself (tests check for leaks with it)."""
        return await self._call(lambda e: e.pool_state())

    def shutdown(self) -> None:
        self.loop.stop()


def _event(o: RequestOutput) -> TokenEvent:
    lps = o.logprobs[-len(o.new_token_ids):] if o.new_token_ids and o.logprobs else []
    return TokenEvent(o.request_id, list(o.new_token_ids), lps, o.finish_reason,
                      o.num_cached_tokens)
