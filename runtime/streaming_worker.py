"""The part decode and colocated workers share: they stream tokens and take aborts.

Every engine step's outputs become one batch of TokenEvents on the worker's stream,
with the worker's stats read on the same step (the pool's owner counts only once every
POOL_EVERY_S: they walk every block); an idle stream still sends a heartbeat with full,
fresh stats every HEARTBEAT_S, so the router's view of the load never goes stale.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from messages import StepBatch, WorkerStats
from runtime.config import WorkerConfig
from runtime.token_stream import TokenStream, token_event
from runtime.worker_base import WorkerBase

HEARTBEAT_S = 1.0  # an idle stream still reports stats this often
POOL_EVERY_S = 1.0  # a busy stream reports the pool's owner counts this often


class StreamingWorker(WorkerBase):
    def __init__(self, config: WorkerConfig, engine: LLMEngine) -> None:
        self.tokens = TokenStream()
        self._last_stats: WorkerStats | None = None  # read with the latest step's outputs
        self._pool_read_at = 0.0
        super().__init__(config, engine)

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        # On the engine thread: safe to read. The pool's owner counts walk every block,
        # so a busy stream carries them once a second, not every step.
        now = time.monotonic()
        with_pool = now - self._pool_read_at >= POOL_EVERY_S
        if with_pool:
            self._pool_read_at = now
        self._last_stats = self._stats(self.engine, with_pool=with_pool)
        self.tokens.emit([token_event(o) for o in outputs])

    async def abort(self, request_id: str) -> bool:
        """Cancel a request; True if it was here. Its blocks are back in the pool after.
        A call for it that arrives later is refused (runtime/aborted_ids.py)."""
        self.aborted.add(request_id)

        def do(engine: LLMEngine) -> bool:
            if not engine.has_request(request_id):
                return False
            out = engine.abort(request_id)
            if out is not None:
                self.tokens.emit([token_event(out)])
            return True

        return await self._call(do)

    async def stream(self) -> AsyncIterator[StepBatch]:
        """The token stream: one StepBatch per engine step (or heartbeat). Never ends."""
        while True:
            events = await self.tokens.next(HEARTBEAT_S)
            stats = self._last_stats if events and self._last_stats else await self.stats()
            yield StepBatch(self.worker_id, events, stats)
