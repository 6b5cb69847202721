"""Request checks shared by the engine and the router (light: no torch, no model)."""

from __future__ import annotations

from collections.abc import Sequence

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams


def validate_prompt(
    prompt_token_ids: Sequence[int], params: SamplingParams, vocab_size: int,
    max_model_len: int,
) -> None:
    """Raise InvalidRequestError (naming the field) for a request that can never finish."""
    n = len(prompt_token_ids)
    if n == 0:
        raise InvalidRequestError("prompt", "the prompt is empty")
    bad = next((t for t in prompt_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError("token_ids", f"token id {bad} is outside the vocabulary "
                                  f"[0, {vocab_size})")
    bad = next((t for t in params.stop_token_ids if t >= vocab_size), None)
    if bad is not None:
        raise InvalidRequestError("stop_token_ids", f"token id {bad} is outside the "
                                  f"vocabulary [0, {vocab_size})")
    if n + params.max_tokens > max_model_len:
        raise InvalidRequestError(
            "max_tokens", f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds "
            f"the model's context of {max_model_len} tokens")
