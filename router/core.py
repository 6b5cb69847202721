"""The router (asyncio): the public face of the deployment, wiring its parts together.

    generate()   admission (router/admission.py) -> a RouterRequest -> its owner task
                 (router/lifecycle.py), which places it through router/placement.py on
                 workers from router/worker_registry.py; tokens come back through
                 router/streams.py into the request's queue, which generate() yields
    abort()      cancel the owner task: it tells every worker it touched to drop the
                 request
    drain()      take one worker out of rotation: its requests move elsewhere, a
                 replacement starts, then it goes
    shutdown()   refuse new requests, give running ones a grace period, end the rest
                 with a final "abort", stop the workers

The router loads the tokenizer and the model's config, never the model code or torch
(tests/unit/test_import_rules.py checks it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable

from engine.config import ModelConfig, max_model_len
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer, load_tokenizer
from engine.validation import validate_prompt
from engine.weights import load_model_config, resolve_model
from router.admission import Admission
from router.config import RouterConfig
from router.errors import NoWorkersError, QueueFullError
from router.lifecycle import Lifecycle
from router.placement import Placement
from router.request_state import Delta, Final, RouterRequest
from router.streams import StreamConsumer, coalesce
from router.worker_handle import WorkerHandle
from router.worker_registry import WorkerRegistry

log = logging.getLogger(__name__)
StreamItem = Delta | Final
# Requests larger than this are tokenized on a thread by the edges: the event loop
# keeps streaming everyone else's tokens meanwhile.
TOKENIZE_INLINE_BYTES = 16 << 10
SHUTDOWN_SETTLE_S = 10.0  # at shutdown, the longest wait for the workers' abort answers


class Router:
    def __init__(self, config: RouterConfig | None = None) -> None:
        self.config = config = config or RouterConfig()
        src = resolve_model(config.engine.model)
        self.model_config: ModelConfig = load_model_config(src)  # metadata only, no weights
        self.tokenizer: Tokenizer | None = load_tokenizer(src)
        self.max_model_len = max_model_len(config.engine, self.model_config)
        self.block_size = config.engine.cache.block_size
        self.registry = WorkerRegistry(config)
        self.admission = Admission(config)
        self.placement = Placement(config, self.registry, self.block_size)
        self.lifecycle = Lifecycle(config, self.placement)
        self.streams = StreamConsumer(self.registry, self.lifecycle.attempts,
                                      self.placement.room_changed)
        self.registry.on_started.append(self._on_worker_started)
        self.requests: dict[str, RouterRequest] = {}
        self.on_finish: list[Callable[[RouterRequest, str], None]] = []  # metrics hooks
        self._ids = itertools.count()

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        await self.registry.start()

    def _on_worker_started(self, h: WorkerHandle) -> None:
        self.streams.watch(h)
        asyncio.get_running_loop().create_task(self.placement.room_changed())

    def begin_shutdown(self) -> None:
        """Refuse new requests from now on (running ones go on); workers lost from
        now on are not replaced."""
        self.admission.closing = True
        self.registry.replacing_stopped = True

    async def shutdown(self, grace_s: float = 0.0) -> None:
        """Stop: new requests are refused, running ones get ``grace_s`` to finish, the
        rest end with a final "abort" item, then the workers go."""
        self.begin_shutdown()
        loop = asyncio.get_running_loop()
        until = loop.time() + grace_s
        while self.requests and loop.time() < until:
            await asyncio.sleep(0.05)
        for rid in list(self.requests):
            await self.abort(rid)
        # The workers are killed next, which frees whatever they hold: the aborts are
        # waited for (so a prefill's KV send ends before its destination goes) but not
        # past a bound, since a worker that is frozen (SIGSTOP, a hung driver) but not
        # dead would never answer them, and the process would never exit.
        settling = asyncio.ensure_future(self.lifecycle.settle())
        await asyncio.wait({settling}, timeout=SHUTDOWN_SETTLE_S)
        if not settling.done():
            settling.cancel()
            log.warning("shutdown: aborts still unanswered after %.0f s (a frozen "
                        "worker?); killing the workers anyway", SHUTDOWN_SETTLE_S)
        await self.registry.shutdown()

    # -- public API ----------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_prompt(prompt_token_ids, params, self.model_config.vocab_size,
                        self.max_model_len)

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams,
        request_id: str | None = None, timeout_s: float | None = None,
    ) -> AsyncIterator[StreamItem]:
        """Stream a request: Deltas, then one Final. Raises RouterError or
        InvalidRequestError (before or during the stream); closing the iterator aborts
        the request. ``timeout_s`` (default: request_timeout_s) bounds every wait and the
        request as a whole (router/lifecycle.py cuts an attempt off at the deadline)."""
        rr = self._admit(prompt_token_ids, params, request_id, timeout_s)
        rr.task = asyncio.get_running_loop().create_task(self.lifecycle.drive(rr))
        behind: Delta | Final | BaseException | None = None  # taken out by a merge
        try:
            while True:
                item = behind if behind is not None else await rr.queue.get()
                behind = None
                if isinstance(item, Delta):  # one message for all the client missed
                    item, behind = coalesce(item, rr.queue)
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Final):
                    return
        finally:
            if not rr.done:
                await self.abort(rr.request_id)
            self._forget(rr)

    async def abort(self, request_id: str) -> bool:
        """Cancel a request everywhere; True if it was in flight. Its stream ends with
        a Final("abort")."""
        rr = self.requests.get(request_id)
        if rr is None or rr.done:
            return False
        rr.finish("abort")
        if rr.task is not None:
            rr.task.cancel()
        return True

    def _admit(self, prompt_token_ids: list[int], params: SamplingParams,
               request_id: str | None, timeout_s: float | None) -> RouterRequest:
        self.validate(prompt_token_ids, params)
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.requests:
            raise InvalidRequestError("request_id", f"{rid!r} is already in flight")
        self.admission.check_open()  # a server shutting down says so, whatever its load
        if self.placement.waiting >= self.config.max_queue:  # they would wait too
            raise QueueFullError(f"{self.placement.waiting} requests already wait for KV "
                                 f"room (max_queue={self.config.max_queue})")
        self.admission.admit()
        detok = (IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.stop,
                                        params.skip_special_tokens)
                 if self.tokenizer is not None else None)
        timeout = self.config.request_timeout_s if timeout_s is None else timeout_s
        deadline = asyncio.get_running_loop().time() + timeout
        rr = RouterRequest(rid, list(prompt_token_ids), params, detok, deadline,
                          self.config.stream_interval)
        self.requests[rid] = rr
        return rr

    def _forget(self, rr: RouterRequest) -> None:
        if self.requests.pop(rr.request_id, None) is None:
            return
        self.admission.release(time.monotonic() - rr.events.arrival)
        for hook in self.on_finish:
            hook(rr, rr.finish_reason or "abort")

    # -- workers -------------------------------------------------------------------------
    async def drain(self, worker_id: str) -> int:
        """Take a worker out of rotation: start its replacement, stop it, and let its
        requests continue elsewhere -- on the other workers of its role, or, when it is
        the last of its role, on the replacement: it keeps serving until that is up
        (token-identical for greedy requests). Returns how many requests it was
        serving. NoWorkersError, and the worker kept, if it is the last of its role and
        no replacement came up within worker_wait_s."""
        h = self.registry.workers.get(worker_id)
        if h is None or h.draining:
            raise InvalidRequestError("worker_id", f"no live worker {worker_id!r}")
        last = not any(w is not h for w in self.registry.live(h.role))
        self.registry.start_replacement(h.role)
        if last and not await self.registry.wait_for_another(
                h.role, h, self.config.worker_wait_s):
            raise NoWorkersError(f"{worker_id} is the last {h.role} worker and no "
                                 "replacement came up: it keeps serving")
        h.draining = True
        moved = len(h.requests)
        # Its attempts end as if it had died: each request is placed again with prompt +
        # tokens so far; reservations and prefills under way there are sent elsewhere.
        self.registry.retire(h)
        return moved

    def workers(self) -> list[WorkerHandle]:
        return list(self.registry.workers.values())

    @property
    def num_queued(self) -> int:
        """Requests waiting for KV room (what max_queue bounds); metrics and server info."""
        return self.placement.waiting

    # -- text (the edges call these; a large prompt on a thread, see TOKENIZE_INLINE_BYTES)
    def encode(self, text: str) -> list[int]:
        tok = self._tokenizer("prompt")
        self.admission.check_prompt_bytes(len(text.encode()))
        return tok.encode(text)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        tok = self._tokenizer("chat")
        # Each message takes at least one token (its role marker): more than the context
        # holds can never fit, and rendering the template for them would hold the GIL,
        # and every other stream, for seconds. Refused before the template runs.
        if len(messages) > self.max_model_len:
            raise InvalidRequestError("chat.messages", f"{len(messages)} messages cannot fit "
                                      f"the model's context of {self.max_model_len} tokens")
        self.admission.check_prompt_bytes(sum(len(m.get("content", "").encode())
                                              for m in messages))
        return tok.encode_chat(messages, add_generation_prompt=True)

    def _tokenizer(self, field: str) -> Tokenizer:
        if self.tokenizer is None:
            raise InvalidRequestError(field, "this model has no tokenizer; send token ids")
        return self.tokenizer
