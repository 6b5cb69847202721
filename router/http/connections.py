"""The HTTP server's connections, bounded: how many may be open, and how long one may
take to send a request's head.

uvicorn (h11) waits for a request head as long as the client keeps the connection
open, and takes every connection the OS accepts, so slow clients that never finish a
head (slow-loris) or just open sockets could hold file descriptors until the process
runs out, and then nothing can accept or open a file (metrics, logs, model files).
This protocol closes a connection whose request head is not complete within
HEAD_TIMEOUT_S of its opening (or of its previous response), and closes at once any
connection beyond max_connections.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

HEAD_TIMEOUT_S = 30.0  # nginx's client_header_timeout is 60 s; a request head is small


def max_connections() -> int:
    """Half of the file descriptors this process may open: the other half stays for
    the gRPC server, the workers' channels, Ray, logs and metrics."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(64, soft // 2)


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head and a cap on open
    connections (max_connections())."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > max_connections():
            log.warning("HTTP: %d connections open, at the limit: closing a new one",
                        len(self.connections) - 1)
            transport.abort()
            return
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is in: the request runs
            self._disarm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()  # the next request on this connection gets its own

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.transport.close()
