"""ASGI middleware: a body size limit and the API key. Both answer in OpenAI's error shape."""

from __future__ import annotations

import hmac
import json

from .errors import ApiError, error_body

OPEN_PATHS = ("/", "/health")  # the web page and the liveness probe need no key
OPEN_PREFIXES = ("/static/",)


async def send_error(send, status: int, message: str, headers: dict | None = None, close: bool = False) -> None:
    body = json.dumps(error_body(status, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """413 for a body over `limit` bytes: at once from Content-Length, or while a chunked body arrives."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await send_error(send, 413, f"the body is {int(length)} bytes; the limit is {self.limit}",
                                    close=True)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise ApiError(413, f"the body is over the limit of {self.limit} bytes",
                               headers={"Connection": "close"})
            return message

        await self.app(scope, limited, send)


class ApiKey:
    """Bearer authentication on every route but the page and /health."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in OPEN_PATHS \
                or scope["path"].startswith(OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            return await send_error(send, 401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                    headers={"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)


class CountRequests:
    """fuselm_requests{route, status}; unknown paths count as route="other" (bounded label values)."""

    def __init__(self, app, counter, routes: set[str]):
        self.app, self.counter, self.routes = app, counter, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = [500]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.counter.labels(route, str(status[0])).inc()
