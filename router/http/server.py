"""The HTTP server (uvicorn) on the service's event loop, beside the gRPC server.

It binds its socket itself, at construction: a taken port fails at once, before the
workers load (as the gRPC server does), and a port asked of the OS is known before
``start``. uvicorn's own signal handling is turned off: ``pdserve serve`` owns SIGINT
and SIGTERM and stops every server through Service.stop. Connections are bounded in
number and in the time a request head may take (router/http/connections.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import uvicorn

from router.http.app import OpenAIApi
from router.http.connections import BoundedH11Protocol
from router.server_config import ServerConfig

if TYPE_CHECKING:
    from router.core import Router
    from router.metrics import Metrics

# Service.stop ends every router stream before stopping the servers (the shutdown grace
# is the router's), so connections only have their last bytes left to send.
FLUSH_GRACE_S = 2.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the service's owner handles signals (see the module docstring)


class HttpServer:
    """``port`` is the bound port. ``start`` serves; ``stop`` closes the listening socket,
    lets responses in flight finish sending for FLUSH_GRACE_S, then cancels what is left
    (which aborts those requests)."""

    def __init__(self, router: Router, config: ServerConfig, metrics: Metrics | None,
                 ready: Callable[[], bool]) -> None:
        self.config = config
        self.api = OpenAIApi(router, config, metrics, ready)
        self.sock = _bind(config.host, config.http_port)
        self.port: int = self.sock.getsockname()[1]
        self._server = _Server(uvicorn.Config(
            self.api.app(), lifespan="off", http=BoundedH11Protocol, log_level="warning",
            access_log=False, server_header=False,
            ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key,
            timeout_graceful_shutdown=FLUSH_GRACE_S))
        self._task: asyncio.Task[None] | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.config.tls else "http"

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._server.serve(sockets=[self.sock]))
        while not self._server.started:  # startup is quick: the socket is already bound
            if self._task.done():
                self._task.result()  # raises what stopped it (a bad TLS key, say)
                raise OSError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.api.stopping = True  # /health and /ready say 503 from now on
        if self._task is None:
            self.sock.close()
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # Lets a restarted server take its port back from connections in TIME_WAIT; on
    # Linux it does not let two servers listen on one port (SO_REUSEPORT would).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise OSError(f"could not listen on {shown} (HTTP): {e.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock
