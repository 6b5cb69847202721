"""A small client of pdserve.v1.Generation: what `pdserve generate/info` and the demo use,
and an example of calling the API from Python (any gRPC client works the same way)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import IO

import grpc
from google.protobuf import json_format

from proto.pdserve.v1 import generation_pb2 as pb
from proto.pdserve.v1 import generation_pb2_grpc as pb_grpc
from router.server_config import API_KEY_ENV, DEFAULT_PORT

DEFAULT_TARGET = f"127.0.0.1:{DEFAULT_PORT}"
FINISH_NAMES = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
                pb.FINISH_REASON_ABORT: "abort"}


def credentials(tls_ca: str | None) -> grpc.ChannelCredentials | None:
    """TLS credentials trusting ``tls_ca`` (a PEM file); None for a plaintext channel."""
    if tls_ca is None:
        return None
    with open(tls_ca, "rb") as f:
        return grpc.ssl_channel_credentials(root_certificates=f.read())


def metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    key = api_key or os.environ.get(API_KEY_ENV)
    return (("authorization", f"Bearer {key}"),) if key else ()


def generate_request(text: str, chat: bool = False, max_tokens: int | None = None,
                     temperature: float | None = None, system: str | None = None
                     ) -> pb.GenerateRequest:
    """A request for ``text`` as a raw prompt or (chat=True) as a user message."""
    sampling = pb.SamplingParams()
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if temperature is not None:
        sampling.temperature = temperature
    if not chat:
        return pb.GenerateRequest(prompt=text, sampling=sampling)
    messages = [pb.ChatMessage(role="system", content=system)] if system else []
    messages.append(pb.ChatMessage(role="user", content=text))
    return pb.GenerateRequest(chat=pb.Chat(messages=messages), sampling=sampling)


def print_stream(responses: Iterable[pb.GenerateResponse], out: IO[str] | None = None,
                 err: IO[str] | None = None) -> pb.GenerateResponse | None:
    """Write text deltas as they arrive (stdout), then a summary line (stderr); returns
    the last message (None if the stream was empty)."""
    out = out or sys.stdout
    err = err or sys.stderr
    last = None
    for r in responses:
        out.write(r.text)
        out.flush()
        last = r
    out.write("\n")
    if last is not None:
        err.write(summary(last) + "\n")
    return last


def summary(final: pb.GenerateResponse) -> str:
    u, t = final.usage, final.timing
    tps = (u.completion_tokens / t.e2e_latency_seconds) if t.e2e_latency_seconds else 0.0
    return (f"[{FINISH_NAMES.get(final.finish_reason, 'unfinished')}: "
            f"{u.prompt_tokens} prompt tokens ({u.cached_tokens} cached), "
            f"{u.completion_tokens} generated; first token after "
            f"{t.time_to_first_token_seconds * 1000:.0f} ms, {tps:.1f} tokens/s]")


class Client:
    """Blocking client. ``timeout_s`` becomes each call's gRPC deadline."""

    def __init__(self, target: str = DEFAULT_TARGET, api_key: str | None = None,
                 tls_ca: str | None = None, timeout_s: float | None = None) -> None:
        creds = credentials(tls_ca)
        self.channel = (grpc.secure_channel(target, creds) if creds is not None
                        else grpc.insecure_channel(target))
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.metadata = metadata(api_key)
        self.timeout_s = timeout_s

    def generate(self, request: pb.GenerateRequest) -> Iterator[pb.GenerateResponse]:
        return self.stub.Generate(request, metadata=self.metadata, timeout=self.timeout_s)

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata,
                                      timeout=self.timeout_s)

    def server_info(self) -> pb.ServerInfo:
        return self.stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=self.metadata,
                                       timeout=self.timeout_s)

    def drain_worker(self, worker_id: str) -> pb.DrainWorkerResponse:
        return self.stub.DrainWorker(pb.DrainWorkerRequest(worker_id=worker_id),
                                     metadata=self.metadata, timeout=self.timeout_s)

    def close(self) -> None:
        self.channel.close()


def to_json(message: object) -> str:
    return json_format.MessageToJson(message, preserving_proto_field_name=True)  # type: ignore[arg-type]
