"""The token channel (runtime/token_channel.py): a worker's step batches to the router on
a connection of its own -- in order, to the authenticated reader only, never unpickling
anything but stream messages, and breaking (with the worker's reason) rather than
ending quietly."""

from __future__ import annotations

import asyncio
import os
import pickle
import struct
from collections.abc import AsyncIterator

import pytest

from engine.logprobs import TokenLogprobs
from engine.stats import EngineStats
from messages import PoolState, StepBatch, TokenEvent, WorkerStats
from runtime.token_channel import (
    ChannelAddress,
    TokenChannelError,
    TokenChannelServer,
    decode,
    encode,
    read_channel,
)


def stats() -> WorkerStats:
    engine = EngineStats(**{f: 0 for f in EngineStats.__dataclass_fields__})
    return WorkerStats("decode-0", "decode", engine, steps=3, busy_seconds=0.5,
                       pool=PoolState(1, 2, 3, 4, 5, 15))


def batch(i: int) -> StepBatch:
    events = [TokenEvent(f"req-{i}@1", [i, i + 1], [TokenLogprobs(-0.5, [(i, -0.5)])],
                         "length" if i % 2 else None, num_cached_tokens=i)]
    return StepBatch("decode-0", events, stats())


class Source:
    """A worker's stream(): the batches a test feeds it, and whether it was closed."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[StepBatch | Exception] = asyncio.Queue()
        self.opened = 0
        self.closed = 0

    async def stream(self) -> AsyncIterator[StepBatch]:
        self.opened += 1
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.closed += 1


async def serving() -> tuple[Source, TokenChannelServer, ChannelAddress]:
    """A worker's channel, listening on loopback, and the stream it serves."""
    src = Source()
    server = TokenChannelServer(src.stream)
    return src, server, await server.open("127.0.0.1")


async def take(reader: AsyncIterator[StepBatch], n: int) -> list[StepBatch]:
    return [await asyncio.wait_for(anext(reader), 10) for _ in range(n)]


def test_a_frame_round_trips_every_field() -> None:
    b = batch(3)
    assert decode(encode(b)[4:]) == b


def test_the_reader_gets_every_batch_in_order() -> None:
    async def go() -> None:
        src, server, address = await serving()
        for i in range(5):
            src.queue.put_nowait(batch(i))
        reader = read_channel(address)
        assert await take(reader, 5) == [batch(i) for i in range(5)]
        src.queue.put_nowait(batch(9))  # and what comes later
        assert await take(reader, 1) == [batch(9)]
        await reader.aclose()
        await server.close()
    asyncio.run(go())


def test_a_reader_without_the_secret_gets_nothing() -> None:
    async def go() -> None:
        src, server, address = await serving()
        src.queue.put_nowait(batch(0))
        forged = ChannelAddress(address.host, address.port, os.urandom(32))
        with pytest.raises(TokenChannelError, match="closed"):
            await take(read_channel(forged), 1)
        assert src.opened == 0  # the stream was never started for it
        assert await take(read_channel(address), 1) == [batch(0)]  # still there
        await server.close()
    asyncio.run(go())


def test_a_frame_naming_other_code_is_refused_not_run(tmp_path: object) -> None:
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("touch /nonexistent-pdserve-evil",))

    with pytest.raises(TokenChannelError, match="system, which is not a stream message"):
        decode(pickle.dumps(Evil()))
    with pytest.raises(TokenChannelError, match="carried a list"):
        decode(pickle.dumps([1, 2]))
    with pytest.raises(TokenChannelError, match="did not decode"):
        decode(b"\x80\x05garbage")


def test_a_forged_server_cannot_make_the_reader_run_code() -> None:
    """A listener that is not the worker (say, after a port was reused) gets the secret
    but still cannot get past the allow-list."""
    async def go() -> None:
        async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(32)
            body = pickle.dumps(os.system)
            writer.write(struct.pack("!I", len(body)) + body)
            await writer.drain()

        server = await asyncio.start_server(fake, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(TokenChannelError, match="not a stream message"):
            await take(read_channel(ChannelAddress("127.0.0.1", port, b"x" * 32)), 1)
        server.close()
    asyncio.run(go())


def test_a_failed_stream_breaks_the_channel_with_its_reason() -> None:
    async def go() -> None:
        src, server, address = await serving()
        reader = read_channel(address)
        src.queue.put_nowait(batch(0))
        src.queue.put_nowait(RuntimeError("the engine thread died"))
        assert await take(reader, 1) == [batch(0)]
        with pytest.raises(TokenChannelError, match="RuntimeError: the engine thread died"):
            await take(reader, 1)
        await server.close()
    asyncio.run(go())


def test_a_newer_reader_replaces_the_old_one() -> None:
    async def go() -> None:
        src, server, address = await serving()
        first = read_channel(address)
        src.queue.put_nowait(batch(0))
        assert await take(first, 1) == [batch(0)]
        second = read_channel(address)
        got = asyncio.ensure_future(take(second, 1))
        while src.opened < 2:  # connected and authenticated: the stream is its now
            await asyncio.sleep(0.01)
        src.queue.put_nowait(batch(1))
        assert await got == [batch(1)]
        with pytest.raises(TokenChannelError):
            await take(first, 1)
        assert (src.opened, src.closed) == (2, 1)  # the old stream was closed
        await second.aclose()
        await server.close()
    asyncio.run(go())


def test_a_reader_that_goes_away_closes_the_stream() -> None:
    async def go() -> None:
        src, server, address = await serving()
        reader = read_channel(address)
        src.queue.put_nowait(batch(0))
        await take(reader, 1)
        await reader.aclose()
        for i in range(1, 50):  # the worker notices on its next writes
            src.queue.put_nowait(batch(i))
            await asyncio.sleep(0.01)
            if src.closed:
                break
        assert src.closed == 1
        await server.close()
    asyncio.run(go())


def test_an_unreachable_channel_fails_fast_with_the_address() -> None:
    async def go() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(TokenChannelError, match=f"127.0.0.1:{port}"):
            await take(read_channel(ChannelAddress("127.0.0.1", port, b"x" * 32)), 1)
    asyncio.run(go())
