"""What every worker actor is: an engine on its own thread, and the calls all roles answer.

The engine is not thread-safe: it is touched only on its EngineLoop thread, inside a
step or in a command run between steps (``_call``). Step outputs arrive on that thread
in ``_on_outputs``, which each role defines. The actor's event loop never blocks on the
engine: it awaits the commands' futures.

Subclasses set up their own state first and call ``WorkerBase.__init__`` last: it starts
the engine thread, after which ``_on_outputs`` may run at any time.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from typing import TypeVar

from engine.engine_loop import EngineLoop
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from kvtransfer import spec_of
from messages import KVSpec, PoolState, WorkerStats
from runtime.aborted_ids import AbortedIds
from runtime.config import WorkerConfig
from runtime.memory_diag import start_from_env

T = TypeVar("T")


class WorkerBase(abc.ABC):
    def __init__(self, config: WorkerConfig, engine: LLMEngine) -> None:
        self.config = config
        self.worker_id = config.worker_id
        self.engine = engine
        self.aborted = AbortedIds()  # refuse calls that arrive after their abort
        self.memory_diag = start_from_env(self.worker_id)  # None unless asked (issue 11)
        # Printed, not logged: Ray forwards an actor's stdout to the driver's terminal,
        # and workers configure no logging.
        print(f"{self.worker_id}: KV pool {engine.pool_size().describe()}", flush=True)
        self.loop = EngineLoop(engine, self._on_outputs, name=f"{self.worker_id}-engine")
        self.loop.start()

    @abc.abstractmethod
    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        """The outputs of one engine step (on the engine thread)."""

    async def _call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run fn(engine) on the engine thread between steps; its result or its error."""
        return await asyncio.wrap_future(self.loop.call(fn))

    # -- calls every role answers ---------------------------------------------------------
    def ping(self) -> str:
        return self.worker_id

    async def lifeline(self) -> None:
        """Never returns: the router holds this call open and learns of the actor's death
        when Ray fails it."""
        await asyncio.get_running_loop().create_future()

    def kv_spec(self) -> KVSpec:
        """The cache's block layout: fixed at construction, so read off the engine thread."""
        return spec_of(self.engine.layout)

    async def stats(self) -> WorkerStats:
        return await self._call(self._stats)

    async def pool_state(self) -> dict[str, int]:
        """Block accounting read from the pool itself (tests check for leaks with it)."""
        return await self._call(lambda e: e.pool_state())

    def shutdown(self) -> None:
        if self.memory_diag is not None:
            self.memory_diag.stop()
        self.loop.stop()

    def _stats(self, engine: LLMEngine, with_pool: bool = True) -> WorkerStats:
        """On the engine thread (the only place its counters may be read). The pool's
        owners are counted block by block: per-step callers leave them out."""
        pool = PoolState.from_counts(engine.pool_state()) if with_pool else None
        return WorkerStats(self.worker_id, self.config.role, engine.stats(), self.loop.steps,
                           self.loop.busy_seconds, pool)
