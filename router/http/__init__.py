"""The OpenAI-compatible HTTP API, beside the gRPC API and over the same router.

    server.py     uvicorn on the service's event loop (HttpServer)
    app.py        the Starlette routes: completions, chat, models, health
    auth.py       the API key (Authorization: Bearer), as on gRPC
    requests.py   OpenAI request bodies -> prompt tokens and SamplingParams per choice
    fields.py     typed reads of JSON fields, errors naming the field
    choices.py    one router stream per choice, merged; closing aborts them
    responses.py  OpenAI response bodies and stream chunks
    logprobs.py   OpenAI's two logprobs formats
    sse.py        server-sent event framing; noticing a client that went away
    errors.py     status_for's codes -> HTTP statuses, the OpenAI error body
"""

from router.http.server import HttpServer

__all__ = ["HttpServer"]
