"""The HTTP server's connections, bounded: how many may be open, how long one may take
to send a request's head, and how long its body may stall.

uvicorn (h11) waits for a request head as long as the client keeps the connection
open, and takes every connection the OS accepts, so slow clients that never finish a
head (slow-loris) or just open sockets could hold file descriptors until the process
runs out, and then nothing can accept or open a file (metrics, logs, model files).
This protocol closes a connection whose request head is not complete within
HEAD_TIMEOUT_S of its opening (or of its previous response), and closes at once any
connection beyond max_connections.

A body has no such total deadline: a large one over a slow link may take minutes. As
nginx's client_body_timeout does, the bound is on the gap: a body that has sent nothing
for BODY_IDLE_TIMEOUT_S is answered 408 (the API's JSON error) and its connection
closed, where uvicorn would wait for the rest for as long as the client held it open.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from router.http.errors import body_timed_out, error_body

log = logging.getLogger(__name__)

HEAD_TIMEOUT_S = 30.0  # nginx's client_header_timeout is 60 s; a request head is small
BODY_IDLE_TIMEOUT_S = 30.0  # between two reads of a body (nginx's client_body_timeout: 60 s)


def max_connections() -> int:
    """Half of the file descriptors this process may open: the other half stays for
    the gRPC server, the workers' channels, Ray, logs and metrics."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(64, soft // 2)


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head, a bound on the gaps
    in its body, and a cap on open connections (max_connections())."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

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
        self._arm_body_timer()  # bytes came: the gap starts again (or the body is done)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()  # the next request on this connection gets its own
        self._arm_body_timer()  # a body still owed (the app answered without it) too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        self._disarm_body_timer()
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

    def _arm_body_timer(self) -> None:
        """Armed while the client owes body bytes (h11's SEND_BODY), from the last ones."""
        self._disarm_body_timer()
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            self._body_timer = self.loop.call_later(BODY_IDLE_TIMEOUT_S,
                                                    self._body_timed_out)

    def _disarm_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        if self.flow.read_paused:  # we stopped reading (the app's buffer is full): not
            self._arm_body_timer()  # the client's gap
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            self._send_408()
            # The app is waiting for the rest of the body: it reads a disconnect now,
            # and anything it sends after is dropped (the response is out).
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    def _send_408(self) -> None:
        body = json.dumps(error_body(body_timed_out(BODY_IDLE_TIMEOUT_S))).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        for event in (h11.Response(status_code=408, headers=headers, reason=b"Request Timeout"),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event) or b"")
