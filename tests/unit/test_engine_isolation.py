"""A request that breaks an engine step fails alone: it ends with finish reason "error"
and its batch mates finish token-identical to a run without it, with every block back.

The real SmolLM2 runs on CPU. Each test injects one poison request into a batch of
innocent ones: a forward pass that raises for it, a sampler that raises after drawing,
params that bypassed validation, a token outside the vocabulary, a detokenizer that
raises. Greedy mates check the retried forward passes, seeded sampled mates check that
a failed attempt's random draws are rewound.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from engine import LLM, SamplingParams
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampler import NO_MASS, SampledToken, Sampler, SamplingRow
from engine.scheduler import ScheduledChunk

MATES = ["What is the capital of France?", "Name three colors.", "Count from one to five."]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=10, ignore_eos=True)
POISON = "poison"


@pytest.fixture(scope="module")
def llm() -> LLM:
    # Small blocks and budget: the poison prompt is prefilled over several chunks.
    return LLM(model="smollm2-135m", max_num_batched_tokens=64, block_size=8)


@pytest.fixture(scope="module")
def mates(llm: LLM) -> list[list[int]]:
    return [llm.encode_chat([{"role": "user", "content": c}]) for c in MATES]


@pytest.fixture(scope="module")
def expected(llm: LLM, mates: list[list[int]]) -> list[list[int]]:
    """The mates' tokens without any poison (one greedy and one seeded per prompt)."""
    outs = llm.generate(mates + mates, [GREEDY] * len(mates) + [SEEDED] * len(mates))
    return [o.token_ids for o in outs]


def run_with_poison(
    engine: LLMEngine, mates: Sequence[list[int]], poison_prompt: list[int],
    poison_params: SamplingParams, *, hold_blocks: bool = False,
) -> tuple[list[list[int]], RequestOutput]:
    """Mates (greedy, then seeded) plus the poison in one batch; the mates' tokens and
    the poison's final output."""
    ids = [engine.add_request(p, GREEDY) for p in mates]
    ids += [engine.add_request(p, SEEDED) for p in mates]
    engine.add_request(poison_prompt, poison_params, POISON, hold_blocks=hold_blocks)
    finals: dict[str, RequestOutput] = {}
    while engine.has_unfinished():
        outs = engine.step()
        engine.audit()  # the books balance after every step, failed or not
        for out in outs:
            assert out.request_id not in finals, "one final output per request"
            if out.finished:
                finals[out.request_id] = out
    state = engine.pool_state()
    assert state["free"] == state["blocks_free"] + state["blocks_cached"] == state["usable"]
    assert not engine.requests and not engine.held
    return [finals[i].token_ids for i in ids], finals[POISON]


def poison_prompt(llm: LLM) -> list[int]:
    # Long enough for several 64-token chunks (mid-prefill failures).
    return llm.encode_chat([{"role": "user", "content": "Tell me about the sea. " * 30}])


def chunk_ids(chunks: Sequence[ScheduledChunk]) -> set[str]:
    return {c.request.request_id for c in chunks}


@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_forward_pass_failure_fails_only_the_culprit(
    llm: LLM, mates: list[list[int]], expected: list[list[int]],
    monkeypatch: pytest.MonkeyPatch, when: str,
) -> None:
    engine = llm.engine
    real = engine.runner.execute
    calls = {"batched": 0}

    def execute(chunks: Sequence[ScheduledChunk], tables: Sequence[list[int]]
                ) -> list[SampledToken]:
        poison = [c for c in chunks if c.request.request_id == POISON]
        if poison:
            c = poison[0]
            mid_prefill = 0 < c.start < c.request.num_prompt_tokens  # not its first chunk
            if mid_prefill if when == "prefill" else c.request.num_output_tokens >= 3:
                calls["batched"] += len(chunks) > 1
                raise RuntimeError("boom")
        return real(chunks, tables)

    monkeypatch.setattr(engine.runner, "execute", execute)
    tokens, poison = run_with_poison(engine, mates, poison_prompt(llm), GREEDY)
    assert tokens == expected
    assert poison.finish_reason == "error" and poison.error == "RuntimeError: boom"
    assert calls["batched"] >= 1  # it really failed inside a batch with mates
    if when == "decode":
        assert len(poison.token_ids) == 3  # tokens it had before failing stay reported


def test_sampler_failure_after_drawing_rewinds_the_mates_generators(
    llm: LLM, mates: list[list[int]], expected: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    poison_params = SamplingParams(temperature=0.9, seed=1, max_tokens=10, ignore_eos=True)

    class FailingSampler(Sampler):
        def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]
                     ) -> list[SampledToken]:
            out = super().__call__(logits, rows)  # every row's draw is taken...
            if any(r.params is poison_params for r in rows):
                raise ValueError("sampler broke")  # ...and thrown away
            return out

    monkeypatch.setattr(llm.engine.runner, "sampler", FailingSampler())
    tokens, poison = run_with_poison(llm.engine, mates, mates[0], poison_params)
    assert tokens == expected
    assert poison.finish_reason == "error" and "sampler broke" in (poison.error or "")
    assert poison.token_ids == []


def test_params_that_bypassed_validation_fail_only_their_request(
    llm: LLM, mates: list[list[int]], expected: list[list[int]],
) -> None:
    bad = SamplingParams(temperature=0.5, max_tokens=10)
    object.__setattr__(bad, "temperature", 1e-300)  # 0 in fp32: logits / 0
    tokens, poison = run_with_poison(llm.engine, mates, mates[1], bad)
    assert tokens == expected
    assert poison.finish_reason == "error" and poison.error == NO_MASS


def test_a_token_outside_the_vocabulary_fails_in_the_forward_pass_alone(
    llm: LLM, mates: list[list[int]], expected: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    real_add = engine.scheduler.add

    def add(req):  # type: ignore[no-untyped-def]
        if req.request_id == POISON:  # past validation, as a bug upstream could do
            req.token_ids[-1] = req.prompt_token_ids[-1] = vocab + 5
        real_add(req)

    monkeypatch.setattr(engine.scheduler, "add", add)
    tokens, poison = run_with_poison(engine, mates, mates[2], GREEDY, hold_blocks=True)
    assert tokens == expected
    assert poison.finish_reason == "error" and poison.error.startswith("IndexError")


def test_post_processing_failure_fails_only_its_request(
    llm: LLM, mates: list[list[int]], expected: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = llm.engine
    real_new = engine._new_request

    def new_request(*args, **kwargs):  # type: ignore[no-untyped-def]
        req = real_new(*args, **kwargs)
        if req.request_id == POISON:
            detok, seen = engine.detoks[POISON], []

            def add_token(token_id: int):  # type: ignore[no-untyped-def]
                seen.append(token_id)
                if len(seen) == 3:  # its third token's text "fails"
                    raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte")
                return type(detok).add_token(detok, token_id)

            detok.add_token = add_token  # type: ignore[method-assign]
        return req

    monkeypatch.setattr(engine, "_new_request", new_request)
    tokens, poison = run_with_poison(engine, mates, mates[0], GREEDY, hold_blocks=True)
    assert tokens == expected
    assert poison.finish_reason == "error" and poison.error.startswith("UnicodeDecodeError")
    assert len(poison.token_ids) == 3  # the token whose text failed is part of its output


def test_abort_with_an_error_reports_it(llm: LLM, mates: list[list[int]]) -> None:
    engine = llm.engine
    engine.add_request(mates[0], GREEDY, "x")
    engine.step()
    out = engine.abort("x", error="engine step failed: boom")
    assert out is not None and out.finish_reason == "error"
    assert out.error == "engine step failed: boom"
    state = engine.pool_state()
    assert state["free"] == state["blocks_free"] + state["blocks_cached"] == state["usable"]
