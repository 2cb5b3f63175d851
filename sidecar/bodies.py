"""A cap on HTTP request bodies, for every route (client secrets, the admin API, anything added later).

`BodyLimit` is ASGI middleware. A request that declares a `Content-Length` above the cap is answered 413
before a byte of its body is read; any other body (chunked, or lying about its length) is counted as the
route reads it, and the read that passes the cap raises `BodyTooLarge` instead of returning more. So at
most the cap plus one received chunk is ever held. Routes that answer their own refusals (client secrets,
admin) turn it into their 413; for the others the middleware answers it, unless a response was already
started. Every 413 closes the connection, so the rest of the body is never read.

WebSocket connections pass straight through: the relay's frames never see this module.
"""

from __future__ import annotations

from typing import Final

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sidecar.errors import Refusal

CLOSE_HEADER: Final = (b"connection", b"close")


class BodyTooLarge(Refusal):
    status = 413
    code = "request_too_large"
    error_type = "invalid_request_error"

    @classmethod
    def over(cls, limit: int) -> BodyTooLarge:
        """The refusal for a body above `limit` bytes."""
        return cls(f"The request body is larger than the limit of {limit} bytes.")


class BodyLimit:
    """ASGI middleware: HTTP request bodies above `max_bytes` get a 413 with an OpenAI error body."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if declared_length(scope) > self.max_bytes:
            await refuse(send, BodyTooLarge.over(self.max_bytes))
            return
        counted = CountedBody(receive, self.max_bytes)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if counted.exceeded:  # a route answered the refusal itself: drop the rest of the body too
                    message = {**message, "headers": [*message.get("headers", ()), CLOSE_HEADER]}
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge as exc:
            if started:
                raise
            await refuse(send, exc)


class CountedBody:
    """An ASGI `receive` that raises BodyTooLarge once the body read through it passes `max_bytes`."""

    def __init__(self, receive: Receive, max_bytes: int) -> None:
        self._receive = receive
        self._max_bytes = max_bytes
        self.received = 0
        self.exceeded = False

    async def __call__(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self._max_bytes:
                self.exceeded = True
                raise BodyTooLarge.over(self._max_bytes)
        return message


def declared_length(scope: Scope) -> int:
    """The request's Content-Length, 0 when absent (the HTTP server has already refused a malformed one)."""
    value = Headers(scope=scope).get("content-length", "")
    return int(value) if value.strip().isdigit() else 0


async def refuse(send: Send, refusal: BodyTooLarge) -> None:
    """Answer 413 and close the connection (the unread rest of the body is dropped with it)."""
    response = JSONResponse(refusal.body(), status_code=refusal.status)
    headers = [*response.raw_headers, CLOSE_HEADER]
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})
