"""proto messages <-> the router's typed values, with the request validation that needs
the wire format (which input was set, which fields were left unset).

Validation that only needs tokens and SamplingParams (vocabulary, context length,
ranges) lives in the router and engine; their errors name the field the same way.
"""

from __future__ import annotations

import time
from typing import NamedTuple

from engine.errors import InvalidRequestError
from engine.sampling_params import MAX_LOGPROBS, MAX_STOP_STRINGS, SamplingParams
from engine.tokenizer import CHAT_ROLES
from messages import TokenLogprobs, WorkerStats
from proto.pdserve.v1 import generation_pb2 as pb
from router.core import Router
from router.metrics import queue_seconds, transfer_seconds
from router.request_state import Delta, Final, RouterRequest
from router.worker_handle import WorkerHandle

MAX_REQUEST_ID_CHARS = 256

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
ROLES = {
    "prefill": pb.WORKER_ROLE_PREFILL,
    "decode": pb.WORKER_ROLE_DECODE,
    "colocated": pb.WORKER_ROLE_COLOCATED,
}


class Inputs(NamedTuple):
    prompt_token_ids: list[int]
    params: SamplingParams


def request_inputs(req: pb.GenerateRequest, router: Router, default_max_tokens: int) -> Inputs:
    """Tokens and sampling parameters of a request; InvalidRequestError /
    SamplingParamsError (naming the field) if it cannot be served as sent."""
    if len(req.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters")
    tokens = _prompt_tokens(req, router)
    room = output_room(router, len(tokens))
    params = sampling_params(req.sampling, min(default_max_tokens, room))
    # The prompt's own checks (vocabulary, context, stop token ids) are
    # engine.validation's, run by Router.generate: one implementation for every edge.
    return Inputs(tokens, params)


def output_room(router: Router, num_prompt_tokens: int, field: str = "prompt") -> int:
    """Tokens the model's context leaves for output after the prompt (the default
    max_tokens is capped by it); InvalidRequestError naming ``field`` if it leaves none.
    Shared with the HTTP edge, which names its own field."""
    room = router.max_model_len - num_prompt_tokens
    if room < 1:
        raise InvalidRequestError(
            field, f"the prompt has {num_prompt_tokens} tokens; the model's context holds "
            f"{router.max_model_len} (prompt plus at least one generated token)")
    return room


def _prompt_tokens(req: pb.GenerateRequest, router: Router) -> list[int]:
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidRequestError("input", "set one of prompt, chat or token_ids")
    if which == "prompt":
        if not req.prompt:
            raise InvalidRequestError("prompt", "the prompt is empty")
        return router.encode(req.prompt)
    if which == "chat":
        messages = req.chat.messages
        if not messages:
            raise InvalidRequestError("chat.messages", "the conversation has no messages")
        for i, m in enumerate(messages):
            if m.role not in CHAT_ROLES:
                raise InvalidRequestError(f"chat.messages[{i}].role",
                                          f"unknown role {m.role!r}; expected one of "
                                          f"{', '.join(sorted(CHAT_ROLES))}")
        try:
            return router.encode_chat([{"role": m.role, "content": m.content}
                                       for m in messages])
        except InvalidRequestError:
            raise
        except ValueError as e:  # the template rejected the conversation, e.g. its order
            raise InvalidRequestError("chat", str(e).removeprefix("chat: ")) from None
    if not req.token_ids.ids:
        raise InvalidRequestError("token_ids.ids", "no token ids")
    return list(req.token_ids.ids)


def sampling_params(s: pb.SamplingParams, default_max_tokens: int) -> SamplingParams:
    """SamplingParams validates ranges itself (SamplingParamsError names the field)."""
    if len(s.stop) > MAX_STOP_STRINGS:  # checked here too: SamplingParams sees a tuple
        raise InvalidRequestError("sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings, "
                                  f"got {len(s.stop)}")
    return SamplingParams(
        temperature=s.temperature if s.HasField("temperature") else 1.0,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        top_k=s.top_k,
        min_p=s.min_p,
        max_tokens=s.max_tokens if s.HasField("max_tokens") else default_max_tokens,
        stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        seed=s.seed if s.HasField("seed") else None,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        logprobs=s.logprobs if s.HasField("logprobs") else None,
    )


# -- responses ------------------------------------------------------------------------------
def delta_response(request_id: str, d: Delta) -> pb.GenerateResponse:
    return pb.GenerateResponse(request_id=request_id, token_ids=d.token_ids, text=d.text,
                               logprobs=[_logprobs(lp) for lp in d.logprobs])


def final_response(request_id: str, f: Final, rr: RouterRequest | None) -> pb.GenerateResponse:
    u = f.usage
    return pb.GenerateResponse(
        request_id=request_id, text=f.text,
        finish_reason=FINISH_REASONS.get(f.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        usage=pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                       cached_tokens=u.cached_tokens),
        timing=timing(rr) if rr is not None else None)


def timing(rr: RouterRequest) -> pb.Timing:
    ev = rr.events
    end = ev.finished or time.monotonic()
    return pb.Timing(
        time_to_first_token_seconds=(ev.first_token - ev.arrival) if ev.first_token else 0.0,
        e2e_latency_seconds=end - ev.arrival,
        queue_time_seconds=queue_seconds(rr),
        prefill_time_seconds=ev.prefill_seconds,
        kv_transfer_seconds=transfer_seconds(rr),
        kv_transfer_bytes=ev.transfer_bytes,
        migrations=ev.migrations)


def _logprobs(lp: TokenLogprobs) -> pb.TokenLogprobs:
    return pb.TokenLogprobs(logprob=lp.logprob, top=[pb.TopLogprob(token_id=t, logprob=v)
                                                     for t, v in lp.top])


# -- info -----------------------------------------------------------------------------------
def model_info(router: Router) -> pb.ModelInfo:
    m = router.model_config
    tok = router.tokenizer
    return pb.ModelInfo(
        model_id=router.config.engine.model, architecture=m.architecture,
        vocab_size=m.vocab_size, max_context_tokens=router.max_model_len,
        num_layers=m.num_hidden_layers, hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads, num_kv_heads=m.num_key_value_heads,
        head_dim=m.head_dim, eos_token_ids=list(m.eos_token_ids),
        has_chat_template=tok is not None and tok.chat_template is not None,
        kv_block_size_tokens=router.block_size, max_stop_strings=MAX_STOP_STRINGS,
        max_logprobs=MAX_LOGPROBS)


def server_info(router: Router, version: str, uptime_s: float) -> pb.ServerInfo:
    return pb.ServerInfo(
        version=version, mode=router.config.mode,
        kv_transfer=router.registry.kv_transfer,
        workers=[worker_info(h) for h in router.workers()],
        num_requests_in_flight=len(router.requests),
        num_requests_queued=router.num_queued,
        max_queued_requests=router.config.max_queue,
        uptime_seconds=uptime_s,
        max_requests_in_flight=router.admission.limit,
        num_requests_refused=router.admission.refused)


def worker_info(h: WorkerHandle) -> pb.WorkerInfo:
    info = pb.WorkerInfo(worker_id=h.worker_id, role=ROLES.get(h.role), alive=h.alive,
                         draining=h.draining, seconds_since_heard=h.seconds_since_heard())
    if h.node is not None:
        info.node_id, info.node_address = h.node.node_id, h.node.node_address
    if h.kv_spec is not None:
        info.kv_dtype, info.kv_scales = h.kv_spec.dtype, h.kv_spec.scales
        info.kv_block_shape.extend(h.kv_spec.block_shape)
    s: WorkerStats | None = h.stats
    if s is not None:
        info.num_requests_running = s.num_running
        info.num_requests_waiting = s.num_waiting
        info.num_kv_blocks = s.num_usable_blocks
        info.num_free_kv_blocks = s.num_free_blocks
        info.kv_cache_usage_ratio = s.kv_usage
        info.prefix_cache_queries_blocks = s.prefix_queries
        info.prefix_cache_hits_blocks = s.prefix_hits
        info.num_preemptions = s.num_preemptions
        e = s.engine
        info.kv_block_bytes, info.kv_block_tokens = e.kv_block_bytes, e.block_size
        info.num_spilled_kv_blocks = e.spill_blocks
        info.kv_spill_capacity_bytes = e.spill_capacity_bytes
        info.kv_spill_hits_blocks = e.spill_hits
        info.kv_spilled_bytes, info.kv_restored_bytes = e.spilled_bytes, e.restored_bytes
        if s.pool is not None:
            p = s.pool
            info.kv_blocks.CopyFrom(pb.KVBlockOwners(
                free=p.free, cached=p.cached, running=p.running, reserved=p.reserved,
                transfer=p.transfer))
    return info
