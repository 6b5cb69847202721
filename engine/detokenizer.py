"""Streaming token ids -> text, one token at a time, with stop strings.

Two things make streaming text harder than decoding once at the end:

1. A byte-level BPE token is a run of bytes, not characters: one emoji can be split over
   two or more tokens. Decoding a prefix then ends in U+FFFD, which must not be sent
   (the client could never take it back). Such text is held until a later token
   completes the character.
2. A stop string can span tokens ("Obs" + "ervation:"). The tail of the text that could
   still grow into a stop string is held back until it either completes one (then it and
   everything after it are dropped) or can no longer do so.

Decoding uses a window over the token ids (vLLM's prefix_offset/read_offset scheme),
so each token costs O(window), not O(output):

    ids:   ... | prefix_offset ......... | read_offset ......... | len(ids)
                 already emitted, decoded   decoded now; the new
                 again only for context     text is what extends
                 (spaces, merges)           the context's text

The text the window adds past its context is emitted once it no longer ends in U+FFFD;
then the window slides forward.
"""

from __future__ import annotations

from typing import NamedTuple

from engine.tokenizer import Tokenizer

# Prompt tokens decoded as context for the first output token, so the first token
# renders as it would mid-text (sentencepiece drops a leading space at text start).
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class DetokenizerStep(NamedTuple):
    delta: str  # text safe to send now
    stopped: bool  # a stop string matched: the request is done; later tokens are ignored


class IncrementalDetokenizer:
    """Text of one request's output, built token by token.

    Owned by the request's engine loop; not thread-safe. The concatenation of every
    `add_token(...).delta` and the final `flush()` equals `text`, which (once flushed)
    equals `tokenizer.decode(output_ids)` cut before the first stop string. Stops are
    searched in the decoded text, so `skip_special_tokens=False` lets a stop string match
    a special token's text.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        stop: tuple[str, ...] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = tuple(stop)
        # Only the prompt's tail is kept: it is context for the first window, never text.
        # A tail that ends mid-character (a prompt given as ids) would make the first
        # character of the output ambiguous; the output then decodes on its own.
        self._ids = list(prompt_token_ids[max(0, len(prompt_token_ids) - PROMPT_CONTEXT_TOKENS):])
        if tokenizer.decode(self._ids, skip_special_tokens).endswith(REPLACEMENT_CHAR):
            self._ids = []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._emitted = ""  # text already returned as deltas
        self._held = ""  # decoded text held back because it may start a stop string
        self._stopped = False
        self.matched_stop: str | None = None  # the stop string that ended the text

    @property
    def text(self) -> str:
        """The output text so far: exactly the deltas returned until now (text held back
        is not in it yet), never a matched stop string or anything after it."""
        return self._emitted

    @property
    def stopped(self) -> bool:
        return self._stopped

    def add_token(self, token_id: int) -> DetokenizerStep:
        if self._stopped:
            return DetokenizerStep("", True)
        self._ids.append(token_id)
        return self._push(self._decode_window(final=False))

    def flush(self) -> str:
        """At finish: release the held text, including an incomplete character at the end
        (as U+FFFD, as a full decode would show it). Returns the last delta."""
        if self._stopped:
            return ""
        delta = self._push(self._decode_window(final=True)).delta
        if not self._stopped:
            delta += self._held
            self._emitted += self._held
            self._held = ""
        return delta

    def _decode_window(self, final: bool) -> str:
        """New text from the ids past read_offset; "" while it ends mid-character."""
        if self._read_offset == len(self._ids):
            return ""
        decode = self._tokenizer.decode
        context = decode(self._ids[self._prefix_offset:self._read_offset], self._skip_special)
        full = decode(self._ids[self._prefix_offset:], self._skip_special)
        if len(full) <= len(context) or (full.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        # Slide the window: the new ids become the next token's context.
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(context):]

    def _push(self, new_text: str) -> DetokenizerStep:
        """Append decoded text; emit all of it except a possible stop-string start."""
        if not new_text:
            return DetokenizerStep("", False)
        # No stop string matched before, so a match must end in new_text and can start
        # only inside the held tail: searching held + new_text finds every match.
        buf = self._held + new_text
        cut = self._earliest_stop(buf)
        if cut is not None:
            delta, self._held, self._stopped = buf[:cut], "", True
        else:
            keep = self._stop_prefix_len(buf)
            delta, self._held = buf[:len(buf) - keep], buf[len(buf) - keep:]
        self._emitted += delta
        return DetokenizerStep(delta, self._stopped)

    def _earliest_stop(self, buf: str) -> int | None:
        best: int | None = None
        for s in self._stop:
            i = buf.find(s)
            if i >= 0 and (best is None or i < best):
                best, self.matched_stop = i, s
        return best

    def _stop_prefix_len(self, buf: str) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of a stop string."""
        longest, last = 0, buf[-1]
        for s in self._stop:
            # Candidate prefixes end with buf's last character: jump between those.
            end = s.rfind(last, 0, min(len(s) - 1, len(buf)))
            while end >= longest:
                if buf.endswith(s[:end + 1]):
                    longest = end + 1
                    break
                end = s.rfind(last, 0, end)
        return longest
