"""How the HTTP edge answers and counts a call refused before its choices start
(pdserve_requests_total's labels), through the real app on a real Router (no
workers): each refusal counts once, with the gRPC code the same refusal gets there,
and the status and error body are OpenAI's."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from engine.sampling_params import SHOWN_CHARS
from router.core import Router
from router.errors import QueueFullError
from router.http.app import OpenAIApi
from router.metrics import Metrics
from router.server_config import ServerConfig
from tests.unit.router_fakes import cached_model_config, cached_tokenizer

BODY_LIMIT = 4 << 10
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def router(monkeypatch: pytest.MonkeyPatch) -> Router:
    monkeypatch.setattr("router.core.load_model_config", cached_model_config)
    monkeypatch.setattr("router.core.load_tokenizer", cached_tokenizer)
    return Router()


@pytest.fixture
def metrics(router: Router) -> Metrics:
    return Metrics(router)


@pytest.fixture
def client(router: Router, metrics: Metrics) -> Iterator[TestClient]:
    config = ServerConfig(max_message_bytes=BODY_LIMIT)
    with TestClient(OpenAIApi(router, config, metrics, lambda: True).app()) as c:
        yield c


def counted(metrics: Metrics) -> dict[tuple[str, str], float]:
    return {(s.labels["finish_reason"], s.labels["code"]): s.value
            for m in metrics.requests.collect() for s in m.samples
            if s.name.endswith("_total") and s.value}


@pytest.mark.parametrize(("path", "body", "status", "code"), [
    ("/v1/chat/completions", {**CHAT, "temperature": -1}, 400, "INVALID_ARGUMENT"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "auto"}, 400, "INVALID_ARGUMENT"),
    ("/v1/completions", {"prompt": "hi", "temperature": 10**400}, 400, "INVALID_ARGUMENT"),
    ("/v1/completions", {"prompt": ["hi"] * 65}, 400, "INVALID_ARGUMENT"),
    ("/v1/completions", b"{not json", 400, "INVALID_ARGUMENT"),
    ("/v1/completions", b"[1]", 400, "INVALID_ARGUMENT"),
    ("/v1/completions", b'{"prompt": "\\ud800"}', 400, "INVALID_ARGUMENT"),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4o"}, 404, "NOT_FOUND"),
    ("/v1/completions", {"prompt": "a" * BODY_LIMIT}, 413, "RESOURCE_EXHAUSTED"),
])  # fmt: skip
def test_a_refused_request_counts_once_with_its_grpc_code(
        client: TestClient, metrics: Metrics, path: str, body: Any, status: int,
        code: str) -> None:
    r = (client.post(path, content=body) if isinstance(body, bytes)
         else client.post(path, json=body))
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert counted(metrics) == {("error", code): 1.0}


def test_a_refusal_at_admission_counts_once(client: TestClient, metrics: Metrics,
                                             router: Router) -> None:
    async def full(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise QueueFullError("admission queue full (test)")
        yield  # pragma: no cover  (an async generator, like Router.generate)

    router.generate = full  # type: ignore[method-assign]
    for stream in (False, True):
        r = client.post("/v1/completions", json={"prompt": "hi", "stream": stream})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert counted(metrics) == {("error", "RESOURCE_EXHAUSTED"): 2.0}


def test_a_generation_call_without_the_api_key_counts_as_unauthenticated(
        router: Router, metrics: Metrics) -> None:
    config = ServerConfig(api_key="k")
    with TestClient(OpenAIApi(router, config, metrics, lambda: True).app()) as c:
        for path in ("/v1/completions", "/v1/chat/completions"):
            assert c.post(path, json={"prompt": "hi"}).status_code == 401
        wrong = {"authorization": "Bearer nope"}
        assert c.post("/v1/completions", json={}, headers=wrong).status_code == 401
        assert c.get("/v1/models").status_code == 401  # refused, but not a generation
        assert c.get("/v1/completions").status_code == 401
        assert c.get("/health").status_code == 200
    assert counted(metrics) == {("error", "UNAUTHENTICATED"): 3.0}


def test_routes_that_generate_nothing_are_not_counted(client: TestClient,
                                                      metrics: Metrics) -> None:
    assert client.get("/v1/nowhere").status_code == 404
    assert client.get("/v1/models/other").status_code == 404
    assert client.get("/v1/models").status_code == 200
    assert counted(metrics) == {}


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1e308}, 400),
    ("/v1/completions", {"prompt": "hi", "model": "m" * 3000}, 404),
    ("/v1/chat/completions", {"messages": [{"role": "r" * 3000, "content": "hi"}]}, 400),
    ("/v1/completions", {"prompt": "hi", "k" * 1000: "\ud800"}, 400),
])  # fmt: skip
def test_an_error_body_quotes_a_clipped_value(client: TestClient, path: str,
                                              body: dict[str, Any], status: int) -> None:
    r = client.post(path, content=json.dumps(body))  # a lone surrogate goes as an escape
    assert r.status_code == status
    error = r.json()["error"]
    assert len(error["message"]) < SHOWN_CHARS + 120, error["message"]
    assert error["param"] is None or len(error["param"]) <= SHOWN_CHARS


def test_a_model_path_404_quotes_a_clipped_name(client: TestClient) -> None:
    r = client.get("/v1/models/" + "m" * 3000)
    assert r.status_code == 404 and len(r.json()["error"]["message"]) < SHOWN_CHARS + 40
