"""pdserve's inference core: Llama-family model on a paged KV cache, and the offline API.

    from engine import LLM, SamplingParams
    llm = LLM(model="smollm2-135m")
    out = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=32))[0]
    print(out.text, out.finish_reason)

Heavy modules load lazily so light users (the router: tokenizer, sampling params,
config) never import the model code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.llm import LLM
    from engine.llm_engine import LLMEngine
    from engine.outputs import RequestOutput

__all__ = ["LLM", "LLMEngine", "RequestOutput", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    if name == "LLMEngine":
        from engine.llm_engine import LLMEngine

        return LLMEngine
    if name == "RequestOutput":
        from engine.outputs import RequestOutput

        return RequestOutput
    raise AttributeError(name)
