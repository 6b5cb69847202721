"""The engine loop: requests in, one scheduled forward pass per step, outputs out.

``step()`` is the whole algorithm: schedule, run, then post-process (append tokens,
detokenize, check stops, free finished requests). Single-threaded and synchronous;
the offline LLM API and the workers drive it.
"""

from __future__ import annotations

import itertools

import torch

from engine.block_pool import BlockPool
from engine.config import EngineConfig, ModelConfig, cdiv, default_num_blocks
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import InvalidRequestError, RequestNotFoundError
from engine.kv_cache_manager import KVCacheManager
from engine.kv_layout import KVLayout
from engine.model_runner import ModelRunner
from engine.outputs import RequestMetrics, RequestOutput
from engine.request import Request, RequestStatus, TokenLogprobs
from engine.sampler import SampledToken
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.tokenizer import Tokenizer
from engine.weights import ModelSource, load_model_config, load_state_dict, resolve_model

MAX_POSITIONS_CAP = 32768  # RoPE table and default context cap for very long-context models


def load_tokenizer(src: ModelSource) -> Tokenizer | None:
    """The model's tokenizer; dummy-weight models have none (token-id prompts only)."""
    if src.kind == "gguf":
        assert src.path is not None
        return Tokenizer.from_gguf(src.path)
    if src.kind == "hf":
        assert src.path is not None
        return Tokenizer.from_hf_dir(src.path)
    return None


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(self.device)
        self.source = resolve_model(config.model)
        self.model_config: ModelConfig = load_model_config(self.source)
        self.tokenizer = load_tokenizer(self.source)
        mc = self.model_config
        self.max_model_len = min(config.scheduler.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings, MAX_POSITIONS_CAP)
        num_blocks = default_num_blocks(mc, config.cache, config.scheduler, self.dtype)
        self.layout = KVLayout(num_blocks, mc.num_hidden_layers, config.cache.block_size,
                               mc.num_key_value_heads, mc.head_dim, self.dtype)
        self.pool = BlockPool(num_blocks, config.cache.enable_prefix_caching)
        self.kv = KVCacheManager(self.pool, config.cache.block_size)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        sd = load_state_dict(self.source, mc, self.dtype, self.device, config.seed)
        self.runner = ModelRunner(mc, sd, self.layout, self.max_model_len, self.device,
                                  config.seed)
        del sd
        self.requests: dict[str, Request] = {}
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
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("prompt", "the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError("token_ids", f"token id {bad} is outside the vocabulary "
                                      f"[0, {vocab})")
        if n + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                "max_tokens", f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the model's context of {self.max_model_len} tokens")
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
    ) -> str:
        params = params or SamplingParams()
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        self.validate(ids, params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise InvalidRequestError("request_id", f"{rid!r} is already in flight")
        req = Request(rid, ids, params, self.eos_token_ids)
        self.requests[rid] = req
        if self.tokenizer is not None:
            self.detoks[rid] = IncrementalDetokenizer(
                self.tokenizer, ids, params.stop, params.skip_special_tokens)
        self.scheduler.add(req)
        return rid

    def abort(self, request_id: str) -> RequestOutput:
        """Cancel a request; its blocks return to the pool at once."""
        req = self.requests.get(request_id)
        if req is None:
            raise RequestNotFoundError(request_id)
        self.scheduler.abort(req)
        return self._finish_output(req, [], "")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # -- the loop ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.empty:
            return []
        tables = [self.kv.block_table(c.request.request_id) for c in sched.chunks]
        sampled = self.runner.execute(sched.chunks, tables)
        self.scheduler.update_after_step(sched)
        return self._postprocess(sched, sampled)

    def _postprocess(
        self, sched: SchedulerOutput, sampled: list[SampledToken]
    ) -> list[RequestOutput]:
        outputs = []
        it = iter(sampled)
        for chunk in sched.chunks:
            if not chunk.samples:
                continue
            req, tok = chunk.request, next(it)
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
            if status is not None:
                self.scheduler.finish(req, status)
                if detok is not None:
                    delta += detok.flush()
                outputs.append(self._finish_output(req, [tok.token_id], delta))
            else:
                outputs.append(self._output(req, [tok.token_id], delta))
        return outputs

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
            metrics=RequestMetrics(req.times.arrival, req.times.first_scheduled,
                                   req.times.first_token, req.times.finished,
                                   req.num_preemptions),
        )

    def _finish_output(self, req: Request, new: list[int], delta: str) -> RequestOutput:
        out = self._output(req, new, delta)
        del self.requests[req.request_id]
        self.detoks.pop(req.request_id, None)
        return out
