"""The engine loop: requests in, one scheduled forward pass per step, outputs out.

``step()`` is the whole algorithm: schedule, run, then post-process (append tokens,
detokenize, check stops, free finished requests). Single-threaded and synchronous;
the offline LLM API and the workers drive it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable

import torch

from engine.block_ledger import BlockLedger, build_ledger, request_owners
from engine.block_pool import BlockPool
from engine.config import EngineConfig, ModelConfig, cdiv, default_num_blocks, max_model_len
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import InvalidRequestError, RequestNotFoundError
from engine.kv_cache_manager import KVCacheManager
from engine.kv_layout import KVLayout
from engine.kv_quant import resolve_kv_dtype
from engine.kv_spill import build_spill_tier
from engine.logprobs import TokenLogprobs
from engine.model_runner import ModelRunner
from engine.outputs import RequestOutput
from engine.pool_sizing import PoolSize
from engine.request import Request, RequestStatus
from engine.sampler import SampledToken
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from engine.stats import EngineStats
from engine.step_isolation import ChunkResult, run_isolated
from engine.tokenizer import load_tokenizer
from engine.validation import validate_prompt
from engine.weights import load_model_config, load_state_dict, resolve_model
from kernels import gather_blocks, scatter_blocks

log = logging.getLogger(__name__)

class LLMEngine:
    """One model, one KV pool, one scheduler.

    ``detokenize=False`` (workers): outputs carry token ids only; the router owns text.
    ``preemption="migrate"`` (decode workers): a preempted request leaves the engine with
    finish_reason "migrated" so the router can re-prefill it elsewhere, instead of being
    recomputed here.
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        detokenize: bool = True,
        preemption: str = "recompute",
    ) -> None:
        if preemption not in ("recompute", "migrate"):
            raise ValueError(f"preemption must be 'recompute' or 'migrate', not {preemption!r}")
        self.config = config = config or EngineConfig()
        self.detokenize = detokenize
        self.preemption = preemption
        self.num_preemptions = 0
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(self.device)
        self.source = resolve_model(config.model)
        self.model_config: ModelConfig = load_model_config(self.source)
        self.tokenizer = load_tokenizer(self.source)
        mc = self.model_config
        self.max_model_len = max_model_len(config, mc)
        num_blocks = default_num_blocks(mc, config.cache, config.scheduler, self.dtype,
                                        self.device)
        self.layout = KVLayout(num_blocks, mc.num_hidden_layers, config.cache.block_size,
                               mc.num_key_value_heads, mc.head_dim, self.dtype,
                               resolve_kv_dtype(config.cache.kv_cache_dtype, self.dtype,
                                                self.device))
        self.pool = BlockPool(num_blocks, config.cache.enable_prefix_caching)
        spill = build_spill_tier(config.cache, self.layout, self.device, self._gather_blocks,
                                 self.import_kv)
        self.kv = KVCacheManager(self.pool, config.cache.block_size, spill)
        log.info("KV pool: %s%s", self.pool_size().describe(), "" if spill is None else
                 f"; spill tier {spill.capacity_bytes / 2**30:.2f} GiB ({spill.codec.kind})")
        self.scheduler = Scheduler(config.scheduler, self.kv)
        sd = load_state_dict(self.source, mc, self.dtype, self.device, config.seed)
        self.runner = ModelRunner(mc, sd, self.layout, self.max_model_len, self.device,
                                  config.seed, max_batch=config.scheduler.max_num_seqs,
                                  cuda_graphs=config.cuda_graphs)
        del sd
        self.requests: dict[str, Request] = {}
        self.held: dict[str, Request] = {}  # finished, blocks kept until release()
        self.detoks: dict[str, IncrementalDetokenizer] = {}
        self._ids = itertools.count()
        eos = set(mc.eos_token_ids)
        if self.tokenizer is not None:
            eos |= set(self.tokenizer.eos_token_ids)
        self.eos_token_ids = frozenset(eos)

    # -- requests ----------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("prompt", f"model {self.source.name} has no tokenizer; "
                                      "send token ids")
        return self.tokenizer.encode(prompt)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Reject what could never finish: raises InvalidRequestError naming the field."""
        validate_prompt(prompt_token_ids, params, self.model_config.vocab_size,
                        self.max_model_len)
        n = len(prompt_token_ids)
        need = cdiv(n + params.max_tokens, self.layout.block_size)
        if need > self.pool.num_usable_blocks:
            raise InvalidRequestError(
                "max_tokens", f"needs {need} KV blocks but the cache has "
                f"{self.pool.num_usable_blocks}")

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        hold_blocks: bool = False,
        age_s: float = 0.0,
    ) -> str:
        """Queue a request. ``hold_blocks``: keep its KV blocks when it finishes, until
        ``release(request_id)`` (prefill workers ship them first). ``age_s``: how long
        ago the request first arrived (the router's count; see Request.seniority)."""
        req = self._new_request(prompt, params, request_id, age_s)
        req.hold_blocks = hold_blocks
        self.scheduler.add(req)
        return req.request_id

    def _new_request(
        self, prompt: str | list[int], params: SamplingParams | None, request_id: str | None,
        age_s: float = 0.0,
    ) -> Request:
        params = params or SamplingParams()
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        self.validate(ids, params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests or rid in self.held:
            raise InvalidRequestError("request_id", f"{rid!r} is already in flight")
        req = Request(rid, ids, params, self.eos_token_ids)
        req.seniority -= max(age_s, 0.0)
        self.requests[rid] = req
        if self.tokenizer is not None and self.detokenize:
            self.detoks[rid] = IncrementalDetokenizer(
                self.tokenizer, ids, params.stop, params.skip_special_tokens)
        return req

    # -- disaggregation hooks ------------------------------------------------------------
    def release(self, request_id: str) -> None:
        """Free the blocks a finished hold_blocks request kept (after its KV shipped)."""
        req = self.held.pop(request_id, None)
        if req is not None:
            self.kv.free(req)

    def reserve(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
        watermark_blocks: int = 0, age_s: float = 0.0,
    ) -> list[int] | None:
        """Allocate blocks for a prompt whose KV will be imported (decode workers).

        Returns the block ids, or None when that would leave fewer than
        ``watermark_blocks`` free (room kept for running requests to grow); raises
        InvalidRequestError for a prompt that would cross it even in an empty pool.
        The reservation is owned by the engine until ``start_prefilled`` or ``abort``.
        ``age_s`` as in ``add_request``.
        """
        need = self.kv.num_blocks_needed(len(prompt_token_ids))
        room = self.pool.num_usable_blocks - watermark_blocks
        if need > room:  # not even an idle worker could take it: refuse, never wait
            raise InvalidRequestError(
                "prompt", f"needs {need} KV blocks; a decode worker takes prompts of at "
                f"most {room} (its pool less its watermark)")
        req = self._new_request(prompt_token_ids, params, request_id, age_s)
        if self.pool.num_free_blocks - need < watermark_blocks or not self.kv.allocate(
            req, len(prompt_token_ids)
        ):
            del self.requests[request_id]
            self.detoks.pop(request_id, None)
            return None
        return list(self.kv.block_table(request_id))

    def start_prefilled(
        self, request_id: str, first_token: int, logprobs: TokenLogprobs | None = None,
        num_cached_tokens: int = 0,
    ) -> RequestOutput | None:
        """Join a reserved request, whose prompt KV is now in its blocks, to the batch.

        Returns a finished output if the first token already ends it, else None.
        """
        req = self.requests.get(request_id)
        if req is None or req.status is not RequestStatus.WAITING:
            raise RequestNotFoundError(request_id)
        req.num_computed_tokens = req.num_prompt_tokens
        req.num_cached_tokens = num_cached_tokens
        self.kv.cache_computed_blocks(req)
        self.scheduler.add_running(req)
        req.append_token(first_token, logprobs)
        status = req.check_stop_token(self.max_model_len)
        if status is not None:
            self.scheduler.finish(req, status)
            return self._finish_output(req, [first_token], "")
        return None

    def pool_state(self) -> dict[str, int]:
        """Block accounting read from the pool itself (tests check for leaks with it).

        Requests: "requests" (in flight), "held" (finished, blocks kept for a transfer),
        "running" (in the running batch). Blocks: "usable"; "free" (allocatable now:
        the free list, evictable cached blocks included); "used" (ref_count > 0); and
        each block once, by owner (see engine.block_ledger): "blocks_running",
        "blocks_reserved", "blocks_transfer", "blocks_cached", "blocks_free", which sum
        to "usable". "violations": broken invariants, 0 when the books balance
        (``audit()`` raises with the list).
        """
        ledger = self._ledger()
        used = sum(1 for b in self.pool.blocks[1:] if b.ref_count > 0)
        state = {"free": self.pool.num_free_blocks, "usable": self.pool.num_usable_blocks,
                 "used": used, "requests": len(self.requests), "held": len(self.held),
                 "running": len(self.scheduler.running)}
        state.update({f"blocks_{owner}": n for owner, n in ledger.counts.items()})
        state["violations"] = len(ledger.violations)
        # Not pool blocks (the ledger's counts sum to "usable" without them).
        state["spill_blocks"] = len(self.kv.spill) if self.kv.spill is not None else 0
        return state

    def audit(self) -> None:
        """Raise BlockAccountingError unless every block's ref count equals its block-table
        references, no block is both free and owned, and every request is in exactly
        one place (scheduler queue, reservation, or held for a transfer)."""
        self._ledger().check()

    def _ledger(self) -> BlockLedger:
        sched = self.scheduler
        owner_of, violations = request_owners(self.requests, self.held, sched.running,
                                              sched.waiting)
        ledger = build_ledger(self.pool, self.kv.req_blocks, owner_of)
        return BlockLedger(ledger.counts, violations + ledger.violations)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_free_blocks=self.pool.num_free_blocks,
            num_usable_blocks=self.pool.num_usable_blocks,
            kv_usage=self.pool.usage(),
            prefix_queries=self.pool.prefix_queries,
            prefix_hits=self.pool.prefix_hits,
            num_preemptions=self.num_preemptions,
            kv_block_bytes=self.layout.bytes_per_block,
            block_size=self.layout.block_size,
            **(self.kv.spill.stats_fields() if self.kv.spill is not None else {}),
        )

    def pool_size(self) -> PoolSize:
        """The pool's size and what sized it (logged at startup)."""
        c = self.config.cache
        source = ("num_blocks" if c.num_blocks is not None else "memory_bytes"
                  if c.memory_bytes is not None else f"{self.device.type} budget")
        return PoolSize(self.layout.num_blocks, self.layout.bytes_per_block,
                        self.layout.block_size, source)

    def abort(self, request_id: str, *, error: str | None = None) -> RequestOutput | None:
        """Cancel a request wherever it is (queued, running, reserved, or finished but
        holding blocks for a transfer); its blocks return to the pool at once.
        Returns the aborted request's output, or None if it had already finished.

        ``error``: the engine, not the client, gives up on it: it ends with finish
        reason "error" and this message, and its blocks leave the prefix cache.
        """
        if request_id in self.held:
            self.release(request_id)
            return None
        req = self.requests.get(request_id)
        if req is None:
            raise RequestNotFoundError(request_id)
        if error is not None:
            return self._fail(req, error)
        self.scheduler.abort(req)
        return self._finish_output(req, [], "")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # -- the loop ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run, post-process. A request that breaks the step (its forward
        pass or sampling raises, its logits are not finite, its post-processing raises)
        ends with finish reason "error"; its batch mates continue as if it were absent."""
        sched = self.scheduler.schedule()
        migrated = self._handle_preempted(sched)
        if sched.empty:
            return migrated
        results = self._execute(sched)
        failed = [self._fail(c.request, r.error)
                  for c, r in zip(sched.chunks, results, strict=True) if r.error is not None]
        ok = [(c, r) for c, r in zip(sched.chunks, results, strict=True) if not r.failed]
        # Failed chunks are left out: their KV is not indexed in the prefix cache.
        self.scheduler.update_after_step(SchedulerOutput([c for c, _ in ok]))
        return migrated + failed + self._postprocess(ok)

    def _execute(self, sched: SchedulerOutput) -> list[ChunkResult]:
        """One forward pass over the step's chunks, bisected on failure (see
        engine.step_isolation); sampler-flagged rows come back as failures."""
        chunks = sched.chunks
        tables = [self.kv.block_table(c.request.request_id) for c in chunks]
        sampler = self.runner.sampler

        def run(idx: list[int]) -> list[SampledToken]:
            return self.runner.execute([chunks[i] for i in idx], [tables[i] for i in idx])

        def checkpoint(idx: list[int]) -> Callable[[], None]:
            gens = [g for i in idx if chunks[i].samples
                    and (g := chunks[i].request.generator) is not None]
            states = [g.get_state() for g in gens]
            shared = sampler.rng_state()

            def restore() -> None:
                for g, st in zip(gens, states, strict=True):
                    g.set_state(st)
                sampler.set_rng_state(shared)

            return restore

        results = run_isolated([c.samples for c in chunks], run, checkpoint)
        for r in results:
            if r.token is not None and r.token.error is not None:
                r.error, r.token = r.token.error, None
        return results

    def _handle_preempted(self, sched: SchedulerOutput) -> list[RequestOutput]:
        self.num_preemptions += len(sched.preempted)
        if self.preemption != "migrate":
            return []
        outs = []
        for req in sched.preempted:
            self.scheduler.migrate(req)
            outs.append(self._finish_output(req, [], ""))
        return outs

    def _postprocess(self, done: list[tuple[ScheduledChunk, ChunkResult]]
                     ) -> list[RequestOutput]:
        outputs = []
        for chunk, res in done:
            if res.token is None:
                continue  # a prefill chunk that does not reach the prompt's end
            try:
                outputs.append(self._append_token(chunk.request, res.token))
            except Exception as e:  # this request's bug; the rest of the batch goes on
                log.warning("post-processing %s failed", chunk.request.request_id,
                            exc_info=True)
                outputs.append(self._fail(chunk.request, f"{type(e).__name__}: {e}"))
        return outputs

    def _append_token(self, req: Request, tok: SampledToken) -> RequestOutput:
        lp = None
        if req.params.logprobs is not None and tok.logprob is not None:
            lp = TokenLogprobs(tok.logprob, tok.top_logprobs)
        req.append_token(tok.token_id, lp)
        status = req.check_stop_token(self.max_model_len)
        delta = ""
        detok = self.detoks.get(req.request_id)
        if detok is not None:
            step = detok.add_token(tok.token_id)
            delta = step.delta
            if step.stopped:
                status = RequestStatus.FINISHED_STOPPED
        if status is None:
            return self._output(req, [tok.token_id], delta)
        self.scheduler.finish(req, status)
        if detok is not None:
            delta += detok.flush()
        return self._finish_output(req, [tok.token_id], delta)

    def _fail(self, req: Request, error: str) -> RequestOutput:
        """End a request the engine could not compute: finish reason "error", blocks
        freed (never held: there is nothing to ship) and out of the prefix cache."""
        if req.finished:  # it finished this step, then producing its output failed
            self.kv.free(req, discard=True)  # held blocks, if any; else a no-op
        else:
            self.scheduler.fail(req)
        out = self._output(req, [], "")
        out.finish_reason, out.error = RequestStatus.FINISHED_ERROR.value, error
        self.requests.pop(req.request_id, None)
        self.detoks.pop(req.request_id, None)
        self.held.pop(req.request_id, None)
        return out

    def _output(self, req: Request, new: list[int], delta: str) -> RequestOutput:
        detok = self.detoks.get(req.request_id)
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            token_ids=req.output_token_ids,
            text=detok.text if detok is not None else "",
            new_token_ids=new,
            delta_text=delta,
            finish_reason=req.finish_reason,
            num_cached_tokens=req.num_cached_tokens,
            logprobs=req.logprobs,
            times=dataclasses.replace(req.times),
            num_preemptions=req.num_preemptions,
        )

    def _finish_output(self, req: Request, new: list[int], delta: str) -> RequestOutput:
        out = self._output(req, new, delta)
        del self.requests[req.request_id]
        self.detoks.pop(req.request_id, None)
        if req.hold_blocks and req.status is not RequestStatus.FINISHED_ABORTED:
            self.held[req.request_id] = req
        return out

    # -- worker surface -----------------------------------------------------------------
    # What the runtime roles (prefill_worker, decode_worker, colocated_worker) need
    # beyond add_request / reserve / start_prefilled / release / abort / stats: they
    # touch the pool, the cache manager, the runner and held requests only through these.
    @property
    def num_usable_blocks(self) -> int:
        return self.pool.num_usable_blocks

    @property
    def kv_cache(self) -> torch.Tensor:
        """The physical cache (engine.kv_layout): what a KV sender reads and a transfer
        endpoint describes."""
        return self.runner.kv_cache

    @kv_cache.setter
    def kv_cache(self, cache: torch.Tensor) -> None:
        """Run on ``cache`` instead, a tensor of the same layout whose memory a transfer
        backend must own (cuda-ipc exports it); set before the first request."""
        want = self.layout.storage_dtype
        if tuple(cache.shape) != self.layout.shape or cache.dtype != want:
            raise ValueError(f"a KV cache of {tuple(cache.shape)} {cache.dtype} does not fit "
                             f"the layout {self.layout.shape} {want}")
        self.runner.kv_cache = cache

    def has_request(self, request_id: str) -> bool:
        """Whether the engine holds anything of it: queued, running, reserved, or
        finished and holding its blocks for a transfer."""
        return request_id in self.requests or request_id in self.held

    def held_blocks(self, request_id: str) -> list[int]:
        """The blocks with the prompt's KV of a finished hold_blocks request (what a
        prefill worker ships), or [] if it holds none. They stay the engine's until
        ``release``."""
        req = self.held.get(request_id)
        if req is None:
            return []
        n = self.kv.num_blocks_needed(req.num_prompt_tokens)
        return list(self.kv.block_table(request_id))[:n]

    def _gather_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """(n, *block_shape) copy of blocks (scales included): what the spill tier keeps."""
        cache = self.runner.kv_cache
        return gather_blocks(cache, torch.tensor(block_ids, dtype=torch.long,
                                                 device=cache.device))

    def import_kv(self, block_ids: list[int], staging: torch.Tensor) -> None:
        """Write fetched KV, (n, *block_shape), into ``block_ids`` (a reservation)."""
        cache = self.runner.kv_cache
        ids = torch.tensor(block_ids, dtype=torch.long, device=cache.device)
        scatter_blocks(cache, ids, staging.to(cache.device))
