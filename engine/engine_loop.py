"""Runs an LLMEngine on its own thread so an asyncio actor stays responsive.

The engine is not thread-safe. Every touch of it happens on the loop thread: inside
``step()``, or in a command submitted with ``call`` and run between two steps. Workers
(Ray async actors) await the returned futures; step outputs go to ``on_outputs``,
called on the loop thread (the worker hands them to its event loop).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol, TypeVar

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput

T = TypeVar("T")
log = logging.getLogger(__name__)

OutputsCallback = Callable[[list[RequestOutput]], None]


class BetweenSteps(Protocol):
    def pending(self) -> bool: ...

    def run(self, engine: LLMEngine) -> None:
        """One bounded piece of work on the loop thread, between two steps."""


class EngineLoop:
    def __init__(
        self,
        engine: LLMEngine,
        on_outputs: OutputsCallback,
        name: str = "engine-loop",
    ) -> None:
        self.engine = engine
        self._on_outputs = on_outputs
        self._commands: queue.SimpleQueue[tuple[Callable[[LLMEngine], object], Future]] = (
            queue.SimpleQueue())
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.steps = 0
        self.busy_seconds = 0.0  # time inside engine.step(): the rest is idle or overhead
        # Work done in bounded pieces between steps (a decode worker's staged KV
        # imports): run once before each step while it has any.
        self.between_steps: BetweenSteps | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._commands.put((lambda _e: None, Future()))  # wake the thread
        self._thread.join(timeout=10)

    def call(self, fn: Callable[[LLMEngine], T]) -> Future[T]:
        """Run fn(engine) on the loop thread between steps; its result or error in a Future."""
        fut: Future[T] = Future()
        self._commands.put((fn, fut))  # type: ignore[arg-type]
        return fut

    def _run_commands(self, block: bool) -> None:
        try:
            fn, fut = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.engine))
                except BaseException as e:  # handed to the caller, not raised here
                    fut.set_exception(e)
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        while not self._stopped.is_set():
            bg = self.between_steps
            pending = bg is not None and bg.pending()
            self._run_commands(block=not (pending or self.engine.has_unfinished()))
            if bg is not None and bg.pending():
                bg.run(self.engine)
            if self._stopped.is_set() or not self.engine.has_unfinished():
                continue
            t0 = time.perf_counter()
            try:
                outputs = self.engine.step()
            except Exception as e:
                log.error("engine step failed:\n%s", traceback.format_exc())
                self._fail_all(e)
                continue
            self.steps += 1
            self.busy_seconds += time.perf_counter() - t0
            if outputs:
                self._on_outputs(outputs)

    def _fail_all(self, err: Exception) -> None:
        """A step raised outside what the engine isolates per request (a request that
        breaks the forward pass, sampling or post-processing fails alone, inside
        ``step()``): the engine's own state is now suspect, so every request ends with
        finish reason "error" (freeing its blocks) rather than hanging."""
        outs = []
        message = f"engine step failed: {type(err).__name__}: {err}"
        for rid in list(self.engine.requests):
            out = self.engine.abort(rid, error=message)
            if out is not None:
                outs.append(out)
        if outs:
            self._on_outputs(outs)
