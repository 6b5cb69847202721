"""Token events from the engine thread to the actor's event loop, one consumer.

A decode or colocated worker has one long-lived stream (``StreamingWorker.stream``):
the router reads it, through the worker's token channel (runtime/token_channel.py),
for the worker's whole life. Events are produced on the engine
thread (step outputs) or the event loop (a request finished on arrival); both hand them
over with ``emit``. The queue belongs to the event loop, so ``bind`` must have been
called there before anything is emitted (the first request or the stream call does it);
events emitted before that are dropped (there is no request to carry them yet).
"""

from __future__ import annotations

import asyncio

from engine.outputs import RequestOutput
from messages import TokenEvent


class TokenStream:
    def __init__(self) -> None:
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[list[TokenEvent]] | None = None

    def bind(self) -> None:
        """Called on the actor's event loop: events go to it from now on."""
        if self._queue is None:
            self._aloop = asyncio.get_running_loop()
            self._queue = asyncio.Queue()

    def emit(self, events: list[TokenEvent]) -> None:
        """Any thread: queue one step's events for the stream."""
        if self._aloop is not None and self._queue is not None and events:
            self._aloop.call_soon_threadsafe(self._queue.put_nowait, events)

    async def next(self, timeout_s: float) -> list[TokenEvent]:
        """Every event queued so far, waiting up to ``timeout_s`` for the first (none:
        an empty list). Steps that piled up while the consumer was busy coalesce."""
        self.bind()
        assert self._queue is not None
        if not self._queue.empty():  # the busy case: no timer, no task (wait_for's cost)
            events = self._queue.get_nowait()
        else:
            try:
                events = await asyncio.wait_for(self._queue.get(), timeout=timeout_s)
            except TimeoutError:
                events = []
        while not self._queue.empty():
            events += self._queue.get_nowait()
        return events


def token_event(o: RequestOutput) -> TokenEvent:
    """One request's part of a step: its new tokens (with their logprobs) and its end."""
    lps = o.logprobs[-len(o.new_token_ids):] if o.new_token_ids and o.logprobs else []
    return TokenEvent(o.request_id, list(o.new_token_ids), lps, o.finish_reason,
                      o.num_cached_tokens, o.error)
