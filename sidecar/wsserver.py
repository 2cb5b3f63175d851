"""The client-facing WebSocket protocol: uvicorn's websockets-sansio protocol with a lean data path.

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

from collections.abc import Callable
from typing import Any, Final

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

from sidecar.wsframes import BINARY, TEXT, FrameSplitter, frame

BACKLOG: Final = 2  # messages queued for the app before reading pauses
DIRECT: Final = "sidecar.direct"  # the scope extension naming the protocol, for the direct path

#: Takes one received data message (str for text, bytes for binary) and returns True, or False to queue it.
Sink = Callable[[str | bytes], bool]


class RelayWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's `--ws websockets-sansio` protocol with the relay's data path (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._splitter: FrameSplitter | None = None
        self._clean = True  # no byte arrived between the request and the handshake's completion
        self.sink: Sink | None = None

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][DIRECT] = self

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
                before = self.handshake_initiated
                super().data_received(data)
                # Clean only if the request ended exactly at the end of its last chunk and nothing followed.
                if self.handshake_initiated and (before or not data.endswith(b"\r\n\r\n")):
                    self._clean = False
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
            await super().send(message)
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

    def connection_lost(self, exc: Exception | None) -> None:
        self.sink = None  # the app's callback holds its session: let it go with the connection
        super().connection_lost(exc)
