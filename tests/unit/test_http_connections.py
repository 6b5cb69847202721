"""The HTTP server's connection bounds (router/http/connections.py), on a real uvicorn
server over loopback: a connection that never finishes its request head is closed
after the head timeout, one that finished it is served, a body that stalls is answered
408 and closed while one that keeps coming is read, and connections beyond the cap are
closed at once while the ones inside it are served."""

from __future__ import annotations

import asyncio
import json
import socket
from types import SimpleNamespace

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from router.http import connections
from router.http.app import OpenAIApi
from router.http.connections import BoundedH11Protocol
from router.server_config import ServerConfig


async def hello(_request: object) -> PlainTextResponse:
    return PlainTextResponse("hi")


def api() -> Starlette:
    """The real API app, over a router that only names its model: a body that arrives
    whole gets the 404 for another model, so reaching it proves the body was read."""
    router = SimpleNamespace(config=SimpleNamespace(engine=SimpleNamespace(model="m")))
    return OpenAIApi(router, ServerConfig(), None, lambda: True).app()  # type: ignore[arg-type]


async def serving(app: Starlette | None = None
                  ) -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(
        app or Starlette(routes=[Route("/", hello)]), http=BoundedH11Protocol,
        lifespan="off", log_level="warning"))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    return server, task, sock.getsockname()[1]


async def closed(reader: asyncio.StreamReader) -> bool:
    """True when the server closed the connection (EOF or reset) within a few s."""
    try:
        return await asyncio.wait_for(reader.read(), timeout=10) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def get(port: int, writer_reader: tuple | None = None) -> bytes:
    reader, writer = writer_reader or await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    body = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    return body


def test_a_head_never_finished_is_closed_after_the_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connections, "HEAD_TIMEOUT_S", 0.5)

    async def go() -> None:
        server, task, port = await serving()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n")  # ...and never the blank line
            for _ in range(3):  # a slow-loris drip does not keep it open
                await asyncio.sleep(0.1)
                writer.write(b"x-drip: 1\r\n")
            assert await closed(reader)
            slow_but_whole = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.sleep(0.1)  # inside the timeout: served
            assert (await get(port, slow_but_whole)).endswith(b"hi")
        finally:
            server.should_exit = True
            await task
    asyncio.run(go())


BODY = b'{"model": "other", "prompt": "' + b"x" * 60 + b'"}'
HEAD = (b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n" % len(BODY))


def response(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_stalled_body_is_answered_408_and_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connections, "BODY_IDLE_TIMEOUT_S", 0.5)

    async def go() -> None:
        server, task, port = await serving(api())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(HEAD + b"\r\n" + BODY[:10])  # ...and never the rest
            raw = await asyncio.wait_for(reader.read(), timeout=10)  # to EOF: it closes
            status, body = response(raw)
            assert status == 408 and body["error"]["code"] == "request_timeout"
            assert b"connection: close" in raw.lower()
        finally:
            writer.close()  # else a server that kept it would wait for it to stop
            server.should_exit = True
            await task
    asyncio.run(go())


def test_a_body_that_keeps_coming_is_read_past_the_idle_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connections, "BODY_IDLE_TIMEOUT_S", 0.5)

    async def go() -> None:
        server, task, port = await serving(api())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(HEAD + b"connection: close\r\n\r\n")  # so the answer ends in EOF
            for i in range(0, len(BODY), 10):  # 7 pieces, 0.2 s apart: longer than the
                await asyncio.sleep(0.2)  # bound in all, never idle for as long
                writer.write(BODY[i:i + 10])
            status, body = response(await asyncio.wait_for(reader.read(), timeout=10))
            assert status == 404 and body["error"]["code"] == "model_not_found"
        finally:
            writer.close()
            server.should_exit = True
            await task
    asyncio.run(go())


def test_connections_beyond_the_cap_are_closed_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connections, "max_connections", lambda: 4)

    async def go() -> None:
        server, task, port = await serving()
        try:
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
            await asyncio.sleep(0.1)
            extra_reader, _ = await asyncio.open_connection("127.0.0.1", port)
            assert await closed(extra_reader)
            assert (await get(port, held[0])).endswith(b"hi")  # the held ones are served
            for _, w in held[1:]:
                w.close()
            await asyncio.sleep(0.1)
            assert (await get(port)).endswith(b"hi")  # room again
        finally:
            server.should_exit = True
            await task
    asyncio.run(go())
