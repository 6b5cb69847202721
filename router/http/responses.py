"""OpenAI response bodies, built from the router's items for one request.

    whole:      chat.completion / text_completion with every choice and the usage
    streaming:  chat.completion.chunk / text_completion chunks, one per Delta that has
                text (or logprobs), then a finish chunk per choice; with
                stream_options.include_usage every chunk has "usage": null and a last
                chunk with no choices carries the usage

Usage: completion tokens are summed over choices; prompt and cached tokens are counted
once per prompt (n choices share it), as its first choice saw them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from router.http import logprobs as lp
from router.http.requests import ApiRequest
from router.request_state import Delta, Final, Usage

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer
    from messages import TokenLogprobs


@dataclass
class _Out:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    role_sent: bool = False  # streaming chat: the first delta carries the role
    text_offset: int = 0  # streaming completions: where the next token's text starts


class Renderer:
    def __init__(self, req: ApiRequest, response_id: str, tokenizer: Tokenizer | None
                 ) -> None:
        self.req = req
        self.id = response_id
        self.created = int(time.time())
        self.outs = [_Out() for _ in req.choices]
        self.token_text = lp.TokenText(tokenizer)

    def add(self, index: int, item: Delta | Final) -> None:
        out = self.outs[index]
        if isinstance(item, Delta):
            out.token_ids += item.token_ids
            out.logprobs += item.logprobs
            out.text.append(item.text)
        else:
            out.text.append(item.text)
            out.finish_reason = item.finish_reason
            out.usage = item.usage

    # -- the whole response -------------------------------------------------------------
    def body(self) -> dict[str, Any]:
        choices = [self._whole_choice(i, out) for i, out in enumerate(self.outs)]
        obj = "chat.completion" if self.req.chat else "text_completion"
        return {**self._head(obj), "choices": choices, "usage": self.usage()}

    def _whole_choice(self, index: int, out: _Out) -> dict[str, Any]:
        text = "".join(out.text)
        c: dict[str, Any] = {"index": index}
        if self.req.chat:
            c["message"] = {"role": "assistant", "content": text}
        else:
            c["text"] = text
        c["logprobs"] = self._logprobs(out.token_ids, out.logprobs, 0)[0]
        c["finish_reason"] = out.finish_reason
        return c

    def usage(self) -> dict[str, Any]:
        prompt = cached = completion = 0
        seen: set[int] = set()
        for choice, out in zip(self.req.choices, self.outs, strict=True):
            u = out.usage or Usage(len(choice.prompt_token_ids), len(out.token_ids), 0)
            completion += u.completion_tokens
            if choice.prompt_index not in seen:
                seen.add(choice.prompt_index)
                prompt += u.prompt_tokens
                cached += u.cached_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    # -- streaming ----------------------------------------------------------------------
    def chunks(self, index: int, item: Delta | Final) -> list[dict[str, Any]]:
        """The chunks this item becomes (none for a Delta with nothing to show yet)."""
        self.add(index, item)
        out = self.outs[index]
        if isinstance(item, Delta):
            show_logprobs = self.req.logprobs and item.token_ids
            if not (item.text or show_logprobs or (self.req.chat and not out.role_sent)):
                return []
            logprobs, out.text_offset = self._logprobs(item.token_ids, item.logprobs,
                                                       out.text_offset)
            return [self._chunk(index, out, item.text, logprobs, None)]
        chunks = []
        if item.text:  # text held back for a stop string that did not match after all
            chunks.append(self._chunk(index, out, item.text, None, None))
        chunks.append(self._chunk(index, out, "", None, item.finish_reason))
        return chunks

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._head(self._chunk_object()), "choices": [], "usage": self.usage()}

    def _chunk(self, index: int, out: _Out, text: str, logprobs: Any,
               finish_reason: str | None) -> dict[str, Any]:
        c: dict[str, Any] = {"index": index}
        if self.req.chat:
            delta: dict[str, Any] = {} if finish_reason and out.role_sent else {"content": text}
            if not out.role_sent:
                delta = {"role": "assistant", **delta}
                out.role_sent = True
            c["delta"] = delta
        else:
            c["text"] = text
        c["logprobs"] = logprobs
        c["finish_reason"] = finish_reason
        chunk = {**self._head(self._chunk_object()), "choices": [c]}
        if self.req.include_usage:
            chunk["usage"] = None
        return chunk

    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.req.chat else "text_completion"

    # -- shared -------------------------------------------------------------------------
    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created,
                "model": self.req.model, "system_fingerprint": None}

    def _logprobs(self, token_ids: list[int], lps: list[TokenLogprobs], offset: int
                  ) -> tuple[dict[str, Any] | None, int]:
        """The choice's ``logprobs`` for these tokens (None unless asked for), and the
        text offset after them (completions' text_offset; ``offset`` is where they start)."""
        if not self.req.logprobs:
            return None, offset
        if self.req.chat:
            return {"content": lp.chat_entries(token_ids, lps, self.token_text),
                    "refusal": None}, offset
        return lp.completion_arrays(token_ids, lps, self.token_text, offset)
