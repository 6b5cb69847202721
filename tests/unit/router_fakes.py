"""In-process fake worker actors for testing the router's lifecycle without Ray.

They answer the actor API of runtime/actors.py with the semantics that matter to the
router -- reservations that take blocks from a small pool, prefills that can be held
in flight, a token stream, aborts (remembered, like runtime/aborted_ids.py), and death
-- and count every block they hand out, so a test can assert that every path gives
every block back. Tokens are a function of the whole sequence, as greedy decoding is,
so a request placed again must continue with exactly the same tokens.

Every call is also written, in the order the actors receive them, to the cluster's
``journal`` (worker id, method, request id): the order *across* actors, which the
per-actor ``calls`` cannot show (say, that a prefill worker was told to abort before the
decode worker it sends KV to).

Each call's "remote()" returns an asyncio future, which the router awaits as it would a
Ray ObjectRef; a dead actor fails its pending and later calls with ActorDiedError.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import ray

from engine.config import ModelConfig
from engine.errors import InvalidRequestError
from engine.stats import EngineStats
from engine.tokenizer import Tokenizer, load_tokenizer
from engine.weights import load_model_config, resolve_model
from messages import (
    Endpoint,
    KVSpec,
    PrefillAborted,
    PrefillResult,
    PrefillTask,
    StepBatch,
    TokenEvent,
    TokenLogprobs,
    TransferHandle,
    WorkerStats,
)
from messages.transfer import KVTransferError
from router.config import RouterConfig
from runtime.actors import NodeInfo
from runtime.token_channel import ChannelAddress, TokenChannelServer

SPEC = KVSpec((1, 2, 16, 1, 8), "float32", 4)

# The router reads the model's config and tokenizer from its GGUF at every start (~2 s
# on the 2-core machine): once per process is enough for tests, which never change them.
# Loaded at import, so processes forked after collection (mutation runs) share them.
_CONFIGS: dict[str, ModelConfig] = {}
_TOKENIZERS: dict[str, Tokenizer | None] = {}


def cached_model_config(src: Any) -> ModelConfig:
    key = repr(src)
    if key not in _CONFIGS:
        _CONFIGS[key] = load_model_config(src)
    return _CONFIGS[key]


def cached_tokenizer(src: Any) -> Tokenizer | None:
    key = repr(src)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(src)
    return _TOKENIZERS[key]


_DEFAULT_MODEL = resolve_model(RouterConfig().engine.model)
cached_model_config(_DEFAULT_MODEL)
cached_tokenizer(_DEFAULT_MODEL)


def next_token(seq: list[int]) -> int:
    """The fake model: deterministic in the whole sequence, like greedy decoding."""
    return (len(seq) * 7 + seq[-1] * 3) % 4000 + 100


_ATTEMPT_ID = re.compile(r"^(.*)@[0-9a-f]{12}\.(\d+)$")


def short_id(attempt_id: str) -> str:
    """A worker-side id without its call key ("r@<key>.1" -> "r@1"): the fakes keep
    their books, and tests name attempts, by request id and attempt number."""
    m = _ATTEMPT_ID.match(attempt_id)
    return f"{m[1]}@{m[2]}" if m else attempt_id


class _Method:
    def __init__(self, actor: FakeActor, fn: Callable[..., Coroutine[Any, Any, Any]]) -> None:
        self.actor, self.fn = actor, fn

    def remote(self, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        return self.actor.submit(self.fn(*args, **kwargs))


@dataclass
class FakeActor:
    """One worker of any role."""

    worker_id: str
    role: str
    num_blocks: int = 64
    # decode: the most blocks a prompt may need (the engine refuses a bigger one for
    # good, InvalidRequestError); None: any that the pool could hold.
    max_prompt_blocks: int | None = None
    dead: bool = False
    pending: set[asyncio.Future[Any]] = field(default_factory=set)
    free_blocks: list[int] = field(default_factory=list)
    reserved: dict[str, list[int]] = field(default_factory=dict)
    # The request as a reservation creates it (the engine's reserve takes its params;
    # start runs it with them).
    reserved_params: dict[str, Any] = field(default_factory=dict)
    # decode: the cached-token count each start was given (the engine reports it).
    started_cached: dict[str, int] = field(default_factory=dict)
    # decode/colocated: the request's age each reserve/generate was given.
    ages: dict[str, float] = field(default_factory=dict)
    start_delay_s: float = 0.0  # how long importing the KV takes
    pool_report: Any = None  # a PoolState its step batches carry (the real one: 1/s)
    stream_broken: bool = False  # the token stream fails while the actor lives on
    running: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> state
    aborted: set[str] = field(default_factory=set)  # full ids, as the router sent them
    sent_to: dict[str, tuple[str, list[int]]] = field(default_factory=dict)  # prefill: KV dest
    calls: list[tuple[str, str]] = field(default_factory=list)  # (method, request id)
    # Shared by every actor of a FakeCluster: (worker id, method, request id).
    journal: list[tuple[str, str, str]] = field(default_factory=list)
    # Gates a test may hold shut, to catch a request in that call.
    reserve_gate: asyncio.Event = field(default_factory=asyncio.Event)
    prefill_gate: asyncio.Event = field(default_factory=asyncio.Event)
    start_gate: asyncio.Event = field(default_factory=asyncio.Event)
    abort_gate: asyncio.Event = field(default_factory=asyncio.Event)  # held: abort pends
    # Held: the engine is in one long step (a long prompt's prefill on CPU), so calls
    # that wait for a step boundary (stats) pend; the actor's own loop still answers.
    engine_idle: asyncio.Event = field(default_factory=asyncio.Event)
    thawed: asyncio.Event = field(default_factory=asyncio.Event)  # held: frozen, see freeze
    fail_next_start: bool = False
    frozen: bool = False  # freeze(): no steps, heartbeats or answers
    ready: asyncio.Event | None = None  # held: the actor is still starting (no ping back)
    start_error: Exception | None = None  # what its first ping raises (it died loading)
    # Raised by the next prefill (inside the worker, as a failed step or a drain would).
    fail_next_prefill: Exception | None = None
    fail_next_generate: Exception | None = None
    # What a prefill reports: cached prompt tokens, queue/prefill/transfer seconds, bytes.
    prefill_report: tuple[int, float, float, float, int] = (0, 0.0, 0.0, 0.0, 0)
    events: asyncio.Queue[list[TokenEvent]] = field(default_factory=asyncio.Queue)
    kv_layout: KVSpec = SPEC  # what kv_spec() reports (the registry checks it)

    def __post_init__(self) -> None:
        self.free_blocks = list(range(1, self.num_blocks + 1))
        self.reserve_gate.set()
        self.prefill_gate.set()
        self.start_gate.set()
        self.abort_gate.set()
        self.engine_idle.set()
        self.thawed.set()
        self._ticker: asyncio.Task[None] | None = None
        self._full_ids: dict[str, str] = {}  # short_id -> the id the router sent
        self._channel: TokenChannelServer | None = None
        if self.role in ("decode", "colocated"):
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    def __getattr__(self, name: str) -> _Method:
        fn = getattr(self, "_" + name, None)
        if fn is None:
            raise AttributeError(name)
        return _Method(self, fn)

    # -- plumbing ------------------------------------------------------------------------
    def submit(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.dead:
            coro.close()
            fut.set_exception(ray.exceptions.ActorDiedError())
            return fut
        task = asyncio.get_running_loop().create_task(coro)

        def done(t: asyncio.Task[Any]) -> None:
            self.pending.discard(fut)
            if fut.done():
                return
            if t.cancelled():
                fut.cancel()
            elif t.exception() is not None:
                exc = t.exception()
                fut.set_exception(exc if isinstance(exc, ray.exceptions.RayError) else
                                  ray.exceptions.RayTaskError("fake", "", exc))
            else:
                fut.set_result(t.result())

        task.add_done_callback(done)
        self.pending.add(fut)
        return fut

    def die(self) -> None:
        """SIGKILL: every pending call fails, nothing it held matters any more."""
        self.dead = True
        if self._ticker is not None:
            self._ticker.cancel()
        for fut in list(self.pending):
            if not fut.done():
                fut.set_exception(ray.exceptions.ActorDiedError())
        self.events.put_nowait([])  # wake the stream so it notices

    @property
    def blocks_owned(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def _take(self, n: int) -> list[int] | None:
        if n > len(self.free_blocks):
            return None
        out, self.free_blocks = self.free_blocks[:n], self.free_blocks[n:]
        return out

    def _free(self, blocks: list[int]) -> None:
        self.free_blocks += blocks

    def _record(self, method: str, request_id: str) -> str:
        """Note the call; returns the id the books use (short_id), remembering the
        full one for the events sent about it."""
        rid = short_id(request_id)
        self._full_ids[rid] = request_id
        self.calls.append((method, rid))
        self.journal.append((self.worker_id, method, rid))
        return rid

    def _event(self, rid: str, *args: Any, **kwargs: Any) -> TokenEvent:
        return TokenEvent(self._full_ids.get(rid, rid), *args, **kwargs)

    # -- every role ----------------------------------------------------------------------
    async def _ping(self) -> str:
        if self.ready is not None:
            await self.ready.wait()
        await self.thawed.wait()
        if self.start_error is not None:
            self.dead = True
            raise self.start_error
        return self.worker_id

    async def _node(self) -> NodeInfo:
        return NodeInfo(f"fake-node-of-{self.worker_id}", "127.0.0.1")

    async def _lifeline(self) -> None:
        await asyncio.get_running_loop().create_future()

    async def _kv_spec(self) -> KVSpec:
        return self.kv_layout

    async def _endpoint(self) -> Endpoint:
        return Endpoint("fake", self.worker_id, self.kv_layout, None)

    async def _stats(self) -> WorkerStats:
        await self.thawed.wait()
        await self.engine_idle.wait()
        free = len(self.free_blocks)
        eng = EngineStats(len(self.running), 0, free, self.num_blocks,
                          1 - free / self.num_blocks, 0, 0, 0)
        return WorkerStats(self.worker_id, self.role, eng, 0, pool=self.pool_report)

    async def _abort(self, request_id: str) -> bool:
        self.aborted.add(request_id)  # by the full id, as a worker's AbortedIds
        request_id = self._record("abort", request_id)
        await self.abort_gate.wait()
        here = False
        if request_id in self.reserved:
            self._free(self.reserved.pop(request_id))
            self.reserved_params.pop(request_id, None)
            here = True
        st = self.running.pop(request_id, None)
        if st is not None:
            self._free(st["blocks"])
            here = True
        return here

    # -- decode --------------------------------------------------------------------------
    async def _reserve(self, request_id: str, tokens: list[int], params: Any,
                       age_s: float = 0.0) -> list[int] | None:
        full, request_id = request_id, self._record("reserve", request_id)
        self.ages[request_id] = age_s
        await self.reserve_gate.wait()
        if full in self.aborted:
            return None
        need = -(-len(tokens) // 16)
        if self.max_prompt_blocks is not None and need > self.max_prompt_blocks:
            raise InvalidRequestError("prompt", f"needs {need} KV blocks; a decode worker "
                                      f"takes prompts of at most {self.max_prompt_blocks}")
        blocks = self._take(need)
        if blocks is not None:
            self.reserved[request_id] = blocks
            self.reserved_params[request_id] = params
        return blocks

    async def _start(self, request_id: str, first_token: int, handle: TransferHandle,
                     logprobs: Any = None, num_cached_tokens: int = 0) -> None:
        request_id = self._record("start", request_id)
        self.started_cached[request_id] = num_cached_tokens
        await self.start_gate.wait()
        await asyncio.sleep(self.start_delay_s)
        blocks = self.reserved.pop(request_id, None)
        params = self.reserved_params.pop(request_id, None)
        if blocks is None:
            raise KVTransferError(f"{request_id}: no reservation on {self.worker_id}")
        if self.fail_next_start:
            self.fail_next_start = False
            self._free(blocks)
            raise KVTransferError("the KV did not arrive (fake)")
        seq = handle.payload
        self.running[request_id] = {"seq": [*seq, first_token],
                                    "left": params.max_tokens - 1, "blocks": blocks}

    async def _generate(self, request_id: str, tokens: list[int], params: Any,
                        age_s: float = 0.0) -> None:
        full, request_id = request_id, self._record("generate", request_id)
        self.ages[request_id] = age_s
        if full in self.aborted:
            return
        if self.fail_next_generate is not None:
            exc, self.fail_next_generate = self.fail_next_generate, None
            raise exc
        blocks = self._take(-(-len(tokens) // 16)) or []
        self.running[request_id] = {"seq": list(tokens), "left": params.max_tokens,
                                    "blocks": blocks, "cached": self.prefill_report[0]}

    def freeze(self) -> None:
        """SIGSTOP: alive to Ray, but no step, heartbeat or answer until ``thaw``."""
        self.frozen = True
        for gate in (self.reserve_gate, self.prefill_gate, self.start_gate, self.abort_gate,
                     self.thawed):
            gate.clear()

    def thaw(self) -> None:
        self.frozen = False
        for gate in (self.reserve_gate, self.prefill_gate, self.start_gate, self.abort_gate,
                     self.thawed):
            gate.set()

    def break_stream(self) -> None:
        self.stream_broken = True
        self.events.put_nowait([])

    def preempt(self, request_id: str) -> None:
        """Preempt a running request (its pool ran short): blocks freed, "migrated"."""
        self._free(self.running.pop(request_id)["blocks"])
        self.events.put_nowait([self._event(request_id, [], [], "migrated")])

    def fail(self, request_id: str, error: str) -> None:
        """The request's step failed on this worker (engine step isolation)."""
        self._free(self.running.pop(request_id)["blocks"])
        self.events.put_nowait([self._event(request_id, [], [], "error", error=error)])

    async def _tick(self) -> None:
        idle_ticks = 0
        while True:
            await asyncio.sleep(0.001)
            if self.frozen:
                continue
            events = []
            for rid, st in list(self.running.items()):
                tok = next_token(st["seq"])
                st["seq"].append(tok)
                st["left"] -= 1
                done = st["left"] <= 0
                if done:
                    self._free(self.running.pop(rid)["blocks"])
                events.append(self._event(rid, [tok], [], "length" if done else None,
                                          st.get("cached", 0)))
            if events:
                self.events.put_nowait(events)
            else:
                idle_ticks += 1
                if idle_ticks % 100 == 0:  # an idle stream's heartbeat, as the real one
                    self.events.put_nowait([])

    async def _batches(self) -> AsyncIterator[StepBatch]:
        """The worker side of its token channel (runtime/token_channel.py, served for
        real on loopback): a batch per "step" until the actor dies."""
        while not self.dead:
            events = await self.events.get()
            if self.dead:
                break
            if self.stream_broken:
                raise RuntimeError("the token stream broke (fake)")
            yield StepBatch(self.worker_id, events, await self._stats())
        # A dead process's connection closes: the reader sees the channel break.

    async def _stream_channel(self) -> ChannelAddress:
        if self._channel is None:
            self._channel = TokenChannelServer(self._batches)
        return await self._channel.open("127.0.0.1")

    # -- prefill -------------------------------------------------------------------------
    async def _prefill(self, task: PrefillTask) -> PrefillResult:
        full = task.request_id
        rid = self._record("prefill", full)
        # Where the KV will go: a decode worker's endpoint and the blocks reserved there.
        self.sent_to[rid] = (task.dest.worker_id, list(task.dest_block_ids))
        if full in self.aborted:
            raise PrefillAborted(f"{rid} aborted before its prefill")
        await self.prefill_gate.wait()
        if full in self.aborted:
            raise PrefillAborted(f"{rid} aborted during its prefill")
        if self.fail_next_prefill is not None:
            exc, self.fail_next_prefill = self.fail_next_prefill, None
            raise exc
        cached, queue_s, prefill_s, transfer_s, nbytes = self.prefill_report
        first = next_token(task.token_ids)
        lp = (TokenLogprobs(-0.5, [(first, -0.5)]) if task.params.logprobs is not None
              else None)
        if task.params.max_tokens <= 1:  # the first token ends it: no KV to ship
            return PrefillResult(full, first, lp, "length", cached, None,
                                 queue_s, prefill_s, transfer_s)
        handle = TransferHandle(full, "fake", SPEC, len(task.dest_block_ids), nbytes,
                                payload=list(task.token_ids))
        return PrefillResult(full, first, lp, None, cached, handle,
                             queue_s, prefill_s, transfer_s)


class FakeCluster:
    """Stands in for runtime.actors.actor_class: records every actor it makes."""

    def __init__(self) -> None:
        self.actors: list[FakeActor] = []
        self.journal: list[tuple[str, str, str]] = []  # every actor's calls, in order
        self.ready = asyncio.Event()  # cleared: actors made from now on do not start yet
        self.ready.set()
        # role -> the KV spec its actors made from now on report (default: SPEC)
        self.kv_specs: dict[str, KVSpec] = {}
        # role -> errors the next actors of that role die of while loading, one each
        self.start_errors: dict[str, list[Exception]] = {}

    def actor_class(self, role: str) -> Any:
        cluster = self

        class _Cls:
            @staticmethod
            def options(**_opts: Any) -> Any:
                return _Cls

            @staticmethod
            def remote(config: Any) -> FakeActor:
                errors = cluster.start_errors.get(role) or [None]
                a = FakeActor(config.worker_id, role, journal=cluster.journal,
                              ready=cluster.ready, kv_layout=cluster.kv_specs.get(role, SPEC),
                              start_error=errors.pop(0))
                cluster.actors.append(a)
                return a
        return _Cls

    def live(self, role: str) -> list[FakeActor]:
        return [a for a in self.actors if a.role == role and not a.dead]

    def owned_blocks(self) -> int:
        return sum(a.blocks_owned for a in self.actors if not a.dead)
