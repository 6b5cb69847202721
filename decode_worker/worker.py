"""Decode worker: a Ray actor that imports prefilled KV and decodes in continuous batches.

Disaggregated lifecycle of one request on this worker::

    reserve(prompt)   -> block ids for the prompt's KV (or None: no room above watermark)
    start(handle)     -> fetch the KV (kvtransfer) on the event loop, scatter it into the
                         reserved blocks between engine steps in bounded slices
                         (decode_worker/staged_import.py), join the running batch with
                         the first token from the prefill
    stream()          <- one long-lived generator (served to the router on the token
                         channel, runtime/token_channel.py): a StepBatch per step, carrying
                         every request's new tokens, ends, migrations and worker stats
    abort(id)         -> drop it wherever it is; its blocks return to the pool

Who frees what: reserved blocks belong to the engine from ``reserve`` on; a failed
``start`` or an ``abort`` frees them; a finished request frees them in the engine.
When the pool runs dry the engine preempts its youngest request (by age since the
request reached the router: ``reserve`` is told it) and reports it as "migrated" (the
router re-prefills it elsewhere): nothing is recomputed here.

The worker is also its KV receiver's peer (kvtransfer.peer.KVPeer): a sender whose
backend needs a handshake (nccl) reaches the receiver through ``kv_peer``.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from decode_worker.staged_import import StagedImport, StagedImports
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from kvtransfer import KVTransferError, PeerMessage, check_handle, make_receiver, spec_of
from messages import Endpoint, TokenLogprobs, TransferHandle
from runtime.config import WorkerConfig
from runtime.streaming_worker import StreamingWorker
from runtime.token_stream import token_event

log = logging.getLogger(__name__)


class DecodeWorker(StreamingWorker):
    def __init__(self, config: WorkerConfig) -> None:
        engine = LLMEngine(config.engine, detokenize=False, preemption="migrate")
        self.receiver = make_receiver(config.kv_transfer)
        self.spec = spec_of(engine.layout)
        cache = self.receiver.allocate(engine.layout, engine.device)
        if cache is not None:
            engine.kv_cache = cache
        self._endpoint = self.receiver.endpoint(engine.kv_cache, config.worker_id, self.spec)
        self._reserved: dict[str, list[int]] = {}  # request id -> blocks awaiting its KV
        self.imports = StagedImports()  # fetched KV waiting to be scattered
        super().__init__(config, engine)
        self.loop.between_steps = self.imports

    def endpoint(self) -> Endpoint:
        return self._endpoint

    async def reserve(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        age_s: float = 0.0,
    ) -> list[int] | None:
        """Blocks for the prompt's KV, or None if taking them would cross the watermark
        (or the request was aborted before this call arrived)."""
        self.tokens.bind()
        if request_id in self.aborted:
            return None
        watermark = int(self.config.watermark * self.engine.num_usable_blocks)

        def do(engine: LLMEngine) -> list[int] | None:
            return engine.reserve(prompt_token_ids, params, request_id, watermark, age_s)

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

        def join(engine: LLMEngine) -> RequestOutput | None:
            return engine.start_prefilled(request_id, first_token, logprobs, num_cached_tokens)

        # The scatter runs between engine steps in slices (decode_worker/staged_import.py),
        # so the running streams never wait for a whole prompt's KV to land.
        imp = StagedImport(request_id, blocks, staging if staging is not None
                           else torch.empty(0), join)
        if staging is None:  # the sender wrote the blocks in place: only the join is left
            imp.block_ids = []
        try:
            await self._call(lambda _e: self.imports.add(imp))  # wakes an idle engine loop
            done = await asyncio.wrap_future(imp.done)
        except BaseException:
            await self._call(lambda e: e.abort(request_id) if e.has_request(request_id)
                             else None)
            raise
        if isinstance(done, RequestOutput):
            self.tokens.emit([token_event(done)])

    async def abort(self, request_id: str) -> bool:
        self._reserved.pop(request_id, None)
        self.receiver.cancel(request_id)  # nccl: a posted receive must not leak its buffer
        return await super().abort(request_id)

    async def kv_peer(self, message: PeerMessage) -> None:
        """kvtransfer.peer.KVPeer: a sender's handshake step for our receiver."""
        await self.receiver.on_peer_message(message)
