"""Detokenizer edges the mutation run found untested, on a character tokenizer whose
every decision is visible: prompt context for the first token, the held tail of a
possible stop string, ties between stop strings, flushing twice, defaults."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from engine.detokenizer import IncrementalDetokenizer

SPECIAL = 1  # decodes to "<s>" unless special tokens are skipped
ABC = 0x110000  # one token, three characters


class CharTokenizer:
    """Token i is chr(i). Like sentencepiece, a decode drops one leading space, so the
    first output token renders right only with prompt context before it."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = "".join(("" if skip_special_tokens else "<s>") if i == SPECIAL
                       else "abc" if i == ABC else chr(i) for i in ids)
        return text[1:] if text.startswith(" ") else text


def detok(prompt: str = "", stop: tuple[str, ...] = (), **kw: bool) -> IncrementalDetokenizer:
    return IncrementalDetokenizer(CharTokenizer(), [ord(c) for c in prompt], stop, **kw)  # type: ignore[arg-type]


def feed(d: IncrementalDetokenizer, text: str) -> list[tuple[str, bool]]:
    return [tuple(d.add_token(ord(c))) for c in text]  # type: ignore[misc]


@pytest.mark.parametrize("prompt", ["a", "abc", "abcdefgh"])
def test_the_prompt_tail_is_context_for_the_first_token(prompt: str) -> None:
    d = detok(prompt)
    assert feed(d, " b") == [(" ", False), ("b", False)]  # not "" then "b"
    assert d.flush() == "" and d.text == " b"


def test_without_a_prompt_the_first_space_is_dropped_as_the_tokenizer_does() -> None:
    d = detok("")
    feed(d, " b")
    d.flush()
    assert d.text == "b"


def test_special_tokens_are_skipped_by_default() -> None:
    d = detok("p")
    d.add_token(SPECIAL)
    d.add_token(ord("x"))
    d.flush()
    assert d.text == "x"
    kept = detok("p", skip_special_tokens=False)
    kept.add_token(SPECIAL)
    kept.flush()
    assert kept.text == "<s>"


def test_a_token_that_adds_no_text_is_not_a_stop() -> None:
    d = detok("p", stop=("zz",))
    step = d.add_token(SPECIAL)  # decodes to nothing
    assert step.delta == "" and step.stopped is False and not d.stopped


def test_flushing_twice_adds_nothing() -> None:
    d = detok("p", stop=("xy",))
    feed(d, "ax")  # "x" is held: it may start "xy"
    assert d.text == "a"
    assert d.flush() == "x"
    assert d.flush() == "" and d.text == "ax"


def test_the_held_prefix_is_found_past_a_failed_candidate() -> None:
    # After "aab", "aaba" ends with the stop's prefix "aa" (not "aaba", not just "a"):
    # "aa" is held, so the stop completed later never leaks a character.
    d = detok("p", stop=("aabab",))
    feed(d, "aabaa")
    assert d.text == "aab"
    feed(d, "bab")
    assert d.stopped and d.text == "aab" and d.matched_stop == "aabab"


def test_the_stops_first_character_is_a_candidate_too() -> None:
    d = detok("p", stop=("aabb",))
    feed(d, "aaba")  # "aab" + "a": only the stop's first character can start it again
    assert d.text == "aab"
    feed(d, "abb")
    assert d.stopped and d.text == "aab"


def test_stops_starting_at_the_same_place_the_first_listed_wins() -> None:
    d = detok("p", stop=("ab", "abc"))
    d.add_token(ord("x"))
    d.add_token(ABC)  # one token completes both at once
    assert d.text == "x" and d.matched_stop == "ab"


def test_an_empty_stop_string_is_rejected_with_its_reason() -> None:
    with pytest.raises(ValueError) as e:
        detok("p", stop=("",))
    assert str(e.value) == "stop strings must be non-empty"
