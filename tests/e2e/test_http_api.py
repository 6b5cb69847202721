"""The OpenAI-compatible HTTP API end to end: the official ``openai`` client and raw HTTP
against a real service (real Ray workers, real SmolLM2, the gRPC server beside it).

One service for the module (``http_live``), on free loopback ports, API key on.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import ray

from engine.config import CacheConfig, EngineConfig
from proto.pdserve.v1 import generation_pb2 as pb
from router.config import RouterConfig
from router.errors import QueueFullError
from router.http import HttpServer
from router.server_config import ServerConfig
from tests.e2e.grpc_fixtures import API_KEY, KV_MEMORY_BYTES, LiveService, free_port

MODEL = "smollm2-135m"
QUESTION = "What is the capital of France?"
BODY_LIMIT = 64 << 10  # small, so a 413 costs little to provoke


@pytest.fixture(scope="module")
def http_live() -> Iterator[LiveService]:
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", num_cpus=6, include_dashboard=False,
                 object_store_memory=300 << 20, _node_ip_address="127.0.0.1",
                 log_to_driver=False)
    live = LiveService(
        RouterConfig(mode="disaggregated", prefill_workers=1, decode_workers=1,
                     engine=EngineConfig(cache=CacheConfig(memory_bytes=KV_MEMORY_BYTES))),
        ServerConfig(host="127.0.0.1", port=0, metrics_port=None, http_port=free_port(),
                     api_key=API_KEY, max_message_bytes=BODY_LIMIT, health_interval_s=0.2,
                     stats_interval_s=0.5))
    try:
        yield live
    finally:
        live.stop()
        if started_ray:
            ray.shutdown()


@pytest.fixture(scope="module")
def url(http_live: LiveService) -> str:
    assert http_live.service.http_url is not None
    return http_live.service.http_url


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def raw(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {API_KEY}"},
                      timeout=120) as c:
        yield c


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# -- the client's happy paths -------------------------------------------------------------
def test_models_health_and_ready(client: openai.OpenAI, url: str) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    for path in ("/health", "/ready"):  # open without a key, like gRPC health
        r = httpx.get(url + path, timeout=10)
        assert (r.status_code, r.json()) == (200, {"status": "ok"})


def test_greedy_chat_equals_grpc(client: openai.OpenAI, http_live: LiveService) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=user(QUESTION),
                                           temperature=0, max_tokens=24)
    grpc_out = http_live.generate(pb.GenerateRequest(
        chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=QUESTION)]),
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=24)))
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.model == MODEL and reply.created > 0
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "".join(r.text for r in grpc_out)
    assert "Paris" in choice.message.content
    final = grpc_out[-1]
    assert choice.finish_reason == {pb.FINISH_REASON_STOP: "stop",
                                    pb.FINISH_REASON_LENGTH: "length"}[final.finish_reason]
    u = reply.usage
    assert (u.prompt_tokens, u.completion_tokens) == (final.usage.prompt_tokens,
                                                      final.usage.completion_tokens)
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model=MODEL, messages=user(QUESTION), temperature=0,
                              max_completion_tokens=24)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert len(body) >= 3, "tokens must stream, not arrive in one chunk"
    assert body[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in body)
    assert "".join(c.choices[0].delta.content or "" for c in body) == \
        whole.choices[0].message.content
    assert body[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    # The same prompt a moment ago left its blocks in the prefix cache.
    assert last.usage.prompt_tokens_details.cached_tokens >= 16


def test_completions_string_token_ids_and_batch(client: openai.OpenAI,
                                                http_live: LiveService) -> None:
    prompt = "The capital of France is"
    text = client.completions.create(model=MODEL, prompt=prompt, temperature=0,
                                     max_tokens=8)
    assert text.object == "text_completion" and text.id.startswith("cmpl-")
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 8
    ids = http_live.router.encode(prompt)
    by_ids = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=8)
    assert by_ids.choices[0].text == text.choices[0].text
    for batch_prompt in ([prompt, prompt], [ids, ids]):  # strings; token-id lists
        batch = client.completions.create(model=MODEL, prompt=batch_prompt, temperature=0,
                                          max_tokens=8)
        assert [c.index for c in batch.choices] == [0, 1]
        assert [c.text for c in batch.choices] == [text.choices[0].text] * 2
        assert batch.usage.prompt_tokens == 2 * len(ids)


def test_n_choices_seeds_and_chat_logprobs(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model=MODEL, messages=user("Name a color."), temperature=1.0,
                              seed=7, max_tokens=6, logprobs=True, top_logprobs=3)
    two = client.chat.completions.create(**kw, n=2)
    again = client.chat.completions.create(**kw, n=2)
    one = client.chat.completions.create(**kw)
    assert [c.index for c in two.choices] == [0, 1]
    texts = [c.message.content for c in two.choices]
    assert texts == [c.message.content for c in again.choices], "seeded: reproducible"
    assert one.choices[0].message.content == texts[0], "choice 0 is the n=1 answer"
    assert two.usage.completion_tokens == sum(
        len(c.logprobs.content) for c in two.choices)
    for c in two.choices:
        for entry in c.logprobs.content:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
            assert bytes(entry.bytes) == entry.token.encode()


def test_tiny_temperature_is_greedy_and_negative_seeds_reproduce(client: openai.OpenAI) -> None:
    """OpenAI's ranges: 0.001 is greedy (fp32 cannot divide by it), and a signed seed
    folds into the sampler's [0, 2^63) as seed mod 2^63, so -5 draws as 2^63 - 5."""
    kw: dict[str, Any] = dict(model=MODEL, prompt="Once upon a time", max_tokens=8)
    greedy = client.completions.create(**kw, temperature=0).choices[0].text
    assert client.completions.create(**kw, temperature=0.001).choices[0].text == greedy
    texts = [client.completions.create(**kw, temperature=1.0, seed=seed).choices[0].text
             for seed in (-5, -5, 2**63 - 5)]
    assert texts[0] == texts[1] == texts[2]


def test_completion_logprobs(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0,
                                    max_tokens=6, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]


def test_stop_strings(client: openai.OpenAI) -> None:
    free = client.completions.create(model=MODEL, prompt="Count: one, two, three,",
                                     temperature=0, max_tokens=12).choices[0].text
    word = free.split()[1]  # a word in the middle of the greedy continuation
    cut = client.completions.create(model=MODEL, prompt="Count: one, two, three,",
                                    temperature=0, max_tokens=12, stop=[word, "zzz"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == free[:free.index(word)]


# -- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "param"), [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 100_000}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"stop": 3}, "stop"),
    ({"n": 0}, "n"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
])
def test_bad_parameter_is_400_naming_it(client: openai.OpenAI, body: dict[str, Any],
                                        param: str) -> None:
    kw: dict[str, Any] = {"model": MODEL, "messages": user("hi"), **body}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**kw)
    assert info.value.status_code == 400
    assert info.value.param == param, info.value.message
    assert info.value.type == "invalid_request_error"


def test_too_long_prompt_is_400(client: openai.OpenAI, http_live: LiveService) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=[1] * http_live.router.max_model_len)
    assert info.value.param == "prompt" and "context" in info.value.message


def test_auth_and_unknown_model(url: str, client: openai.OpenAI) -> None:
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        wrong.models.list()
    assert auth.value.status_code == 401 and auth.value.code == "invalid_api_key"
    missing_key = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, timeout=10)
    assert missing_key.status_code == 401
    assert missing_key.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=user("hi"))
    assert missing.value.code == "model_not_found" and missing.value.param == "model"


def test_raw_http_errors(raw: httpx.Client) -> None:
    big = raw.post("/v1/completions", content=b'{"prompt": "' + b"a" * BODY_LIMIT + b'"}',
                   headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    bad_json = raw.post("/v1/completions", content=b"{not json")
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
    # Hostile bodies are 400s too, never 500s: digits past int()'s limit, nesting past
    # the parser's depth, lone surrogates (in a field, in a quoted model name).
    for body in (b'{"max_tokens": ' + b"9" * 5000 + b"}", b"[" * 20_000 + b"]" * 20_000,
                 b'{"prompt": "a\\udfff", "max_tokens": 2}',
                 b'{"prompt": ["ok", "\\ud800b"], "max_tokens": 2}',
                 b'{"model": "\\ud800", "prompt": "a"}'):
        r = raw.post("/v1/completions", content=body,
                     headers={"content-type": "application/json"})
        assert r.status_code == 400, (body[:40], r.status_code, r.text[:200])
        assert r.json()["error"]["type"] == "invalid_request_error"
    lone = raw.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", '
                    b'"content": "\\udc00"}], "stop": ["\\ud801"]}')
    assert lone.status_code == 400 and lone.json()["error"]["param"] == "messages"
    nowhere = raw.get("/v1/nowhere")
    assert nowhere.status_code == 404 and set(nowhere.json()["error"]) == {
        "message", "type", "param", "code"}


def test_full_queue_is_429_with_retry_after(client: openai.OpenAI,
                                            http_live: LiveService) -> None:
    """The edge's mapping of the router's overload error (filling the real queue needs
    every decode worker's KV cache full; the gRPC tests cover the router's side)."""
    router = http_live.router

    async def refuse(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise QueueFullError("admission queue full (test)")
        yield  # pragma: no cover  (an async generator, like Router.generate)

    real = router.generate
    router.generate = refuse
    try:
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2, stream=True)
    finally:
        router.generate = real
    assert info.value.status_code == 429
    assert int(info.value.response.headers["retry-after"]) >= 1


# -- raw SSE and disconnects ----------------------------------------------------------------
def test_sse_framing(raw: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 5,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with raw.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    *deltas, usage = chunks
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    assert deltas[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in deltas)


def _wait_aborted(live: LiveService) -> None:
    """Every request gone from the router within seconds (a 4000-token request would
    run for minutes) and every worker's pool whole again."""
    deadline = time.monotonic() + 10
    while live.router.requests and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not live.router.requests, "the disconnect should abort the request"
    for worker, s in live.wait_until_idle().items():
        assert s["used"] == 0 and s["requests"] == 0 and s["held"] == 0, (worker, s)
        assert s["free"] == s["usable"], (worker, s)


LONG = {"model": MODEL, "prompt": "Write a very long story about a dragon.",
        "max_tokens": 4000, "ignore_eos": True}


def test_disconnect_mid_stream_frees_kv(raw: httpx.Client, http_live: LiveService) -> None:
    with raw.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(8)]
        assert sum(line.startswith("data: ") for line in got) >= 4
        assert http_live.router.requests, "the request should be in flight"
        busy = http_live.pool_states()
        assert any(s["used"] > 0 for s in busy.values()), "it should hold KV blocks"
    # Leaving the block closed the connection mid-stream.
    _wait_aborted(http_live)


def test_disconnect_before_a_whole_response_frees_kv(raw: httpx.Client,
                                                     http_live: LiveService) -> None:
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes
        raw.post("/v1/completions", json=LONG, timeout=2.0)
    _wait_aborted(http_live)


def test_concurrent_streams(url: str) -> None:
    """Several streamed requests at once through the async client all complete."""
    async def one(c: openai.AsyncOpenAI, i: int) -> str:
        stream = await c.completions.create(model=MODEL, prompt=f"Fact {i}:", max_tokens=6,
                                            temperature=0, stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY,
                                      max_retries=0) as c:
            return await asyncio.gather(*(one(c, i) for i in range(6)))

    texts = asyncio.run(main())
    assert len(texts) == 6 and all(texts)


def test_tls(http_live: LiveService, tmp_path: Path) -> None:
    """A second, TLS-only HTTP server in front of the same router (as test_grpc_ops does
    for gRPC): the service's certificate settings reach uvicorn."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=None, http_port=free_port(),
                          api_key=API_KEY, tls_cert=str(cert), tls_key=str(key))

    async def start() -> HttpServer:
        server = HttpServer(http_live.router, config, None, lambda: True)
        await server.start()
        return server

    server = http_live.run(start())
    base = f"https://127.0.0.1:{server.port}"
    try:
        with httpx.Client(verify=str(cert), timeout=30) as tls:
            secure = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0,
                                   http_client=tls)
            out = secure.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
            assert out.usage.completion_tokens == 2
        with pytest.raises(httpx.HTTPError):  # plain HTTP to a TLS port
            httpx.get(base.replace("https", "http") + "/health", timeout=5)
    finally:
        http_live.run(server.stop())
