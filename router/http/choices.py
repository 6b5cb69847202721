"""A request's choices: one router stream each, run as its own task, merged into one
sequence of ``(choice index, Delta | Final)`` in arrival order.

Who ends what: ``Choices`` owns the tasks. ``close()`` cancels every one still running;
its ``aclosing`` then closes that router stream, which aborts the request on every
worker holding it and frees its KV blocks (the path a cancelled gRPC call takes). The
edge calls ``close()`` whatever happens: the response is sent, an error is raised, or
the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from router.errors import RequestFailedError
from router.http.errors import HttpError, api_error
from router.http.requests import Choice
from router.request_state import Delta, Final

if TYPE_CHECKING:
    from router.core import Router
    from router.metrics import Metrics

Item = tuple[int, Delta | Final]


class Choices:
    def __init__(self, router: Router, request_id: str, choices: Sequence[Choice],
                 metrics: Metrics | None = None) -> None:
        self.router = router
        self.request_id = request_id
        self.choices = choices
        self.metrics = metrics
        self._queue: asyncio.Queue[tuple[int, Delta | Final | HttpError]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._buffer: list[Item] = []
        self._pending = len(choices)  # choices whose Final has not been read yet

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._pump(c)) for c in self.choices]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def wait_started(self) -> None:
        """Wait until every choice has its first item, raising the first error.

        Admission errors (queue full, no workers, a duplicate) come before a request's
        first token; waiting for the first item lets the edge answer them with their
        own status code instead of a 200 whose stream holds an error."""
        seen: set[int] = set()
        while len(seen) < len(self.choices):
            item = await self._next()
            self._buffer.append(item)
            seen.add(item[0])

    async def items(self) -> AsyncIterator[Item]:
        """Every item, until each choice's Final; raises HttpError if a choice fails."""
        buffered, self._buffer = self._buffer, []
        for item in buffered:
            yield item
        while self._pending:
            yield await self._next()

    async def _next(self) -> Item:
        index, item = await self._queue.get()
        if isinstance(item, HttpError):
            raise item
        if isinstance(item, Final):
            self._pending -= 1
            if item.finish_reason == "error":
                raise api_error(RequestFailedError(item.error or "the request failed"))
            if item.finish_reason == "abort":  # only a router shutting down aborts it
                raise HttpError(503, "the request was aborted: the server is stopping",
                                type_="server_error", code="unavailable")
        return index, item

    async def _pump(self, c: Choice) -> None:
        stream = self.router.generate(c.prompt_token_ids, c.params,
                                      f"{self.request_id}-{c.index}")
        reason, code = "error", "INTERNAL"
        last_token_at: float | None = None
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    if isinstance(item, Delta):
                        last_token_at = self._observe(item, last_token_at)
                    else:
                        reason = item.finish_reason
                        code = "INTERNAL" if reason == "error" else "OK"
                    self._queue.put_nowait((c.index, item))
        except asyncio.CancelledError:
            reason, code = "abort", "CANCELLED"
            raise
        except Exception as e:
            err = api_error(e)
            code = err.grpc_code.name if err.grpc_code is not None else "INTERNAL"
            self._queue.put_nowait((c.index, err))
        finally:
            if self.metrics is not None:  # the gRPC edge's series, with its code names
                self.metrics.count_request(reason, code)

    def _observe(self, d: Delta, last_token_at: float | None) -> float | None:
        """Inter-token latency as the client sees it (as the gRPC edge measures it)."""
        if not d.token_ids:
            return last_token_at
        now = time.monotonic()
        if self.metrics is not None and last_token_at is not None:
            self.metrics.observe_tokens(len(d.token_ids), now - last_token_at)
        return now


@contextlib.asynccontextmanager
async def running(router: Router, request_id: str, choices: Sequence[Choice],
                  metrics: Metrics | None) -> AsyncIterator[Choices]:
    """Choices started, and closed on the way out whatever happened."""
    c = Choices(router, request_id, choices, metrics)
    c.start()
    try:
        yield c
    finally:
        await c.close()
