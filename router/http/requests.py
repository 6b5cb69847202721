"""OpenAI request bodies -> the router's typed inputs: prompt tokens and SamplingParams
per choice.

Validation is the gRPC API's: ranges are SamplingParams' own checks, prompt length and
vocabulary are Router.validate, the context room is wire.output_room. This module
only reads the JSON (types, shapes) and renames the field in an error to the name the
client sent (``max_completion_tokens``, ``messages``, ``top_logprobs``), so a 400
carries an OpenAI ``param``.

Order: every check that costs little (the model, refused fields, n and the number of
prompts, the sampling values, the number of chat messages) runs before anything is
tokenized or rendered through the chat template, so a request refused anyway costs no
tokenizer time: a body of half a million prompts or messages fits the body cap, and
the template holds the GIL while it renders.

Choices: a request asks for ``n`` choices of each prompt (completions take several
prompts); every choice is its own router request, run in parallel. A seeded request's
choice j samples with seed + j, so choice 0 is what the same request with n=1 gives
and the other choices differ from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams, SamplingParamsError, shown
from engine.tokenizer import CHAT_ROLES
from router import wire
from router.http import fields
from router.http.errors import model_not_found

if TYPE_CHECKING:
    from router.core import Router

MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # prompts x n: each is a router request, bounded like a client's burst
SEED_MODULUS = 2**63  # SamplingParams' seed range

# Fields that would change the answer if honoured, with the value that means "off".
# Without tools there is nothing to choose or call: any tool_choice (or the older
# function_call) but "none" asks for what this server cannot give, "auto" included.
CHAT_UNSUPPORTED: dict[str, Any] = {"tools": [], "functions": [], "logit_bias": {},
                                    "response_format": {"type": "text"},
                                    "tool_choice": "none", "function_call": "none",
                                    "modalities": ["text"]}
COMPLETION_UNSUPPORTED: dict[str, Any] = {"echo": False, "suffix": "", "logit_bias": {},
                                          "best_of": 1}
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


@dataclass(frozen=True)
class Choice:
    index: int  # choices[].index in the response
    prompt_index: int
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class ApiRequest:
    chat: bool  # /v1/chat/completions (else /v1/completions)
    model: str
    choices: tuple[Choice, ...]
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    logprobs: bool


@dataclass(frozen=True)
class _Options:
    """Everything a request asks but its prompts, read before any prompt is tokenized."""

    n: int
    params: SamplingParams  # max_tokens: the client's, else 1 until a prompt's room is known
    explicit_max: bool  # the client set max_tokens (else: the default, capped by the room)
    stream: bool
    include_usage: bool
    logprobs: bool


@dataclass(frozen=True)
class _Names:
    """The client's names for the fields whose errors come from shared validation."""

    prompt: str  # "messages" or "prompt"
    max_tokens: str  # "max_tokens" or "max_completion_tokens"
    logprobs: str  # "top_logprobs" (chat) or "logprobs" (completions)

    def of(self, field: str) -> str:
        return {"prompt": self.prompt, "token_ids": self.prompt,
                "max_tokens": self.max_tokens, "logprobs": self.logprobs}.get(field, field)


def served_model(router: Router) -> str:
    """The one model name this server answers to (GET /v1/models lists it)."""
    return router.config.engine.model


def parse_chat(body: dict[str, Any], router: Router, default_max_tokens: int) -> ApiRequest:
    model = _model(body, router)
    fields.refuse(body, CHAT_UNSUPPORTED)
    logprobs = bool(fields.boolean(body, "logprobs"))
    top = fields.integer(body, "top_logprobs")
    if top is not None and not logprobs:
        raise InvalidRequestError("top_logprobs", "needs logprobs: true")
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    names = _Names("messages", max_name, "top_logprobs")
    options = _options(body, names, (top or 0) if logprobs else None, num_prompts=1)
    messages = _messages(body.get("messages"), router.max_model_len)
    try:
        tokens = router.encode_chat(messages)
    except InvalidRequestError as e:
        raise _renamed(e, "messages", str(e)) from None
    except ValueError as e:  # the template rejected the conversation, e.g. its order
        raise InvalidRequestError("messages", str(e).removeprefix("chat: ")) from None
    return _request(router, default_max_tokens, names, [tokens], options, chat=True,
                    model=model)


def parse_completion(body: dict[str, Any], router: Router, default_max_tokens: int
                     ) -> ApiRequest:
    model = _model(body, router)
    fields.refuse(body, COMPLETION_UNSUPPORTED)
    names = _Names("prompt", "max_tokens", "logprobs")
    prompt = body.get("prompt")
    options = _options(body, names, fields.integer(body, "logprobs"),
                       num_prompts=_num_prompts(prompt))
    prompts = _prompts(prompt, router)
    return _request(router, default_max_tokens, names, prompts, options, chat=False,
                    model=model)


# -- shared ---------------------------------------------------------------------------------
def _options(body: dict[str, Any], names: _Names, logprobs: int | None, num_prompts: int
             ) -> _Options:
    fields.string(body, "user")  # accepted (clients send it for abuse tracking), not used
    n = fields.integer(body, "n")
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise InvalidRequestError("n", f"must be in [1, {MAX_N}], got {shown(n)}")
    if n * num_prompts > MAX_CHOICES:
        raise InvalidRequestError("prompt" if num_prompts > MAX_CHOICES else "n",
                                  f"prompts x n must be at most {MAX_CHOICES}, got "
                                  f"{num_prompts} x {n}")
    explicit_max = fields.integer(body, names.max_tokens)
    params = _params(_sampling(body, names, logprobs),
                     1 if explicit_max is None else explicit_max, names)
    stream = bool(fields.boolean(body, "stream"))
    stream_options = fields.obj(body, "stream_options") or {}
    if stream_options and not stream:  # vLLM's rule too: it would be silently ignored
        raise InvalidRequestError("stream_options", "only allowed when stream is true")
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise InvalidRequestError("stream_options.include_usage", "must be a boolean")
    return _Options(n=n, params=params, explicit_max=explicit_max is not None, stream=stream,
                    include_usage=stream and include_usage, logprobs=logprobs is not None)


def _request(router: Router, default_max_tokens: int, names: _Names,
             prompts: list[list[int]], options: _Options, *, chat: bool, model: str
             ) -> ApiRequest:
    choices: list[Choice] = []
    for p, tokens in enumerate(prompts):
        room = wire.output_room(router, len(tokens), names.prompt)
        params = options.params if options.explicit_max else dataclasses.replace(
            options.params, max_tokens=min(default_max_tokens, room))
        try:
            router.validate(tokens, params)
        except InvalidRequestError as e:
            raise _renamed(e, names.of(e.field), str(e)) from None
        for j in range(options.n):
            choices.append(Choice(len(choices), p, tokens, _seeded(params, j)))
    return ApiRequest(chat=chat, model=model, choices=tuple(choices), stream=options.stream,
                      include_usage=options.include_usage, logprobs=options.logprobs)


def _sampling(body: dict[str, Any], names: _Names, logprobs: int | None) -> dict[str, Any]:
    """SamplingParams keyword arguments (all but max_tokens); unset fields keep the
    dataclass defaults, which are OpenAI's (temperature 1, top_p 1, no penalties)."""
    kw: dict[str, Any] = {}
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):
        v = fields.number(body, name)
        if v is not None:
            kw[name] = v
    top_k = fields.integer(body, "top_k")
    if top_k is not None:
        kw["top_k"] = top_k
    seed = fields.integer(body, "seed")
    if seed is not None:
        # OpenAI's and vLLM's seeds are signed 64-bit; the sampler's are [0, 2^63).
        # Folding modulo 2^63 keeps every seed >= 0 as it was and gives each negative
        # one a fixed seed of its own (s + 2^63): the same seed, the same tokens. (2^64
        # seeds into 2^63: each negative seed draws as one large positive one does.)
        kw["seed"] = seed % SEED_MODULUS
    ignore_eos = fields.boolean(body, "ignore_eos")
    if ignore_eos is not None:
        kw["ignore_eos"] = ignore_eos
    kw["stop"] = fields.stop_strings(body)
    kw["logprobs"] = logprobs
    return kw


def _params(sampling: dict[str, Any], max_tokens: int, names: _Names) -> SamplingParams:
    try:
        return SamplingParams(**sampling, max_tokens=max_tokens)
    except SamplingParamsError as e:
        detail = str(e).removeprefix(f"sampling.{e.field}: ")
        raise InvalidRequestError(names.of(e.field), detail) from None


def _renamed(e: InvalidRequestError, field: str, message: str) -> InvalidRequestError:
    """The same error under the client's field name (its message names it too)."""
    return InvalidRequestError(field, message.removeprefix(f"{e.field}: "))


def _seeded(params: SamplingParams, j: int) -> SamplingParams:
    if j == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + j) % SEED_MODULUS)


def _model(body: dict[str, Any], router: Router) -> str:
    """The request's model; absent means the served one (there is only one)."""
    name = fields.string(body, "model")
    served = served_model(router)
    if name is not None and name != served:
        raise model_not_found(name)
    return served


def _messages(v: Any, max_model_len: int) -> list[dict[str, str]]:
    """OpenAI chat messages -> the tokenizer's {"role", "content"} dicts. Content is a
    string or an array of text parts (joined by newlines); other parts are refused."""
    if not isinstance(v, list) or not v:
        raise InvalidRequestError("messages", "must be a non-empty array of messages")
    # Every message takes at least one token of the context (its role marker), so more
    # messages than the context has tokens can never fit; refusing them here spares the
    # chat template, which would hold the GIL for seconds rendering 200,000 of them.
    if len(v) > max_model_len:
        raise InvalidRequestError("messages", f"{len(v)} messages cannot fit the model's "
                                  f"context of {max_model_len} tokens (each message takes "
                                  "at least one)")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequestError(where, "must be an object with role and content")
        role = m.get("role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in CHAT_ROLES:
            raise InvalidRequestError(f"{where}.role", f"unknown role {shown(m.get('role'))}; "
                                      f"expected one of {', '.join(sorted(CHAT_ROLES))}")
        content = m.get("content")
        if content is None and role != "assistant":  # only a turn that called tools
            raise InvalidRequestError(f"{where}.content", f"a {role} message needs content")
        out.append({"role": role, "content": _content(content, f"{where}.content")})
    return out


def _content(v: Any, where: str) -> str:
    if v is None:  # an assistant turn that only called tools
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        texts = []
        for part in v:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise InvalidRequestError(where, "only text parts ({\"type\": \"text\", "
                                          "\"text\": ...}) are supported")
            texts.append(part["text"])
        return "\n".join(texts)
    raise InvalidRequestError(where, "must be a string or an array of text parts")


def _num_prompts(v: Any) -> int:
    """How many prompts ``prompt`` holds, read from its shape without a pass over it
    (_prompts checks the shape): an array of strings or of arrays is one prompt each,
    a string or an array of token ids is one."""
    if isinstance(v, list) and v and isinstance(v[0], str | list):
        return len(v)
    return 1


def _prompts(v: Any, router: Router) -> list[list[int]]:
    """``prompt``: a string, an array of strings, an array of token ids, or an array of
    arrays of token ids (one prompt each)."""
    if isinstance(v, str):
        return [router.encode(v)]
    ids = fields.token_ids(v)
    if ids is not None:
        return [ids]
    if isinstance(v, list) and v:
        if all(isinstance(s, str) for s in v):
            return [router.encode(s) for s in v]
        batch = [fields.token_ids(p) for p in v]
        if all(p is not None for p in batch):
            return [p for p in batch if p is not None]
    raise InvalidRequestError("prompt", "must be a string, an array of strings, an array of "
                              "token ids or an array of arrays of token ids")
