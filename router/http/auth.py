"""Bearer-token authentication for the HTTP API, before any route runs.

The same key and the same rule as the gRPC interceptor (router/auth.py): every request
must carry ``Authorization: Bearer <key>``, except the health routes, which stay open
for load balancers and probes that cannot send credentials and learn nothing from them.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from router.auth import bearer_token
from router.http.errors import error_response
from router.status import AuthError


class ApiKeyMiddleware:
    """``on_refused(scope)``: called for each request refused (the API counts refused
    generation calls in pdserve_requests_total, as the gRPC interceptor does: no route
    of theirs ever sees them)."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: frozenset[str],
                 on_refused: Callable[[Scope], None] | None = None) -> None:
        self.app = app
        self._key = api_key.encode()
        self.open_paths = open_paths
        self._on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization")
        token = bearer_token((("authorization", header),)) if header is not None else None
        # compare_digest: the time taken must not reveal how much of a guess was right.
        if token is not None and hmac.compare_digest(token.encode(), self._key):
            await self.app(scope, receive, send)
            return
        reason = "missing" if token is None else "invalid"
        if self._on_refused is not None:
            self._on_refused(scope)
        response = error_response(AuthError(f"{reason} API key: send the header "
                                            "'Authorization: Bearer <key>'"))
        await response(scope, receive, send)
