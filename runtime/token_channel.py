"""A worker's token stream to the router over its own TCP connection.

Ray's streaming generator costs about 2 ms of the router's CPU (and as much of the
worker's) per item, whatever its size; this channel 0.4-0.6 ms (bench/stream_transport.py).
With one item per engine step that was a quarter of the router's CPU per token on CPU,
and on a GPU, where a step takes a few milliseconds, it would be a good part of a core
on each side. So the step batches travel on a plain connection instead, and Ray carries
only the calls:

    router --stream_channel()--> actor          (a Ray call: host, port and a secret)
    router --TCP connect, the secret--> worker  (the worker checks it, then writes)
    worker --[4-byte length][pickle]...--> router   one frame per StepBatch

Trust: the secret travels on Ray's (authenticated) channel, so only the router that
asked reads the stream; the worker listens on its node's address only, and only while
it lives. The router unpickles with an allow-list of the message classes, so even a
forged frame cannot name a callable. The connection is the stream: it ends only when
the worker dies (the router then loses the worker, as it did when Ray's generator
broke) or the router stops reading. One reader at a time; a newer one replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import logging
import pickle
import secrets
import struct
from collections.abc import AsyncIterator, Callable
from typing import NamedTuple

from messages import StepBatch

log = logging.getLogger(__name__)
SECRET_BYTES = 32
HANDSHAKE_TIMEOUT_S = 10.0  # a connection that does not authenticate by then is dropped
CONNECT_TIMEOUT_S = 30.0
MAX_FRAME_BYTES = 256 << 20  # a step's events with logprobs are KBs; this is a sanity cap
_LENGTH = struct.Struct("!I")
# Everything a StepBatch is made of (and nothing else may be unpickled).
_ALLOWED = {
    ("messages.stream", "StepBatch"), ("messages.stream", "TokenEvent"),
    ("messages.stats", "WorkerStats"), ("messages.stats", "PoolState"),
    ("engine.stats", "EngineStats"), ("engine.logprobs", "TokenLogprobs"),
}


class ChannelAddress(NamedTuple):
    host: str
    port: int
    secret: bytes


class TokenChannelError(ConnectionError):
    """The channel broke or carried something that is not a StepBatch."""


def encode(batch: StepBatch) -> bytes:
    return _frame(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))


def _frame(body: bytes) -> bytes:
    return _LENGTH.pack(len(body)) + body


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in _ALLOWED:
            raise TokenChannelError(f"the token channel carried {module}.{name}, which is "
                                    "not a stream message")
        return super().find_class(module, name)  # type: ignore[no-any-return]


def decode(body: bytes) -> StepBatch:
    try:
        batch = _Unpickler(io.BytesIO(body)).load()
    except TokenChannelError:
        raise
    except Exception as e:
        raise TokenChannelError(f"a token channel frame did not decode: {e}") from None
    if isinstance(batch, str):  # the worker's last word: why its stream failed
        raise TokenChannelError(f"the worker's stream failed: {batch}")
    if not isinstance(batch, StepBatch):
        raise TokenChannelError(f"the token channel carried a {type(batch).__name__}")
    return batch


# -- the worker's side ------------------------------------------------------------------
class TokenChannelServer:
    """Serves ``source()``'s step batches to the one authenticated reader. Runs on the
    actor's event loop (the stream's queue lives there)."""

    def __init__(self, source: Callable[[], AsyncIterator[StepBatch]]) -> None:
        self.source = source
        self._secret = secrets.token_bytes(SECRET_BYTES)
        self._server: asyncio.Server | None = None
        self._address: ChannelAddress | None = None
        self._reader_task: asyncio.Task[None] | None = None  # the one serving a reader

    async def open(self, host: str) -> ChannelAddress:
        """Listen on ``host`` (once) and say where and with what secret to connect."""
        if self._address is None:
            self._server = await asyncio.start_server(self._serve, host, 0)
            port = self._server.sockets[0].getsockname()[1]
            self._address = ChannelAddress(host, port, self._secret)
        return self._address

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> None:
        try:
            got = await asyncio.wait_for(reader.readexactly(SECRET_BYTES),
                                         HANDSHAKE_TIMEOUT_S)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        if not hmac.compare_digest(got, self._secret):
            log.warning("token channel: a connection from %s had the wrong secret",
                        writer.get_extra_info("peername"))
            writer.close()
            return
        if self._reader_task is not None:  # a newer reader replaces the old one
            self._reader_task.cancel()
        self._reader_task = asyncio.current_task()
        try:
            async with contextlib.aclosing(self.source()) as batches:
                async for batch in batches:
                    writer.write(encode(batch))
                    await writer.drain()  # a reader that falls behind holds the stream
        except (ConnectionError, asyncio.CancelledError):
            pass  # the reader went away (or was replaced): the events wait in the queue
        except Exception as e:
            log.exception("token channel: the stream failed")
            with contextlib.suppress(Exception):  # tell the reader why, then break
                writer.write(_frame(pickle.dumps(f"{type(e).__name__}: {e}")))
                await asyncio.wait_for(writer.drain(), HANDSHAKE_TIMEOUT_S)
            writer.transport.abort()
            return
        finally:
            if self._reader_task is asyncio.current_task():
                self._reader_task = None
        with contextlib.suppress(Exception):
            writer.close()


# -- the router's side ------------------------------------------------------------------
async def read_channel(address: ChannelAddress) -> AsyncIterator[StepBatch]:
    """The worker's step batches, for as long as the connection lasts; it never ends
    cleanly (a worker's stream has no end): TokenChannelError when it breaks."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(address.host, address.port), CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as e:
        raise TokenChannelError(f"could not reach the worker's token channel at "
                                f"{address.host}:{address.port}: {e}") from None
    try:
        writer.write(address.secret)
        while True:
            try:
                (n,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                if n > MAX_FRAME_BYTES:
                    raise TokenChannelError(f"a token channel frame of {n} bytes")
                body = await reader.readexactly(n)
            except asyncio.IncompleteReadError:
                raise TokenChannelError("the worker's token channel closed") from None
            except ConnectionError as e:
                raise TokenChannelError(f"the worker's token channel broke: {e}") from None
            yield decode(body)
    finally:
        writer.close()
