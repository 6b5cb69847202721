"""Per-request sampling parameters (the offline API's and the gRPC API's semantics)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_LOGPROBS = 20

# The sampler computes in fp32. A temperature of 1e-300 is 0 there, and logits / 0 is
# inf/NaN: the draw then lands outside the vocabulary. Below 0.01 a temperature is
# greedy in all but name (a logit gap of 0.2 is already a factor e^20), so a positive
# temperature below it is stored as 0 and decoded greedily, as OpenAI's API and vLLM
# answer one (refusing it broke clients that send 0.001 to mean "deterministic").
# 0.01 also keeps logits / temperature finite for any logit below ~3e36.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 100.0
# repetition_penalty divides or multiplies logits: far outside [0.01, 100] it only
# pushes them towards 0 or fp32's overflow, never to a more useful distribution.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")
# Errors quote the value they refuse; a client's value can be a 300-digit integer or a
# megabyte of text, which belongs neither in a response nor in a log line.
SHOWN_CHARS = 40


def shown(value: object) -> str:
    """``value`` as an error message quotes it (strings in quotes): at most SHOWN_CHARS
    characters, an ellipsis marking the cut."""
    try:
        text = repr(value) if isinstance(value, str) else str(value)
    except ValueError:  # an int past str()'s 4300-digit limit
        text = "an integer of over 4300 digits"
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; ``field`` names it (mapped to INVALID_ARGUMENT)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"sampling.{field_name}: {message}")
        self.field = field_name
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Crosses Ray like InvalidRequestError: rebuilt from its own arguments.
        return type(self), (self.field, self.message)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature: 0 means greedy (argmax); otherwise in (0, 100], dividing the logits
        before sampling. Values below 0.01 are greedy too and are stored as 0 (see
        MIN_TEMPERATURE).
    top_k: keep the k most likely tokens; 0 (or -1) disables.
    top_p: keep the smallest set whose probability mass reaches top_p; 1 disables.
    min_p: drop tokens whose probability is below min_p * p(max); 0 disables.
    seed: per-request seed; the same seed draws the same numbers whatever the batch
        (the tokens match unless a draw lands within float noise of a token boundary:
        see engine/sampler.py).
    repetition_penalty: HF/CTRL style, applied to tokens seen in prompt or output
        ([0.01, 100]; 1 disables). presence_penalty / frequency_penalty: OpenAI style, applied to
        tokens in the output (-2..2; 0 disables).
    stop: strings that end generation; the matched string is excluded from the text.
    stop_token_ids: token ids that end generation (kept in token_ids, not in text).
    ignore_eos: keep generating past the model's EOS token.
    max_tokens: most tokens to generate (>= 1).
    logprobs: when set, return the sampled token's log-probability and this many top
        alternatives (0..20). Log-probabilities are of the model's raw distribution,
        before temperature and truncation.
    resumed_output_tokens: set by the router, never by clients: how many of the
        prompt's last tokens the model generated in an earlier placement of this
        request (it moved to another worker, which continues from prompt + tokens so
        far). Presence and frequency penalties count them as output, so the request
        continues as it would have in place.

    Every float field must be a finite number (NaN and infinities are rejected), and
    ranges are checked as the fp32 sampler will see them.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    max_tokens: int = 16
    logprobs: int | None = None
    skip_special_tokens: bool = True
    resumed_output_tokens: int = 0

    def __post_init__(self) -> None:
        # Accept lists from callers but store tuples so params stay hashable and frozen.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        self._validate()
        if self.temperature < MIN_TEMPERATURE:  # 0, or too small to divide by in fp32
            object.__setattr__(self, "temperature", 0.0)

    def _validate(self) -> None:
        def bad(name: str, msg: str) -> SamplingParamsError:
            return SamplingParamsError(name, msg)

        for name in _FLOAT_FIELDS:
            _check_finite(name, getattr(self, name))
        for name in ("top_k", "max_tokens", "resumed_output_tokens"):
            _check_int(name, getattr(self, name))
        t = self.temperature
        if not 0.0 <= t <= MAX_TEMPERATURE:
            raise bad("temperature", f"must be in [0, {MAX_TEMPERATURE:g}], got {shown(t)}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {shown(self.top_p)}")
        if self.top_k < -1:
            raise bad("top_k", f"must be >= 0 (or -1 to disable), got {shown(self.top_k)}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"must be in [0, 1], got {shown(self.min_p)}")
        rp = self.repetition_penalty
        if not MIN_REPETITION_PENALTY <= rp <= MAX_REPETITION_PENALTY:
            raise bad("repetition_penalty", f"must be in [{MIN_REPETITION_PENALTY}, "
                      f"{MAX_REPETITION_PENALTY:g}], got {shown(rp)}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, f"must be in [-2, 2], got {shown(getattr(self, name))}")
        if self.max_tokens < 1:
            raise bad("max_tokens", f"must be >= 1, got {shown(self.max_tokens)}")
        if self.resumed_output_tokens < 0:
            raise bad("resumed_output_tokens", f"must be >= 0, got "
                      f"{shown(self.resumed_output_tokens)}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not s or len(s) > MAX_STOP_STRING_CHARS:
                raise bad("stop", f"stop strings must be 1..{MAX_STOP_STRING_CHARS} characters")
        if any(t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "token ids must be >= 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {shown(self.logprobs)}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise bad("seed", f"must be in [0, 2^63), got {shown(self.seed)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


def _check_finite(name: str, value: object) -> None:
    # bool is an int: True would pass as 1.0 and hide a caller's mix-up of fields.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SamplingParamsError(name, f"must be a number, got {type(value).__name__}")
    try:
        finite = math.isfinite(value)  # type: ignore[arg-type]
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise SamplingParamsError(name, f"must be a finite number, got {shown(value)}")


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SamplingParamsError(name, f"must be an integer, got {shown(value)}")
