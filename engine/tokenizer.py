"""Text <-> token ids for one model, and its chat template, without loading any weights.

The router tokenizes prompts but never holds a model, so building a Tokenizer reads only
the tokenizer fields of a GGUF (the metadata block at the front of the file; the tensor
data is never touched) or the tokenizer files of a Hugging Face directory.

Encoding and decoding are done by a `tokenizers.Tokenizer` (Rust). For a GGUF we rebuild
it from the vocabulary, merges and token types the file carries, with the pre-tokenizer
llama.cpp picks for `tokenizer.ggml.pre` -- the split the merges were learned with.
"""

from __future__ import annotations

import json
import logging
import mmap
import struct
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

if TYPE_CHECKING:
    from engine.weights.source import ModelSource

logger = logging.getLogger(__name__)

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})

# Tokens that end a turn in the chat formats we know. llama.cpp stops on these too (its
# "end of generation" set) even when a GGUF declares only one eos id; a model that emits
# one of them has finished, whatever its config says.
_END_OF_TURN_TOKENS = frozenset({
    "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
})

# ---------------------------------------------------------------------------------------
# Pre-tokenizers by `tokenizer.ggml.pre`, following llama.cpp's llama-vocab.cpp.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3 also looks a whole pre-token up in the vocabulary before merging.
_IGNORE_MERGES_PRES = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3"})
_SPLIT_REGEX_PRES = {
    **dict.fromkeys((*_IGNORE_MERGES_PRES, "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), _QWEN2_SPLIT),
}
# Code-trained vocabularies (StarCoder lineage, SmolLM) isolate every digit before the
# GPT-2 split; their tokenizer.json is Sequence[Digits(individual), ByteLevel].
_DIGIT_PRES = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                         "minerva"})
_GPT2_PRES = frozenset({"default", "gpt-2", "gpt2", "mpt", "olmo", "jais"})


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _SPLIT_REGEX_PRES:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_REGEX_PRES[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre in _DIGIT_PRES:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre not in _GPT2_PRES:
        # transformers falls back the same way; most unknown entries are GPT-2 variants.
        logger.warning("unknown GGUF pre-tokenizer %r; using the GPT-2 split", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


# ---------------------------------------------------------------------------------------
# GGUF metadata: a key/value block right after the header. Reading it ourselves costs a
# few tens of ms; gguf.GGUFReader also indexes every tensor and array element (~2 s).
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _GGUFMetadata:
    """Walks the metadata block of a memory-mapped GGUF (versions 2 and 3)."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        if buf[:4] != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        # A big-endian file's version reads as a huge little-endian number.
        (version,) = struct.unpack_from("<I", buf, 4)
        self.order = "<" if version & 0xFFFF else ">"
        (version,) = struct.unpack_from(self.order + "I", buf, 4)
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported (need 2 or 3)")
        self.pos = 24  # magic, version, tensor count (u64), then the key/value count (u64)

    def read(self, keep: Sequence[str]) -> dict[str, Any]:
        """The values of the keys that start with one of `keep`."""
        (n_kv,) = struct.unpack_from(self.order + "Q", self.buf, 16)
        out: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("I")
            value = self._value(vtype)
            if key.startswith(tuple(keep)):
                out[key] = value
        return out

    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        fmt = self.order + fmt
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = self._unpack("Q")
        start, self.pos = self.pos, self.pos + n
        return self.buf[start:self.pos].decode("utf-8")

    def _value(self, vtype: int) -> Any:
        if vtype == _GGUF_STRING:
            return self._string()
        if vtype in _GGUF_SCALARS:
            return self._unpack(_GGUF_SCALARS[vtype])[0]
        if vtype != _GGUF_ARRAY:
            raise ValueError(f"corrupt GGUF metadata: value type {vtype}")
        etype, count = self._unpack("IQ")
        if etype in _GGUF_SCALARS:
            return list(self._unpack(f"{count}{_GGUF_SCALARS[etype]}"))
        if etype == _GGUF_STRING:
            return self._strings(count)
        return [self._value(etype) for _ in range(count)]

    def _strings(self, count: int) -> list[str]:
        # The vocabulary and merges: ~100k strings, so this loop is kept tight.
        length, buf, pos = struct.Struct(self.order + "Q"), self.buf, self.pos
        out = []
        for _ in range(count):
            (n,) = length.unpack_from(buf, pos)
            pos += 8 + n
            out.append(buf[pos - n:pos].decode("utf-8"))
        self.pos = pos
        return out


def read_gguf_tokenizer_fields(path: str) -> dict[str, Any]:
    """The `tokenizer.*` and `general.*` metadata of a GGUF, without its tensors."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _GGUFMetadata(buf).read(("tokenizer.", "general."))


# ---------------------------------------------------------------------------------------
class _GenerationTag(jinja2.ext.Extension):
    """Accepts transformers' `{% generation %}...{% endgeneration %}` (marks assistant text
    for training masks); serving only needs the body rendered as is."""

    tags = {"generation"}  # noqa: RUF012 - jinja's own class attribute

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _compile_chat_template(source: str) -> jinja2.Template:
    # The same environment transformers renders with, so prompts match byte for byte.
    # Templates come with model files from anywhere: the sandbox keeps them from
    # reaching Python internals.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _check_messages(messages: Sequence[Mapping[str, str]]) -> None:
    if not messages:
        raise ValueError("chat: the conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"chat: message {i} is a {type(m).__name__}, not a mapping")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"chat: message {i} has no {key!r}")
            if not isinstance(m[key], str):
                raise ValueError(f"chat: message {i} {key!r} must be a string")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"chat: message {i} has role {m['role']!r}; expected one of "
                             f"{sorted(CHAT_ROLES)}")


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A model's tokenizer: encode/decode, special ids, and its chat template.

    Immutable after construction and safe to share between threads (the Rust tokenizer
    is). Build one with `from_gguf` or `from_hf_dir`.
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        extra_eos_token_ids: Sequence[int] = (),
        chat_template: str | None = None,
        template_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self._backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        eos = {eos_token_id} if eos_token_id is not None else set()
        eos.update(extra_eos_token_ids)
        eos.update(tid for tid, tok in backend.get_added_tokens_decoder().items()
                   if tok.special and tok.content in _END_OF_TURN_TOKENS)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.chat_template = chat_template
        # bos_token/eos_token/... strings, passed to the template as transformers does.
        self._template_tokens = dict(template_tokens or {})
        self._compiled_template: jinja2.Template | None = None

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, path: str) -> Tokenizer:
        """Rebuild the tokenizer a GGUF describes (byte-level BPE: `tokenizer.ggml.model`
        "gpt2"). Control tokens become special tokens, user-defined ones added tokens."""
        md = read_gguf_tokenizer_fields(path)
        model = md.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"{path}: tokenizer model {model!r} is not supported "
                             "(only byte-level BPE, 'gpt2')")
        tokens: list[str] = md["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
        pre = md.get("tokenizer.ggml.pre", "default")
        backend = _Backend(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, ignore_merges=pre in _IGNORE_MERGES_PRES))
        backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
        backend.decoder = decoders.ByteLevel()
        types = md.get("tokenizer.ggml.token_type") or []
        # 3 = CONTROL (special, dropped by skip_special_tokens), 4 = USER_DEFINED (kept).
        # Both are matched whole in the input text, as llama.cpp does.
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                    for t, ty in zip(tokens, types, strict=False) if ty == 3])
        backend.add_tokens([AddedToken(t, normalized=False, special=False)
                            for t, ty in zip(tokens, types, strict=False) if ty == 4])

        def token_id(key: str) -> int | None:
            value = md.get(f"tokenizer.ggml.{key}")
            return int(value) if value is not None else None

        bos, eos = token_id("bos_token_id"), token_id("eos_token_id")
        # Absent flags mean no (transformers' reading for byte-level vocabularies).
        add_bos = bool(md.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
        add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
        _set_post_processor(backend, tokens, bos if add_bos else None, eos if add_eos else None)
        named = {"bos_token": bos, "eos_token": eos, "unk_token": token_id("unknown_token_id"),
                 "pad_token": token_id("padding_token_id")}
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_id=eos,
            extra_eos_token_ids=[t for t in (token_id("eot_token_id"), token_id("eom_token_id"))
                                 if t is not None],
            chat_template=md.get("tokenizer.chat_template"),
            template_tokens={k: tokens[v] for k, v in named.items() if v is not None},
        )

    @classmethod
    def from_hf_dir(cls, path: str) -> Tokenizer:
        """Load tokenizer.json, with special tokens and the chat template from
        tokenizer_config.json (or chat_template.jinja) and extra eos ids from
        generation_config.json, as transformers does."""
        root = Path(path)
        backend = _Backend.from_file(str(root / "tokenizer.json"))
        config = _read_json(root / "tokenizer_config.json")
        template_file = root / "chat_template.jinja"
        template = config.get("chat_template")
        if template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        elif isinstance(template, list):  # named templates: [{"name", "template"}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        strings = {k: s for k in names if (s := _token_content(config.get(k))) is not None}
        ids = {k: backend.token_to_id(s) for k, s in strings.items()}
        gen_eos = _read_json(root / "generation_config.json").get("eos_token_id")
        extra = gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
        return cls(
            backend,
            bos_token_id=ids.get("bos_token"),
            eos_token_id=ids.get("eos_token"),
            extra_eos_token_ids=[int(t) for t in extra],
            chat_template=template,
            template_tokens=strings,
        )

    # -- vocabulary --------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        """Vocabulary strings (byte-level spelling, e.g. "Ġworld"); None for unknown ids."""
        return [self._backend.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # -- text <-> ids ------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Special tokens written in `text` (e.g. "<|im_start|>") encode to their ids.
        `add_special_tokens` adds the BOS/EOS the model's config asks for, if any."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Bytes that do not form valid UTF-8 decode to U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat --------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """Render the model's own chat template, as transformers' apply_chat_template
        does. Raises ValueError for malformed messages or when the template rejects the
        conversation (its raise_exception)."""
        if self.chat_template is None:
            raise ValueError("chat: this model has no chat template")
        _check_messages(messages)
        if self._compiled_template is None:
            self._compiled_template = _compile_chat_template(self.chat_template)
        try:
            return self._compiled_template.render(
                messages=[dict(m) for m in messages], tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **self._template_tokens)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat: the chat template rejected the conversation: {e}") from e

    def encode_chat(self, messages: Sequence[Mapping[str, str]],
                    add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation. The template writes its own BOS if the
        model wants one, so none is added again."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


def load_tokenizer(src: ModelSource) -> Tokenizer | None:
    """The model's tokenizer; dummy-weight models have none (token-id prompts only)."""
    if src.kind == "gguf":
        assert src.path is not None
        return Tokenizer.from_gguf(src.path)
    if src.kind == "hf":
        assert src.path is not None
        return Tokenizer.from_hf_dir(src.path)
    return None


def _set_post_processor(backend: _Backend, tokens: Sequence[str], bos: int | None,
                        eos: int | None) -> None:
    if bos is None and eos is None:
        return
    pre = [(tokens[bos], bos)] if bos is not None else []
    post = [(tokens[eos], eos)] if eos is not None else []
    single = [t for t, _ in pre] + ["$A"] + [t for t, _ in post]
    pair = single + [f"{t}:1" for t, _ in pre] + ["$B:1"] + [f"{t}:1" for t, _ in post]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                           special_tokens=pre + post)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}
