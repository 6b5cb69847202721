"""A decode worker's reservation (LLMEngine.reserve): None while the pool is short above
its watermark (the router waits for room), but an InvalidRequestError at once for a
prompt no amount of waiting would fit, with nothing left behind."""

from __future__ import annotations

import pytest

from engine.config import CacheConfig, EngineConfig
from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

CFG = EngineConfig(model="dummy:tiny-llama3", cache=CacheConfig(block_size=4, num_blocks=33))
ONE = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(CFG, detokenize=False)


def test_a_prompt_over_the_watermark_of_an_empty_pool_is_refused(engine: LLMEngine) -> None:
    usable = engine.pool.num_usable_blocks
    watermark = 3
    fits = list(range(10, 10 + 4 * (usable - watermark)))  # exactly the room above it
    assert engine.reserve(fits, ONE, "fits", watermark) is not None
    assert engine.abort("fits")
    with pytest.raises(InvalidRequestError, match="takes prompts of at most") as e:
        engine.reserve([*fits, 7], ONE, "never", watermark)  # one block more
    assert e.value.field == "prompt"
    assert "never" not in engine.requests
    assert engine.pool.num_free_blocks == usable


def test_a_pool_short_for_now_answers_none(engine: LLMEngine) -> None:
    usable = engine.pool.num_usable_blocks
    half = list(range(10, 10 + 4 * (usable // 2)))
    assert engine.reserve(half, ONE, "a", 1) is not None
    assert engine.reserve(half, ONE, "b", 1) is None  # fits an idle pool: wait for room
    assert "b" not in engine.requests
    assert engine.abort("a")
    assert engine.pool.num_free_blocks == usable


def test_a_reservation_keeps_the_age_the_router_gives(engine: LLMEngine) -> None:
    engine.add_request([1, 2, 3], ONE, "here-now")
    engine.reserve([4, 5, 6], ONE, "placed-again", 0, age_s=30.0)
    now, again = engine.requests["here-now"], engine.requests["placed-again"]
    assert again.seniority < now.seniority - 29.0  # older, though it came second
    assert again.times.arrival >= now.times.arrival  # its timings here stay local
    engine.abort("here-now")
    engine.abort("placed-again")
    assert engine.pool.num_free_blocks == engine.pool.num_usable_blocks
