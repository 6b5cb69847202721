"""Colocated worker: a Ray actor that prefills and decodes its own requests (the baseline).

    generate(prompt)  -> the request joins the engine's queue; chunked prefill runs in
                         mixed batches with the running decodes (vLLM style)
    stream()          <- one long-lived generator: a StepBatch per engine step, served
                         to the router on the token channel (runtime/token_channel.py)
    abort(id)         -> drop it wherever it is; its blocks return to the pool

No KV crosses workers here. When the pool runs dry the engine preempts its youngest
request and recomputes it later, here: nothing is reported as migrated.
"""

from __future__ import annotations

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from runtime.config import WorkerConfig
from runtime.streaming_worker import StreamingWorker


class ColocatedWorker(StreamingWorker):
    def __init__(self, config: WorkerConfig) -> None:
        engine = LLMEngine(config.engine, detokenize=False, preemption="recompute")
        super().__init__(config, engine)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        age_s: float = 0.0,
    ) -> None:
        """Queue a whole request; its tokens arrive on the stream. Nothing happens if
        the request was aborted before this call arrived."""
        self.tokens.bind()
        if request_id in self.aborted:
            return
        await self._call(lambda e: e.add_request(prompt_token_ids, params, request_id,
                                                 age_s=age_s))
