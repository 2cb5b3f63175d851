"""A lean upstream WebSocket client for the relay: websockets' sans-I/O ClientProtocol on an asyncio Protocol.

websockets' own asyncio client costs, per frame, a lock, an async context manager and several futures, and
keeps the handshake's request and response and a keepalive task per connection. The relay needs less:

- once the handshake response is parsed, data frames are split and built by `sidecar.wsframes` (websockets'
  protocol still handles every other frame, the closing handshake and errors);
- `send` writes one frame straight to the transport (no await unless the transport is paused: back-pressure);
- received messages wait in a deque; beyond `max_queue` the transport stops reading (TCP back-pressure);
- `recv` awaits only when the deque is empty;
- keepalive pings ride on one `call_later` timer per connection; a missing pong aborts the connection;
- a direct path for the relay: a `sink` takes each data message in the read callback while the deque is
  empty (declining leaves it to the deque and `recv`), and `write_now` writes while the transport is writable.

It raises websockets' own `ConnectionClosedOK` / `ConnectionClosedError` (with `rcvd` set only when the peer
sent a close frame), so the relay treats both clients alike. Measured in docs/performance.md.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import ssl
from collections.abc import Callable
from typing import Final, cast

from websockets.client import ClientProtocol
from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    InvalidStatus,
    WebSocketException,
)
from websockets.frames import OP_BINARY, OP_CLOSE, OP_CONT, OP_PONG, OP_TEXT, Frame
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from sidecar.errors import UpstreamError
from sidecar.tuning import PooledSecrets
from sidecar.wsframes import BINARY, TEXT, FrameSplitter, frame

CLOSE_TIMEOUT_S: Final = 5.0
MAX_HEAD_BYTES: Final = 65536  # a handshake response longer than this is left to websockets (which refuses it)
_MASKS: Final = PooledSecrets()  # client frame masks: os.urandom bytes, pooled (see sidecar.tuning)
OK_CODES: Final = frozenset({1000, 1001})
#: websockets logs every handshake header at DEBUG, the upstream credential (api-key, Bearer key or ek_
#: secret) included: the client protocol logs to a logger of ours that never debugs.
_WIRE_LOG: Final = logging.getLogger("sidecar.upstream.wire")
_WIRE_LOG.setLevel(logging.INFO)


class UpstreamConnection(asyncio.Protocol):
    """One open upstream WebSocket. Use `open_upstream` to make one."""

    def __init__(self, protocol: ClientProtocol, *, max_queue: int, ping_interval_s: float | None) -> None:
        self.protocol = protocol
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._messages: collections.deque[str | bytes] = collections.deque()
        self._max_queue = max_queue
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._fragments: list[bytes] = []
        self._fragment_text = False
        self.handshake: asyncio.Future[Response] = self._loop.create_future()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._ping_interval_s = ping_interval_s
        self._ping_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._awaiting_pong = False
        #: Credentials minted to open this connection (an Azure client secret), set by the dialer; never logged.
        self.secrets: tuple[str, ...] = ()
        self._head = b""  # the handshake response, until it is complete
        self._splitter: FrameSplitter | None = None  # the data path, once the handshake succeeded
        self._parser_only = False  # no data path: everything goes to websockets
        #: Takes a received message in the read callback (True), or declines it (False: it waits for `recv`).
        self.sink: Callable[[str | bytes], bool] | None = None

    # ---- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        splitter = self._splitter
        if splitter is not None:
            for kind, payload in splitter.feed(data):
                if kind in (TEXT, BINARY) and self.protocol.state is State.OPEN:
                    self._deliver(payload, text=kind == TEXT)
                else:
                    self._receive(payload)
            return
        if self._parser_only:  # a refused or failed handshake: websockets has the rest (a body, say)
            self._receive(data)
            return
        head = self._head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > MAX_HEAD_BYTES:
                self._head, self._parser_only = b"", True
                self._receive(head)
            else:
                self._head = head
            return
        # Exactly the response to websockets (its parser then waits at a frame boundary), the rest split here.
        self._head = b""
        self._receive(head[: end + 4])
        if self.handshake.done() and self.protocol.state is State.OPEN:
            self._splitter = FrameSplitter(masked=False, max_size=self.protocol.max_size)
        else:
            self._parser_only = True
        if len(head) > end + 4:
            self.data_received(head[end + 4 :])

    def _receive(self, data: bytes) -> None:
        """Bytes for websockets' protocol: the handshake, control frames, fragments, errors."""
        protocol = self.protocol
        protocol.receive_data(data)
        self._flush()
        for event in protocol.events_received():
            if isinstance(event, Frame):
                self._on_frame(event)
            elif not self.handshake.done():
                self._on_response(event)
        if protocol.close_expected() and self.transport is not None and self._close_timer is None:
            self._close_timer = self._loop.call_later(CLOSE_TIMEOUT_S, self._abort)

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        # Timers hold this object: cancel them so nothing of the session outlives its connection.
        for timer in (self._ping_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._ping_timer = self._close_timer = None
        self.sink = None
        if not self.handshake.done():
            self.handshake.set_exception(UpstreamError("upstream closed the connection during the handshake"))
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # ---- events -------------------------------------------------------------------------------

    def _on_response(self, response: object) -> None:
        error = self.protocol.handshake_exc
        if error is None and isinstance(response, Response):
            self.handshake.set_result(response)
            self._schedule_ping()
            return
        if isinstance(error, InvalidStatus):
            status = error.response.status_code
            failure = UpstreamError(f"upstream refused the handshake with HTTP {status}", status=status)
        else:
            failure = UpstreamError(f"upstream handshake failed ({type(error).__name__})")
        self.handshake.set_exception(failure)

    def _on_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        payload = bytes(frame.data)  # already bytes when websockets parsed it (no copy then)
        if opcode is OP_TEXT or opcode is OP_BINARY:
            if frame.fin:
                self._deliver(payload, text=opcode is OP_TEXT)
            else:
                self._fragments, self._fragment_text = [payload], opcode is OP_TEXT
        elif opcode is OP_CONT:
            self._fragments.append(payload)
            if frame.fin:
                data, self._fragments = b"".join(self._fragments), []
                self._deliver(data, text=self._fragment_text)
        elif opcode is OP_PONG:
            self._awaiting_pong = False
        elif opcode is OP_CLOSE:
            self._wake()

    def _deliver(self, data: bytes, *, text: bool) -> None:
        if text:
            try:
                message: str | bytes = data.decode()
            except UnicodeDecodeError:
                self.protocol.fail(1007, "invalid UTF-8")
                self._flush()
                return
        else:
            message = data
        sink = self.sink
        if sink is not None and not self._messages and sink(message):
            return
        self._messages.append(message)
        if len(self._messages) >= self._max_queue and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _flush(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for chunk in self.protocol.data_to_send():
            if chunk:
                transport.write(chunk)
            elif transport.can_write_eof():
                transport.write_eof()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # ---- keepalive ----------------------------------------------------------------------------

    def _schedule_ping(self) -> None:
        if self._ping_interval_s is not None:
            self._ping_timer = self._loop.call_later(self._ping_interval_s, self._ping)

    def _ping(self) -> None:
        if self.protocol.state is not State.OPEN:
            return
        if self._awaiting_pong:  # no pong for a whole interval: the peer is gone
            self._abort()
            return
        self._awaiting_pong = True
        self.protocol.send_ping(os.urandom(4))
        self._flush()
        self._schedule_ping()

    # ---- the API the relay uses ----------------------------------------------------------------

    def _closed_error(self) -> ConnectionClosed:
        rcvd, sent = self.protocol.close_rcvd, self.protocol.close_sent
        if rcvd is not None and sent is not None and rcvd.code in OK_CODES and sent.code in OK_CODES:
            return ConnectionClosedOK(rcvd, sent, self.protocol.close_rcvd_then_sent)
        return ConnectionClosedError(rcvd, sent, self.protocol.close_rcvd_then_sent)

    async def recv(self) -> str | bytes:
        """The next message. Raises ConnectionClosed once the connection is over and drained."""
        while not self._messages:
            if self.protocol.state is State.CLOSED or self.closed.done() or self.protocol.close_rcvd is not None:
                raise self._closed_error()
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        message = self._messages.popleft()
        if self._reading_paused and len(self._messages) < self._max_queue // 2 and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return message

    @property
    def writable_now(self) -> bool:
        """True when `write_now` may be used: open, and the transport is not paused."""
        return (
            self._writable is None
            and self.transport is not None
            and self.protocol.state is State.OPEN
            and not self.closed.done()
        )

    def write_now(self, message: str | bytes) -> None:
        """Write one message at once (only while `writable_now`)."""
        transport: asyncio.Transport = self.transport  # type: ignore[assignment]  # writable_now: not None
        if isinstance(message, str):
            transport.write(frame(message.encode(), text=True, mask=_MASKS.token_bytes(4)))
        else:
            transport.write(frame(message, text=False, mask=_MASKS.token_bytes(4)))

    async def send(self, message: str | bytes) -> None:
        """Send one message (a text frame for str). Waits only while the transport is paused."""
        if self.protocol.state is not State.OPEN or self.transport is None or self.closed.done():
            raise self._closed_error()
        self.write_now(message)
        if self._writable is not None:
            await self._writable

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """The closing handshake (bounded by CLOSE_TIMEOUT_S), then the TCP connection."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason)
            self._flush()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await asyncio.shield(self.closed)
        except TimeoutError:
            self._abort()
        if self.transport is not None:
            self.transport.close()


def _ssl_context(secure: bool) -> ssl.SSLContext | None:
    return ssl.create_default_context() if secure else None


async def open_upstream(
    url: str,
    headers: tuple[tuple[str, str], ...],
    *,
    max_frame_bytes: int,
    open_timeout_s: float,
    max_queue: int = 16,
    ping_interval_s: float | None = 20.0,
) -> UpstreamConnection:
    """Connect and complete the opening handshake. Raises UpstreamError (never with a secret in it)."""
    try:
        uri = parse_uri(url)
    except WebSocketException as exc:
        raise UpstreamError("upstream URL is not a WebSocket URL") from exc
    protocol = ClientProtocol(uri, max_size=max_frame_bytes, logger=_WIRE_LOG)
    loop = asyncio.get_running_loop()
    connection: UpstreamConnection | None = None
    try:
        async with asyncio.timeout(open_timeout_s):
            _transport, connection = await loop.create_connection(
                lambda: UpstreamConnection(protocol, max_queue=max_queue, ping_interval_s=ping_interval_s),
                uri.host,
                uri.port,
                ssl=_ssl_context(uri.secure),
                server_hostname=uri.host if uri.secure else None,
            )
            request = protocol.connect()
            for name, value in headers:
                request.headers[name] = value
            request.headers["User-Agent"] = "realtime-sidecar"
            protocol.send_request(request)
            connection._flush()
            await connection.handshake
    except TimeoutError as exc:
        if connection is not None:
            connection._abort()
        raise UpstreamError("upstream connect timed out") from exc
    except UpstreamError:
        if connection is not None:
            connection._abort()
        raise
    except OSError as exc:  # the host stays out of the message: it is an upstream identifier
        raise UpstreamError(f"upstream unreachable ({type(exc).__name__})") from exc
    return connection
