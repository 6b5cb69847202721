"""Offline API: ``LLM(model=...).generate(prompts, params)`` and ``.chat(messages, params)``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    """Batch generation on one engine with continuous batching.

    Knobs mirror the engine's config: ``max_num_seqs``, ``max_num_batched_tokens``,
    ``block_size``, ``num_kv_blocks`` or ``kv_cache_memory_bytes``,
    ``enable_prefix_caching``, ``kv_cache_dtype`` ("auto", "int8", "fp8": see
    engine/kv_quant.py), ``max_model_len``, ``dtype``, ``device``, ``seed``,
    ``num_threads``, ``cuda_graphs`` (decode steps replay CUDA graphs on GPUs).
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        *,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        enable_prefix_caching: bool = True,
        kv_cache_dtype: str = "auto",
        max_model_len: int | None = None,
        dtype: str = "auto",
        device: str = "auto",
        seed: int = 0,
        num_threads: int | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        config = EngineConfig(
            model=model,
            dtype=dtype,
            device=device,
            seed=seed,
            num_threads=num_threads,
            cuda_graphs=cuda_graphs,
            cache=CacheConfig(block_size=block_size, num_blocks=num_kv_blocks,
                              memory_bytes=kv_cache_memory_bytes,
                              enable_prefix_caching=enable_prefix_caching,
                              kv_cache_dtype=kv_cache_dtype),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=max_num_batched_tokens,
                                      max_model_len=max_model_len),
        )
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: Sequence[Prompt] | Prompt,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One output per prompt, in order. Prompts are strings or lists of token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        plist = self._params_list(params, len(prompts))
        order = [self.engine.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        done = {o.request_id: o for o in self._drain()}
        return [done[rid] for rid in order]

    def chat(self, messages: list[Message], params: SamplingParams | None = None) -> RequestOutput:
        """Generate the assistant's reply to one conversation (the model's chat template)."""
        return self.generate([self.encode_chat(messages)], params)[0]

    def stream(
        self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None
        = None,
    ) -> Iterator[RequestOutput]:
        """Yield every request's per-step output (deltas) as the engine produces them."""
        plist = self._params_list(params, len(prompts))
        for p, sp in zip(prompts, plist, strict=True):
            self.engine.add_request(p, sp)
        while self.engine.has_unfinished():
            yield from self.engine.step()

    def encode_chat(self, messages: list[Message]) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("chat", "this model has no tokenizer or chat template")
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)

    def _drain(self) -> Iterator[RequestOutput]:
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    yield out

    @staticmethod
    def _params_list(
        params: SamplingParams | Sequence[SamplingParams] | None, n: int
    ) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
        return list(params)
