"""The OpenAI-compatible HTTP API (a Starlette app): routes, body limit, auth, errors.

One call of POST /v1/chat/completions or /v1/completions::

    body (at most max_message_bytes) -> requests.parse_* (validate, tokenize: the gRPC
        API's checks) -> one router stream per choice (choices.Choices)
        -> responses.Renderer -> one JSON body, or SSE chunks when "stream": true
    error  -> errors.error_response (status_for's code -> HTTP status, OpenAI body);
        one refused before its choices start counts in pdserve_requests_total here,
        with the gRPC code the same refusal gets there (the choices count the rest)
    client disconnects -> the choices' tasks are cancelled -> their router streams are
        closed, which aborts each request on every worker holding it (blocks freed)

GET /v1/models lists the served model; GET /health and /ready answer 200 while the
gRPC health service says SERVING (every role the mode needs has a live worker), 503
otherwise and while the server stops.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

import grpc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Scope

from engine.sampling_params import SHOWN_CHARS, shown
from router.http.auth import ApiKeyMiddleware
from router.http.choices import Choices, running
from router.http.errors import (
    HttpError,
    api_error,
    bad_body,
    body_too_large,
    error_body,
    error_response,
)
from router.http.requests import ApiRequest, parse_chat, parse_completion, served_model
from router.http.responses import Renderer
from router.http.sse import DONE, ClientGone, EventStream, event, until_disconnect
from router.server_config import ServerConfig

if TYPE_CHECKING:
    from router.core import Router
    from router.metrics import Metrics

HEALTH_PATHS = frozenset({"/health", "/ready"})
GENERATE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})  # counted in metrics
CLIENT_CLOSED = 499  # nginx's code for "the client went away"; nobody reads it
# A body this large is parsed and tokenized on a thread, so a huge prompt does not hold
# up the event loop that streams everyone else's tokens (the gRPC edge does the same).
PARSE_INLINE_BYTES = 16 << 10
Parser = Callable[[dict[str, Any], "Router", int], ApiRequest]


class OpenAIApi:
    """The routes, over one router shared with the gRPC server. ``ready`` reads the
    gRPC health service's verdict, so both APIs report the same liveness."""

    def __init__(self, router: Router, config: ServerConfig, metrics: Metrics | None,
                 ready: Callable[[], bool]) -> None:
        self.router = router
        self.config = config
        self.metrics = metrics
        self.ready = ready
        self.stopping = False
        self.created = int(time.time())

    def app(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.health, methods=["GET"]),
        ]
        middleware = ([Middleware(ApiKeyMiddleware, api_key=self.config.api_key,
                                  open_paths=HEALTH_PATHS, on_refused=self._unauthenticated)]
                      if self.config.api_key else [])
        return Starlette(routes=routes, middleware=middleware,
                         exception_handlers={HTTPException: _routing_error})

    # -- generation ---------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, parse_chat, "chatcmpl")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, parse_completion, "cmpl")

    async def _generate(self, request: Request, parse: Parser, id_prefix: str) -> Response:
        default_max = self.config.default_max_tokens
        try:
            raw = await read_body(request, self.config.max_message_bytes)
            body = json_object(raw)
            if len(raw) > PARSE_INLINE_BYTES:  # off the loop: other streams go on
                req = await asyncio.to_thread(parse, body, self.router, default_max)
            else:
                req = parse(body, self.router, default_max)
        except ClientGone:  # it left before its body was in: nothing to answer or count
            return Response(status_code=CLIENT_CLOSED)
        except Exception as e:
            return self._refused(e)
        render = Renderer(req, f"{id_prefix}-{uuid.uuid4().hex}", self.router.tokenizer)
        if req.stream:
            return await self._stream(request, req, render)
        try:
            async with running(self.router, render.id, req.choices, self.metrics) as choices:
                await until_disconnect(request.receive, _collect(choices, render))
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        except Exception as e:
            return error_response(e)
        return JSONResponse(render.body())

    async def _stream(self, request: Request, req: ApiRequest, render: Renderer) -> Response:
        choices = Choices(self.router, render.id, req.choices, self.metrics)
        choices.start()
        try:  # the status line waits for admission: a full queue is a 429, not a 200
            await until_disconnect(request.receive, choices.wait_started())
        except ClientGone:
            await choices.close()
            return Response(status_code=CLIENT_CLOSED)
        except Exception as e:
            await choices.close()
            return error_response(e)
        return EventStream(_events(choices, render), on_close=choices.close)

    def _refused(self, exc: Exception) -> Response:
        """The error response of a request refused before any choice started, counted as
        the gRPC edge counts a call it refuses (a bad request is INVALID_ARGUMENT there
        too); the code is one of grpc.StatusCode's names, never the client's text."""
        err = api_error(exc)
        if self.metrics is not None and err.grpc_code is not None:
            self.metrics.count_request("error", err.grpc_code.name)
        return error_response(err)

    def _unauthenticated(self, scope: Scope) -> None:
        """A generation call refused for its API key counts as UNAUTHENTICATED, as a
        refused gRPC Generate call does (other routes are not requests to count)."""
        if (self.metrics is not None and scope["method"] == "POST"
                and scope["path"] in GENERATE_PATHS):
            self.metrics.count_request("error", grpc.StatusCode.UNAUTHENTICATED.name)

    # -- models and health --------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name != served_model(self.router):
            return error_response(HttpError(404, f"The model {shown(name)} does not exist.",
                                            param="model", code="model_not_found"))
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict[str, Any]:
        return {"id": served_model(self.router), "object": "model", "created": self.created,
                "owned_by": "pdserve", "max_model_len": self.router.max_model_len}

    async def health(self, request: Request) -> Response:
        ok = not self.stopping and self.ready()
        return JSONResponse({"status": "ok" if ok else "unavailable"},
                            status_code=200 if ok else 503)


async def _collect(choices: Choices, render: Renderer) -> None:
    async for index, item in choices.items():
        render.add(index, item)


async def _events(choices: Choices, render: Renderer) -> AsyncGenerator[bytes, None]:
    try:
        async for index, item in choices.items():
            for chunk in render.chunks(index, item):
                yield event(chunk)
        if render.req.include_usage:
            yield event(render.usage_chunk())
    except Exception as e:  # the 200 is out: the error travels as an event
        yield event(error_body(api_error(e)))
    yield DONE


async def read_body(request: Request, limit: int) -> bytes:
    """The body; 413 past ``limit`` bytes (checked as it arrives, so a client that lies
    about or omits Content-Length cannot make us buffer more). ClientGone if the
    connection ends first: the client left, or the server closed it because the body
    stalled (connections.BODY_IDLE_TIMEOUT_S, answered 408 there)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise body_too_large(limit)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise body_too_large(limit)
    except ClientDisconnect:
        raise ClientGone from None
    return bytes(body)


# A JSON escape of a surrogate code point (U+D800..U+DFFF): the only way a lone
# surrogate gets into parsed JSON (a pair of escapes decodes to one character; raw
# bytes must be valid UTF-8).
_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")


def json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400: not JSON (ValueError covers bad UTF-8 and
    integers of over 4300 digits), nested too deep to parse, or holding a string with
    a lone surrogate, which no tokenizer or response encoder can take."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise bad_body(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad_body("the request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(body):
        for key, value in data.items():
            if _has_lone_surrogate(value):
                raise bad_body(f"{shown(key)} holds a string with a lone UTF-16 surrogate "
                               "(U+D800..U+DFFF): not valid Unicode text",
                               param=key if key.isascii() and len(key) <= SHOWN_CHARS else None)
    return data


def _has_lone_surrogate(value: Any) -> bool:
    todo = [value]
    while todo:  # iterative: the parser's own depth limit already bounds the nesting
        v = todo.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            todo += v.keys()
            todo += v.values()
        elif isinstance(v, list):
            todo += v
    return False


async def _routing_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = (f"no route {request.method} {shown(request.url.path)}"
               if exc.status_code == 404 else str(exc.detail))
    return error_response(HttpError(exc.status_code, message))
