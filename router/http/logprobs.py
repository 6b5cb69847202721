"""Log-probabilities in OpenAI's two formats.

Chat (``choices[].logprobs.content``): one entry per token with its text, UTF-8 bytes,
logprob and ``top_logprobs`` alternatives. Completions (``choices[].logprobs``): four
parallel arrays (tokens, token_logprobs, top_logprobs as {text: logprob} maps,
text_offset into the choice's text).

A token's text is the tokenizer's decoding of that token alone, special tokens
included; a token that is only part of a UTF-8 character decodes to U+FFFD (its
``bytes`` are those of the replacement character, not the raw byte).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer
    from messages import TokenLogprobs

# JSON has no -Infinity; a token the model gives no chance at all reads as this instead.
MIN_LOGPROB = -9999.0


class TokenText:
    """Token id -> its text, memoized (the vocabulary bounds the cache)."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = (self.tokenizer.decode([token_id], skip_special_tokens=False)
                    if self.tokenizer is not None else f"<{token_id}>")
            self._cache[token_id] = text
        return text


def _finite(x: float) -> float:
    return x if math.isfinite(x) else MIN_LOGPROB


def chat_entries(token_ids: Sequence[int], lps: Sequence[TokenLogprobs],
                 text: TokenText) -> list[dict[str, Any]]:
    """Entries of ``logprobs.content`` for these tokens."""
    def one(token_id: int, logprob: float) -> dict[str, Any]:
        s = text(token_id)
        return {"token": s, "logprob": _finite(logprob), "bytes": list(s.encode())}

    return [{**one(t, lp.logprob), "top_logprobs": [one(a, v) for a, v in lp.top]}
            for t, lp in zip(token_ids, lps, strict=False)]


def completion_arrays(token_ids: Sequence[int], lps: Sequence[TokenLogprobs],
                      text: TokenText, offset: int) -> tuple[dict[str, Any], int]:
    """The four arrays for these tokens, whose text starts ``offset`` characters into
    the choice's text; returns them and the offset after the last token."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                           "text_offset": []}
    for t, lp in zip(token_ids, lps, strict=False):
        s = text(t)
        out["tokens"].append(s)
        out["token_logprobs"].append(_finite(lp.logprob))
        out["top_logprobs"].append({text(a): _finite(v) for a, v in lp.top})
        out["text_offset"].append(offset)
        offset += len(s)
    return out, offset

