"""SamplingParams validation: every value the fp32 sampler cannot use is rejected, naming
the field; the edges of each range are accepted."""

from __future__ import annotations

import math

import pytest

from engine.sampling_params import (
    MAX_REPETITION_PENALTY,
    MAX_TEMPERATURE,
    MIN_REPETITION_PENALTY,
    MIN_TEMPERATURE,
    SHOWN_CHARS,
    SamplingParams,
    SamplingParamsError,
)

FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                "frequency_penalty")


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10**400])
def test_non_finite_floats_are_rejected_naming_the_field(name: str, value: float) -> None:
    with pytest.raises(SamplingParamsError, match="finite") as e:
        SamplingParams(**{name: value})
    assert e.value.field == name
    assert str(e.value).startswith(f"sampling.{name}: ")


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", ["1", None, True])
def test_non_numbers_are_rejected(name: str, value: object) -> None:
    with pytest.raises(SamplingParamsError, match="number") as e:
        SamplingParams(**{name: value})
    assert e.value.field == name


@pytest.mark.parametrize("name", ["top_k", "max_tokens"])
@pytest.mark.parametrize("value", [1.5, "3", False])
def test_integer_fields_reject_non_integers(name: str, value: object) -> None:
    with pytest.raises(SamplingParamsError, match="integer") as e:
        SamplingParams(**{name: value})
    assert e.value.field == name


@pytest.mark.parametrize(
    "value", [math.nextafter(MAX_TEMPERATURE, math.inf), 1e300, -MIN_TEMPERATURE, -0.5,
              -5e-324],
)
def test_negative_and_exploding_temperatures_are_rejected(value: float) -> None:
    with pytest.raises(SamplingParamsError, match=r"must be in \[0, 100\]") as e:
        SamplingParams(temperature=value)
    assert e.value.field == "temperature"


@pytest.mark.parametrize(
    "value", [1e-300, 5e-324, 1e-46, 0.001, MIN_TEMPERATURE / 2,
              math.nextafter(MIN_TEMPERATURE, 0)],
)
def test_a_positive_temperature_too_small_for_fp32_is_greedy(value: float) -> None:
    # OpenAI's API and vLLM take temperature=0.001 as (near-)greedy; 0 in fp32 would be a
    # division by zero, so it is stored as 0 and never reaches the sampler's division.
    p = SamplingParams(temperature=value)
    assert p.greedy and p.temperature == 0.0


@pytest.mark.parametrize("value", [0.0, -0.0, MIN_TEMPERATURE, 0.7, MAX_TEMPERATURE])
def test_temperature_range_edges_are_accepted(value: float) -> None:
    assert SamplingParams(temperature=value).temperature == value


def test_temperatures_from_the_minimum_up_sample() -> None:
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=MIN_TEMPERATURE).greedy


@pytest.mark.parametrize(
    "value", [1e-300, 0.0, -1.0, math.nextafter(MIN_REPETITION_PENALTY, 0),
              math.nextafter(MAX_REPETITION_PENALTY, math.inf), 1e300],
)
def test_repetition_penalty_outside_its_range_is_rejected(value: float) -> None:
    with pytest.raises(SamplingParamsError, match="must be in") as e:
        SamplingParams(repetition_penalty=value)
    assert e.value.field == "repetition_penalty"


@pytest.mark.parametrize("value", [MIN_REPETITION_PENALTY, 1.0, MAX_REPETITION_PENALTY])
def test_repetition_penalty_edges_are_accepted(value: float) -> None:
    assert SamplingParams(repetition_penalty=value).repetition_penalty == value


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"top_p": 0.0}, "top_p"), ({"top_p": 1.0 + 1e-9}, "top_p"),
     ({"min_p": -1e-9}, "min_p"), ({"min_p": 1.0 + 1e-9}, "min_p"),
     ({"presence_penalty": 2.0 + 1e-9}, "presence_penalty"),
     ({"frequency_penalty": -2.0 - 1e-9}, "frequency_penalty"),
     ({"top_k": -2}, "top_k"), ({"max_tokens": 0}, "max_tokens"),
     ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"),
     ({"seed": -1}, "seed"), ({"seed": 2**63}, "seed"),
     ({"stop": [""]}, "stop"), ({"stop": ["x"] * 17}, "stop"),
     ({"stop": ["x" * 257]}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids")],
)  # fmt: skip
def test_out_of_range_values_name_their_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert e.value.field == field


@pytest.mark.parametrize(
    "kwargs",
    [{"top_p": 1.0}, {"top_p": 1e-9}, {"min_p": 0.0}, {"min_p": 1.0}, {"top_k": -1},
     {"top_k": 0}, {"presence_penalty": -2.0}, {"frequency_penalty": 2.0}, {"max_tokens": 1},
     {"logprobs": 0}, {"logprobs": 20}, {"seed": 0}, {"seed": 2**63 - 1},
     {"stop": ["x" * 256] * 16}, {"stop": "x"}],
)  # fmt: skip
def test_range_edges_are_accepted(kwargs: dict[str, object]) -> None:
    SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_numpy_scalars_are_numbers() -> None:
    np = pytest.importorskip("numpy")
    p = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3), max_tokens=np.int32(4))
    assert p.top_k == 3 and p.max_tokens == 4


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"max_tokens": -(10**300)}, "max_tokens"), ({"temperature": 10**300}, "temperature"),
     ({"top_k": -(10**5000)}, "top_k"), ({"temperature": 10**5000}, "temperature"),
     ({"seed": 10**300}, "seed"), ({"max_tokens": "x" * 10_000}, "max_tokens")],
)  # fmt: skip
def test_an_error_quotes_a_huge_value_clipped(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert e.value.field == field
    quoted = e.value.message.rpartition("got ")[2]
    assert len(quoted) <= SHOWN_CHARS, e.value.message
    assert quoted.endswith("...") or quoted == "an integer of over 4300 digits"
