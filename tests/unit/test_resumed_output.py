"""A request placed again (its worker died, preempted it, or was drained) continues
from prompt + tokens so far on another worker. Presence and frequency penalties count
output tokens only, so the new worker must count the earlier placement's tokens as
output (SamplingParams.resumed_output_tokens), or the continuation differs from the
one the request would have had in place."""

from __future__ import annotations

import dataclasses

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams, SamplingParamsError
from router.request_state import RouterRequest

PROMPT = [5, 17, 29, 41, 53, 65, 77]
PENALIZED = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                           presence_penalty=1.5, frequency_penalty=1.0)


def generate(engine: LLMEngine, prompt: list[int], params: SamplingParams, rid: str
             ) -> list[int]:
    engine.add_request(prompt, params, rid)
    out: list[int] = []
    while engine.has_unfinished():
        for o in engine.step():
            out += o.new_token_ids
    return out


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(model="dummy:tiny-llama3"), detokenize=False)


def test_a_resumed_request_continues_as_it_would_have_in_place(engine: LLMEngine) -> None:
    whole = generate(engine, PROMPT, PENALIZED, "whole")
    k = 10
    rest = dataclasses.replace(PENALIZED, max_tokens=len(whole) - k)
    resumed = generate(engine, PROMPT + whole[:k],
                       dataclasses.replace(rest, resumed_output_tokens=k), "resumed")
    assert resumed == whole[k:]
    # The check has teeth: forgetting the earlier tokens changes the continuation.
    assert generate(engine, PROMPT + whole[:k], rest, "forgot") != whole[k:]


def test_the_router_counts_the_tokens_so_far_as_output() -> None:
    rr = RouterRequest("r", PROMPT, PENALIZED, None, deadline=1e9)
    rr.add_tokens([7, 8, 9], [])
    tokens, params = rr.next_chunk()
    assert tokens == [*PROMPT, 7, 8, 9]
    assert (params.max_tokens, params.resumed_output_tokens) == (21, 3)


def test_a_negative_count_is_refused() -> None:
    with pytest.raises(SamplingParamsError):
        SamplingParams(resumed_output_tokens=-1)
