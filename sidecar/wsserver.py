"""The client-facing transport: uvicorn's protocols with a lean data path and hardened edges.

`GuardedHttpProtocol` (uvicorn's httptools protocol, which reads every request first) bounds what a client can
hold before it has a response: a connection past `max_connections` is answered 503 and closed at once, and one
whose request head (a WebSocket upgrade's included) has not fully arrived `handshake_timeout_s` after the
connection or after its first byte is closed (slowloris, or connections that never send).

`RelayWebSocketProtocol` (below) takes over a WebSocket upgrade. A malformed upgrade request (a non-ASCII byte
anywhere in its target or headers, a bad Sec-WebSocket-Key, -Version or -Protocol, a request websockets cannot
parse: a line over 8 KiB, over 128 headers) is answered 400 and closed; nothing of it is kept, and nothing
raised while handling it escapes (an exception out of the first `data_received` would leave the protocol in
uvicorn's connection set for good, and make the server's shutdown fail before the lifespan flushes billing).

The WebSocket protocol, in detail: uvicorn's websockets-sansio protocol with a lean data path.

uvicorn's protocol runs every received frame through websockets' generator parser and every sent message
through websockets' frame serializer, and pauses and resumes the socket's reading around each message
(two epoll changes per frame). Once the opening handshake is done, this subclass:

- splits received bytes with `sidecar.wsframes.FrameSplitter`: a final text or binary frame becomes the
  same `websocket.receive` message uvicorn would queue; every other frame (ping, pong, close, fragments,
  bad frames) and anything past the size limit goes to uvicorn's own handling, unchanged;
- writes `websocket.send` messages as one frame, straight to the transport;
- pauses reading only when the app has fallen two messages behind (uvicorn's `receive` resumes it);
- offers the app a direct path (`scope["extensions"]["sidecar.direct"]` is this protocol): a `sink` set by
  the app takes each data message in the read callback itself, while nothing is queued, and `write_now`
  writes a message at once while the transport is writable. The relay uses both to move a frame without an
  asyncio task switch (sidecar/relay.py); a sink that declines a message leaves it to the queue.

The handshake, closing, keepalive pings, errors and everything else stay uvicorn's. The fast path starts
only when no byte arrived between the client's request and the handshake's completion (RFC 6455 4.1: a
client waits for the response), so websockets' parser is at a frame boundary when it is bypassed.
Measured in docs/performance.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final, cast

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.utils import ClientDisconnected, get_client_addr
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request
from websockets.protocol import State

from sidecar.config import DEFAULT_HANDSHAKE_TIMEOUT_S, DEFAULT_MAX_CONNECTIONS
from sidecar.wsframes import BINARY, TEXT, FrameSplitter, frame

log = logging.getLogger("sidecar.wsserver")

BACKLOG: Final = 2  # messages queued for the app before reading pauses
DIRECT: Final = "sidecar.direct"  # the scope extension naming the protocol, for the direct path

#: Takes one received data message (str for text, bytes for binary) and returns True, or False to queue it.
Sink = Callable[[str | bytes], bool]


def _response(status: bytes, text: bytes) -> bytes:
    return b"".join(
        (
            b"HTTP/1.1 " + status + b"\r\n",
            b"Connection: close\r\nContent-Type: text/plain; charset=utf-8\r\n",
            b"Content-Length: %d\r\n\r\n" % len(text),
            text,
        )
    )


BAD_UPGRADE: Final = _response(b"400 Bad Request", b"Failed to open a WebSocket connection: malformed request.\n")
TOO_MANY: Final = _response(b"503 Service Unavailable", b"Too many connections.\n")


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a connection cap and a deadline per request head (module docstring).

    `limited` makes the subclass a server runs with; the class attributes are the defaults.
    """

    handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    _head_timer: asyncio.TimerHandle | None = None
    _refusing = False  # class-wide: log the first refusal of a run of them, not each one

    @classmethod
    def limited(cls, *, handshake_timeout_s: float, max_connections: int) -> type[GuardedHttpProtocol]:
        """This protocol with the given limits."""
        limits = {"handshake_timeout_s": handshake_timeout_s, "max_connections": max_connections}
        return cast(type[GuardedHttpProtocol], type(cls.__name__, (cls,), limits))

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        cls = type(self)
        if len(self.connections) > self.max_connections:  # this connection is already in the set
            if not cls._refusing:
                cls._refusing = True
                log.warning("connection cap reached (%d open): new connections get 503", self.max_connections)
            transport.write(TOO_MANY)
            transport.close()
            return
        cls._refusing = False
        self._head_timer = self.loop.call_later(self.handshake_timeout_s, self._head_timeout)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:  # the next request on a kept-alive connection
            self._head_timer = self.loop.call_later(self.handshake_timeout_s, self._head_timeout)

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()  # the request head is in; an upgrade goes to RelayWebSocketProtocol now
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        self.transport.close()


def _well_formed(request: Request) -> bool:
    """True when the request's target and header values are ASCII (websockets and uvicorn encode them so)."""
    return request.path.isascii() and all(value.isascii() for _, value in request.headers.raw_items())


access_log = logging.getLogger("sidecar.access")


def log_access(scope: Any, status: int, code: str) -> None:
    """`127.0.0.1:50000 - "WebSocket /v1/realtime" 401 invalid_api_key`: the path only, never the query."""
    access_log.info('%s - "WebSocket %s" %d %s', get_client_addr(scope), scope.get("path", ""), status, code)


def _error_code(body: bytes) -> str:
    """The `error.code` of an OpenAI-shaped error body, or "-"."""
    try:
        error = orjson.loads(body).get("error")
        code = error.get("code") if isinstance(error, dict) else None
    except (orjson.JSONDecodeError, AttributeError):
        return "-"
    return code if isinstance(code, str) and code else "-"


class RelayWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's `--ws websockets-sansio` protocol with the relay's data path (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._splitter: FrameSplitter | None = None
        self._clean = True  # no byte arrived between the request and the handshake's completion
        self.sink: Sink | None = None

    def handle_connect(self, event: Any) -> None:
        if not _well_formed(event):
            self.refuse_upgrade()
            return
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][DIRECT] = self

    def refuse_upgrade(self) -> None:
        """Answer 400 (unless a response went out already), close, and keep nothing of the request."""
        if not self.handshake_complete:
            self.transport.write(BAD_UPGRADE)
        self.handshake_initiated = self.handshake_complete = self.close_sent = True
        self.transport.close()

    def _before_fast_path(self, data: bytes) -> None:
        """uvicorn's own handling, before the fast path starts: the request, and anything that follows it."""
        before = self.handshake_initiated
        try:
            super().data_received(data)
        except Exception as exc:  # whatever a client sends, nothing escapes into uvicorn's HTTP protocol
            log.warning("malformed WebSocket upgrade refused (%s)", type(exc).__name__)
            self.refuse_upgrade()
            return
        if not self.handshake_initiated and self.conn.handshake_exc is not None:
            self.refuse_upgrade()  # websockets could not parse the request: a line over 8 KiB, over 128 headers
            return
        # Clean only if the request ended exactly at the end of its last chunk and nothing followed.
        if self.handshake_initiated and (before or not data.endswith(b"\r\n\r\n")):
            self._clean = False

    def shutdown(self) -> None:
        try:
            super().shutdown()
        except Exception as exc:  # one connection must not stop the server's shutdown (and the lifespan's flush)
            log.warning("WebSocket connection aborted at shutdown (%s)", type(exc).__name__)
            self.transport.abort()

    @property
    def writable_now(self) -> bool:
        """True when `write_now` may be used: the fast path is on and the transport is not paused."""
        return (
            self._splitter is not None
            and self.writable.is_set()
            and not self.close_sent
            and not self.disconnected
            and self.conn.state is State.OPEN
        )

    def write_now(self, message: str | bytes) -> None:
        """Write one data message as one frame (only while `writable_now`)."""
        if isinstance(message, str):
            self.transport.write(frame(message.encode(), text=True))
        else:
            self.transport.write(frame(message, text=False))

    def data_received(self, data: bytes) -> None:
        splitter = self._splitter
        if splitter is None:
            if self.handshake_complete and self._clean and not self.close_sent and self.conn.state is State.OPEN:
                splitter = self._splitter = FrameSplitter(masked=True, max_size=self.conn.max_size)
            else:
                self._before_fast_path(data)
                return
        queue = self.queue
        for kind, payload in splitter.feed(data):
            if kind not in (TEXT, BINARY) or self.conn.state is not State.OPEN:
                super().data_received(payload)
                continue
            if self.close_sent:  # past `websocket.close`: discarded, as uvicorn does
                continue
            message: str | bytes = payload
            if kind == TEXT:
                try:
                    message = payload.decode()
                except UnicodeDecodeError:
                    self.conn.fail(1007, "invalid UTF-8")
                    self.handle_parser_exception()
                    return
            sink = self.sink
            if sink is not None and queue.empty() and sink(message):
                continue
            if isinstance(message, str):
                queue.put_nowait({"type": "websocket.receive", "text": message})
            else:
                queue.put_nowait({"type": "websocket.receive", "bytes": message})
            if not self.read_paused and queue.qsize() >= BACKLOG:
                self.read_paused = True
                self.transport.pause_reading()

    async def send(self, message: Any) -> None:
        if (
            message["type"] != "websocket.send"
            or self._splitter is None
            or self.close_sent
            or self.conn.state is not State.OPEN
        ):
            await self._send_other(message)
            return
        if not self.writable.is_set():
            await self.writable.wait()
        if self.disconnected:
            raise ClientDisconnected()
        data = message.get("text")
        if data is None:
            data = message.get("bytes")
        if data is not None:
            self.write_now(data)

    async def _send_other(self, message: Any) -> None:
        """uvicorn's send, except for a refusal before the upgrade (`send_denial_response`): that is logged once
        at INFO as an access line with its status and error code, without the query string (which may carry a
        key), and counts as a completed handshake, so uvicorn does not also log an ERROR "ASGI callable
        returned without completing handshake" for it."""
        kind = message["type"]
        if kind == "websocket.http.response.start" and not self.handshake_complete and self.initial_response is None:
            if not 100 <= message["status"] < 600:
                raise RuntimeError(f"Invalid HTTP status code {message['status']!r} in response.")
            headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in message.get("headers", [])]
            self.initial_response = (message["status"], headers, b"")  # uvicorn's own state, without its log line
            return
        denial = self.initial_response
        await super().send(message)
        if kind == "websocket.http.response.body" and denial is not None and self.close_sent:
            self.handshake_complete = True  # the denial response is the handshake's answer
            status, body = denial[0], denial[2] + message.get("body", b"")
            log_access(self.scope, status, _error_code(body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.sink = None  # the app's callback holds its session: let it go with the connection
        super().connection_lost(exc)
