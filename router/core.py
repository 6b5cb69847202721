"""The router core (asyncio): admission, placement, token streams, migration, aborts.

Disaggregated lifecycle (one request)::

    generate()  validate -> RouterRequest -> _run task
    _run        reserve blocks on a decode worker D (lowest KV usage; wait if none has
                room, bounded by max_queue) -> prefill on P (prefix affinity) ->
                first token to the client (TTFT) -> D.start(transfer handle)
    stream      D's StepBatches -> tokens -> detokenize, stop strings -> client
    migration   D reports "migrated" (it preempted the request) or D dies: _run again
                with prompt + tokens so far, elsewhere; the client's stream goes on
    abort       client gone / deadline / error: abort on every worker that may hold it

Colocated mode skips P: the request goes whole to a worker that prefills and decodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
from collections.abc import AsyncIterator, Callable

import ray

from decode_worker.messages import StepBatch, TokenEvent
from engine.config import ModelConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import InvalidRequestError
from engine.llm_engine import MAX_POSITIONS_CAP, load_tokenizer
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from engine.validation import validate_prompt
from engine.weights import load_model_config, resolve_model
from prefill_worker.messages import PrefillResult, PrefillTask
from prefill_worker.worker import PrefillAborted
from router.cluster import Cluster, WorkerHandle
from router.config import RouterConfig
from router.errors import NoWorkersError, QueueFullError, RequestFailedError, RouterError
from router.request_state import Delta, Final, RouterRequest
from router.routing import block_hashes, pick_prefill

log = logging.getLogger(__name__)
MAX_PLACEMENTS = 8  # prefill retries + migrations of one request before giving up
StreamItem = Delta | Final


class Router:
    def __init__(self, config: RouterConfig | None = None) -> None:
        self.config = config = config or RouterConfig()
        src = resolve_model(config.engine.model)
        self.model_config: ModelConfig = load_model_config(src)  # metadata only, no weights
        self.tokenizer: Tokenizer | None = load_tokenizer(src)
        self.max_model_len = min(
            config.engine.scheduler.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings, MAX_POSITIONS_CAP)
        self.block_size = config.engine.cache.block_size
        self.cluster = Cluster(config)
        self.requests: dict[str, RouterRequest] = {}
        self.on_finish: list[Callable[[RouterRequest, str], None]] = []  # metrics hooks
        self._room = asyncio.Condition()
        self._waiting = 0
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        await self.cluster.start()
        for h in self.cluster.workers.values():
            self._watch(h)
        self._spawn(self._health_loop())

    async def shutdown(self) -> None:
        self._closing = True
        for rid in list(self.requests):
            await self.abort(rid)
        for t in list(self._tasks):
            t.cancel()
        await self.cluster.shutdown()

    def _spawn(self, coro) -> asyncio.Task[None]:  # type: ignore[no-untyped-def]
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    # -- public API ----------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_prompt(prompt_token_ids, params, self.model_config.vocab_size,
                        self.max_model_len)

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[StreamItem]:
        """Stream a request: Deltas, then one Final. Raises RouterError/InvalidRequestError
        (before or during the stream); closing the iterator aborts the request."""
        rr = self._admit(prompt_token_ids, params, request_id)
        rr.task = self._spawn(self._run(rr))
        try:
            while True:
                item = await rr.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Final):
                    return
        finally:
            if not rr.done:
                await self.abort(rr.request_id)
            self.requests.pop(rr.request_id, None)

    async def abort(self, request_id: str) -> bool:
        """Cancel a request everywhere; True if it was in flight."""
        rr = self.requests.get(request_id)
        if rr is None or rr.done:
            return False
        if rr.task is not None:
            rr.task.cancel()
        self._finish(rr, "abort")
        holders = {rr.worker, rr.prefill_worker, rr.reserved_on}
        await asyncio.gather(*(self._abort_on(w, request_id) for w in holders if w))
        return True

    # -- admission and placement ---------------------------------------------------------
    def _admit(self, prompt_token_ids: list[int], params: SamplingParams,
               request_id: str | None) -> RouterRequest:
        self.validate(prompt_token_ids, params)
        if self._closing:
            raise NoWorkersError("the server is shutting down")
        if self._waiting >= self.config.max_queue:
            raise QueueFullError(f"admission queue full ({self.config.max_queue} waiting)")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.requests:
            raise InvalidRequestError("request_id", f"{rid!r} is already in flight")
        detok = (IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.stop,
                                        params.skip_special_tokens)
                 if self.tokenizer is not None else None)
        rr = RouterRequest(rid, list(prompt_token_ids), params, detok)
        self.requests[rid] = rr
        return rr

    async def _run(self, rr: RouterRequest) -> None:
        try:
            if rr.placements >= MAX_PLACEMENTS:
                raise RequestFailedError(f"request {rr.request_id} could not be placed after "
                                         f"{MAX_PLACEMENTS} attempts")
            rr.placements += 1
            if self.config.mode == "colocated":
                await self._place_colocated(rr)
            else:
                await self._place_disaggregated(rr)
        except asyncio.CancelledError:
            raise
        except _Aborted:
            return
        except (RouterError, InvalidRequestError) as e:
            self._fail(rr, e)
        except Exception as e:
            log.exception("request %s failed", rr.request_id)
            self._fail(rr, RequestFailedError(f"request {rr.request_id} failed: {e}"))

    def _next_chunk(self, rr: RouterRequest) -> tuple[list[int], SamplingParams]:
        """Prompt + tokens so far, and what is left to generate (after a migration)."""
        params = dataclasses.replace(rr.params, max_tokens=rr.remaining_tokens)
        return rr.prompt_token_ids + rr.generated, params

    async def _place_disaggregated(self, rr: RouterRequest) -> None:
        tokens, params = self._next_chunk(rr)
        while True:
            d, blocks = await self._reserve(rr, tokens, params)
            res = await self._prefill(rr, tokens, params, d, blocks)
            if res is None:
                continue  # the prefill worker died: try again with a fresh reservation
            if rr.done:  # aborted while prefilling
                await self._abort_on(d.worker_id, rr.request_id)
                return
            break
        if not rr.events.migrations:
            rr.cached_tokens = res.num_cached_tokens
        ev = rr.events
        ev.queue_seconds += res.queue_seconds
        ev.prefill_seconds += res.prefill_seconds
        ev.transfer_seconds += res.transfer_seconds
        ev.transfer_bytes += res.handle.nbytes if res.handle else 0
        ends = res.finish_reason
        stopped = rr.add_tokens([res.first_token], [res.logprobs] if res.logprobs else [])
        if stopped or ends:
            await self._abort_on(d.worker_id, rr.request_id)  # drop the reservation
            self._finish(rr, "stop" if stopped else str(ends))
            return
        rr.worker = d.worker_id
        d.requests.add(rr.request_id)
        t0 = asyncio.get_running_loop().time()
        try:
            await d.actor.start.remote(rr.request_id, res.first_token, res.handle,
                                       res.logprobs, rr.cached_tokens)
            rr.events.import_seconds += asyncio.get_running_loop().time() - t0
        except ray.exceptions.RayActorError:
            return  # D died: its stream watcher migrates everything it held, this included
        except ray.exceptions.RayTaskError as e:
            d.requests.discard(rr.request_id)
            raise RequestFailedError(f"KV transfer failed: {_cause(e)}") from None

    async def _reserve(self, rr: RouterRequest, tokens: list[int], params: SamplingParams
                       ) -> tuple[WorkerHandle, list[int]]:
        """Blocks on the least-loaded decode worker with room; waits (bounded) if none."""
        waiting = False
        try:
            while True:
                live = self.cluster.live("decode")
                if not live:
                    raise NoWorkersError("no decode worker is alive")
                live.sort(key=lambda h: (h.est_usage(), len(h.requests)))
                est = -(-len(tokens) // self.block_size)
                for d in live:
                    d.fresh_blocks += est  # before awaiting, so concurrent picks spread out
                    try:
                        blocks = await d.actor.reserve.remote(rr.request_id, tokens, params)
                    except ray.exceptions.RayActorError:
                        blocks = None
                    except ray.exceptions.RayTaskError as e:
                        d.fresh_blocks -= est
                        raise RequestFailedError(f"reservation failed: {_cause(e)}") from None
                    if blocks is not None:
                        rr.reserved_on = d.worker_id
                        return d, blocks
                    d.fresh_blocks -= est
                if not waiting:
                    waiting = True
                    self._waiting += 1
                async with self._room:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._room.wait(), timeout=1.0)
        finally:
            if waiting:
                self._waiting -= 1

    async def _prefill(self, rr: RouterRequest, tokens: list[int], params: SamplingParams,
                       d: WorkerHandle, blocks: list[int]) -> PrefillResult | None:
        live = [h for h in self.cluster.live("prefill") if h.load is not None]
        if not live:
            await self._abort_on(d.worker_id, rr.request_id)
            raise NoWorkersError("no prefill worker is alive")
        hashes = block_hashes(tokens, self.block_size)
        load = pick_prefill([h.load for h in live if h.load], hashes, self.block_size)
        p = self.cluster.workers[load.worker_id]
        load.outstanding_tokens += len(tokens)
        rr.prefill_worker = p.worker_id
        if rr.events.prefill_sent is None:
            rr.events.prefill_sent = asyncio.get_running_loop().time()
        assert d.endpoint is not None
        task = PrefillTask(rr.request_id, tokens, params, d.endpoint, blocks)
        try:
            res: PrefillResult = await p.actor.prefill.remote(task)
        except ray.exceptions.RayActorError:
            await self._abort_on(d.worker_id, rr.request_id)
            self._worker_died(p)
            return None
        except ray.exceptions.RayTaskError as e:
            await self._abort_on(d.worker_id, rr.request_id)
            if isinstance(e.cause, PrefillAborted):
                raise _Aborted from None
            raise RequestFailedError(f"prefill failed: {_cause(e)}") from None
        finally:
            load.outstanding_tokens -= len(tokens)
            rr.prefill_worker = None
        load.remember(hashes)
        return res

    async def _place_colocated(self, rr: RouterRequest) -> None:
        tokens, params = self._next_chunk(rr)
        live = self.cluster.live("colocated")
        if not live:
            raise NoWorkersError("no worker is alive")
        w = min(live, key=lambda h: (h.est_usage(), len(h.requests)))
        rr.worker = w.worker_id
        w.requests.add(rr.request_id)
        try:
            await w.actor.generate.remote(rr.request_id, tokens, params)
        except ray.exceptions.RayActorError:
            return  # its stream watcher migrates it
        except ray.exceptions.RayTaskError as e:
            w.requests.discard(rr.request_id)
            raise RequestFailedError(f"generate failed: {_cause(e)}") from None

    # -- token streams -------------------------------------------------------------------
    def _watch(self, h: WorkerHandle) -> None:
        if h.role in ("decode", "colocated"):
            h.stream_task = self._spawn(self._consume(h))

    async def _consume(self, h: WorkerHandle) -> None:
        try:
            async for ref in h.actor.stream.remote():
                batch: StepBatch = await ref
                h.stats = batch.stats
                h.fresh_blocks = 0
                for ev in batch.events:
                    self._on_event(h, ev)
                async with self._room:
                    self._room.notify_all()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if h.alive and not self._closing:
                log.warning("worker %s stream ended: %s", h.worker_id, e)
        self._worker_died(h)

    def _on_event(self, h: WorkerHandle, ev: TokenEvent) -> None:
        rr = self.requests.get(ev.request_id)
        if rr is None or rr.done or rr.worker != h.worker_id:
            return  # finished, aborted or moved on: a stale event
        if self.config.mode == "colocated" and not rr.generated and not rr.events.migrations:
            rr.cached_tokens = ev.num_cached_tokens
        if ev.token_ids and rr.add_tokens(ev.token_ids, ev.logprobs):
            h.requests.discard(rr.request_id)
            self._spawn(self._abort_on(h.worker_id, rr.request_id))
            self._finish(rr, "stop")
            return
        if ev.finish_reason == "migrated":
            h.requests.discard(rr.request_id)
            self._migrate(rr)
        elif ev.finish_reason is not None:
            h.requests.discard(rr.request_id)
            self._finish(rr, ev.finish_reason)

    def _migrate(self, rr: RouterRequest) -> None:
        rr.worker = None
        rr.events.migrations += 1
        rr.task = self._spawn(self._run(rr))

    def _worker_died(self, h: WorkerHandle) -> None:
        if not h.alive and h.worker_id not in self.cluster.workers:
            return
        self.cluster.kill(h)
        self.cluster.workers.pop(h.worker_id, None)
        for rid in list(h.requests):
            rr = self.requests.get(rid)
            if rr is not None and not rr.done and rr.worker == h.worker_id:
                self._migrate(rr)
        h.requests.clear()
        if not self._closing:
            self._spawn(self._replace(h.role))

    async def _replace(self, role: str) -> None:
        try:
            h = await self.cluster.spawn(role)
        except Exception:
            log.exception("could not replace a %s worker", role)
            return
        self._watch(h)
        async with self._room:
            self._room.notify_all()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            for h in list(self.cluster.workers.values()):
                if h.alive and not await self.cluster.ping(h):
                    log.warning("worker %s failed its health check", h.worker_id)
                    self._worker_died(h)

    # -- endings -------------------------------------------------------------------------
    async def _abort_on(self, worker_id: str, request_id: str) -> None:
        h = self.cluster.workers.get(worker_id)
        if h is None or not h.alive:
            return
        h.requests.discard(request_id)
        with contextlib.suppress(Exception):
            await h.actor.abort.remote(request_id)

    def _finish(self, rr: RouterRequest, reason: str) -> None:
        if rr.done:
            return
        rr.finish(reason)
        for hook in self.on_finish:
            hook(rr, reason)

    def _fail(self, rr: RouterRequest, err: Exception) -> None:
        if rr.done:
            return
        for hook in self.on_finish:
            hook(rr, "error")
        rr.done = True
        rr.queue.put_nowait(err)  # type: ignore[arg-type]

    # -- introspection -------------------------------------------------------------------
    def workers(self) -> list[WorkerHandle]:
        return list(self.cluster.workers.values())

    @property
    def num_queued(self) -> int:
        """Requests waiting for KV room (what max_queue bounds); metrics and server info."""
        return self._waiting

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("chat", "this model has no tokenizer or chat template")
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("prompt", "this model has no tokenizer; send token ids")
        return self.tokenizer.encode(text)


class _Aborted(Exception):
    """Internal: the request was aborted while a worker call was in flight."""


def _cause(e: ray.exceptions.RayTaskError) -> str:
    cause = getattr(e, "cause", None)
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(e).splitlines()[0]
