"""Server-sent events for streamed completions, and noticing a client that has gone.

Framing, as OpenAI's API sends it and its clients parse it: each event is one line
``data: <json>`` and a blank line; the stream ends with ``data: [DONE]``. An error
after the 200 has gone out is an event ``data: {"error": {...}}`` (the openai client
raises it as an APIError), then ``[DONE]``.

Disconnects: a task waits for the ASGI ``http.disconnect`` message alongside the work,
and cancels the work the moment it arrives. Waiting for the next write to fail instead
would leave a request that is queued, or prefilling a long prompt, running for
nothing; cancelling closes its router streams, which frees its KV on every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

T = TypeVar("T")
DONE = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The client closed the connection before the work was done."""


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() \
        + b"\n\n"


async def _disconnected(receive: Receive) -> None:
    # Once the body has been read, the server's next message is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """``work``'s result, or ClientGone (``work`` cancelled) if the client leaves first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this coroutine itself is cancelled
        for t in (task, watch):
            t.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        raise ClientGone
    return task.result()


class EventStream(Response):
    """A ``text/event-stream`` response of pre-framed events. ``on_close`` runs when the
    stream ends for any reason: sent in full, failed, or the client went away."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None],
                 on_close: Callable[[], Awaitable[None]]) -> None:
        self.events = events
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        # no-cache and no proxy buffering: each event must reach the client when sent.
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            with contextlib.suppress(ClientGone):
                await until_disconnect(receive, self._send_all(send))
        finally:
            await self.on_close()

    async def _send_all(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        async with contextlib.aclosing(self.events) as events:
            async for chunk in events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
