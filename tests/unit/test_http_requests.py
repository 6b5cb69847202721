"""The HTTP edge's request parsing (router/http/requests.py) on a real Router (its real
tokenizer and chat template; no workers): cheap bounds refuse a request before any
prompt is tokenized or templated, fields that would change the answer are refused,
OpenAI's value ranges (tiny temperatures, signed seeds) are taken, and an error quotes
at most a few dozen characters of what the client sent."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from engine.errors import InvalidRequestError
from engine.sampling_params import SHOWN_CHARS
from router.core import Router
from router.http.requests import MAX_CHOICES, ApiRequest, parse_chat, parse_completion
from tests.unit.router_fakes import cached_model_config, cached_tokenizer

DEFAULT_MAX = 16
CONTEXT = 256  # the router's max_model_len here: small, so "more than it" is cheap to send


class Spied(Router):
    """A Router counting its tokenizer calls (what the cheap bounds must spare)."""

    encoded = 0
    templated = 0

    def encode(self, text: str) -> list[int]:
        self.encoded += 1
        return super().encode(text)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        self.templated += 1
        return super().encode_chat(messages)


@pytest.fixture
def router(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spied]:
    monkeypatch.setattr("router.core.load_model_config", cached_model_config)
    monkeypatch.setattr("router.core.load_tokenizer", cached_tokenizer)
    r = Spied()
    r.max_model_len = CONTEXT
    yield r


def chat(router: Router, **body: Any) -> ApiRequest:
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return parse_chat(body, router, DEFAULT_MAX)


def completion(router: Router, **body: Any) -> ApiRequest:
    body.setdefault("prompt", "hi")
    return parse_completion(body, router, DEFAULT_MAX)


def refused(parse: Any, router: Router, **body: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as e:
        parse(router, **body)
    return e.value


# -- cheap bounds first ---------------------------------------------------------------------
@pytest.mark.parametrize(("num_prompts", "n", "field"), [
    (MAX_CHOICES + 1, None, "prompt"), (550_000, None, "prompt"), (MAX_CHOICES // 2 + 1, 2, "n"),
])  # fmt: skip
def test_too_many_prompts_are_refused_before_any_is_tokenized(
        router: Spied, num_prompts: int, n: int | None, field: str) -> None:
    e = refused(completion, router, prompt=["hello world"] * num_prompts, n=n)
    assert e.field == field and f"{num_prompts} x {n or 1}" in str(e)
    assert router.encoded == 0


def test_too_many_prompts_of_token_ids_are_refused_too(router: Spied) -> None:
    assert refused(completion, router, prompt=[[1, 2]] * (MAX_CHOICES + 1)).field == "prompt"


def test_the_choice_bound_itself_is_served(router: Spied) -> None:
    req = completion(router, prompt=["hello world"] * (MAX_CHOICES // 2), n=2)
    assert len(req.choices) == MAX_CHOICES and router.encoded == MAX_CHOICES // 2


def test_more_messages_than_context_tokens_are_refused_before_the_template(
        router: Spied) -> None:
    e = refused(chat, router, messages=[{"role": "user", "content": "x"}] * (CONTEXT + 1))
    assert e.field == "messages" and f"{CONTEXT + 1} messages" in str(e)
    assert router.templated == 0


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"n": 0}, {"top_p": 2},
                                 {"stream_options": {"include_usage": True}},
                                 {"max_tokens": 0}, {"seed": "x"}])
def test_a_bad_field_is_refused_before_the_prompt_is_tokenized(
        router: Spied, bad: dict[str, Any]) -> None:
    refused(chat, router, **bad)
    refused(completion, router, **bad)
    assert router.templated == 0 and router.encoded == 0


# -- fields that would change the answer ----------------------------------------------------
@pytest.mark.parametrize(("field", "value"), [
    ("tool_choice", "auto"), ("tool_choice", "required"),
    ("tool_choice", {"type": "function", "function": {"name": "f"}}),
    ("function_call", "auto"), ("modalities", ["text", "audio"]), ("modalities", ["audio"]),
    ("stream_options", {"include_usage": True}),
])  # fmt: skip
def test_chat_fields_that_change_the_answer_are_refused(router: Spied, field: str,
                                                        value: Any) -> None:
    assert refused(chat, router, **{field: value}).field == field


def test_their_no_op_values_are_served(router: Spied) -> None:
    req = chat(router, tool_choice="none", function_call="none", modalities=["text"],
               stream=True, stream_options={"include_usage": True})
    assert req.stream and req.include_usage
    assert not chat(router, stream=False, stream_options=None).include_usage


def test_stream_options_without_a_stream_is_refused_on_completions_too(router: Spied) -> None:
    assert refused(completion, router, stream_options={"include_usage": True}).field == \
        "stream_options"


# -- OpenAI's ranges ------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.001, 1e-300, 0.0])
def test_a_tiny_temperature_is_greedy(router: Spied, t: float) -> None:
    params = chat(router, temperature=t).choices[0].params
    assert params.greedy and params.temperature == 0.0


def seeds(req: ApiRequest) -> list[int | None]:
    return [c.params.seed for c in req.choices]


def test_signed_seeds_fold_into_the_engines_range(router: Spied) -> None:
    assert seeds(completion(router, seed=7)) == [7]  # a seed >= 0 is unchanged
    assert seeds(completion(router, seed=-5)) == [2**63 - 5]
    assert seeds(completion(router, seed=-5)) == seeds(completion(router, seed=-5))
    assert seeds(completion(router, seed=-5)) != seeds(completion(router, seed=-6))
    assert seeds(completion(router, seed=-(2**63))) == [0]
    assert seeds(chat(router, seed=-1, n=3)) == [2**63 - 1, 0, 1]  # choice j: seed + j


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 10**30])
def test_seeds_beyond_64_bits_are_refused(router: Spied, seed: int) -> None:
    assert refused(completion, router, seed=seed).field == "seed"


# -- bounded echoes -------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "field"), [
    ({"max_tokens": 1e308}, "max_tokens"), ({"max_tokens": 10**300}, "max_tokens"),
    ({"temperature": 10**400}, "temperature"), ({"n": -(10**200)}, "n"),
    ({"top_k": 10**300}, "top_k"), ({"logprobs": True, "top_logprobs": 10**100}, "top_logprobs"),
    ({"messages": [{"role": "w" * 100_000, "content": "hi"}]}, "messages[0].role"),
])  # fmt: skip
def test_an_error_quotes_at_most_a_clipped_value(router: Spied, body: dict[str, Any],
                                                 field: str) -> None:
    e = refused(chat, router, **body)
    assert e.field == field
    assert len(str(e)) < len(field) + SHOWN_CHARS + 100, str(e)


def test_a_token_id_past_64_bits_is_not_a_token_id(router: Spied) -> None:
    e = refused(completion, router, prompt=[10**300])
    assert e.field == "prompt" and len(str(e)) < 200
