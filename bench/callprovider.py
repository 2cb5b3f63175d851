"""The benchmark's WebRTC-call provider, as its own process: `python -m bench.callprovider [--port 0]`.

What `make bench`'s calls rounds (issue 17) need of a provider, and no more, on one port (the sidecar derives
the create, hangup and sideband URLs from one `api_base`):

    POST .../realtime/calls              201, `Location: /v1/realtime/calls/rtc_<n>`, a fixed SDP answer
    POST .../realtime/calls/<id>/hangup  200 (404 for an unknown or ended call); the call's sidebands close 1000
    GET  .../realtime?call_id=<id>       the sideband (WebSocket upgrade): `session.created`, then the pushed
                                         events below; pings answered; a close answered and the socket closed
    GET  .../realtime?model=<m>          a /v1/realtime WebSocket session (the like-for-like baseline): the GA
                                         `session.created`, then the same pushed events; client events ignored
    POST /bench/schedule                 {"from": t0, "until": t1, "every_s": 0.1}: push on every sideband one
                                         server event per `every_s` while t0 <= time.monotonic() <= t1
    POST /bench/stats                    {"created", "hangups", "sidebands", "events", "events_in_window",
                                         "open_sidebands"}

The pushed events alternate between a `response.done` carrying usage (fake_provider.response_usage(), 600 bytes)
and a `conversation.item.input_audio_transcription.completed` carrying its usage (a duration), each with its own
ids: what a call's sideband carries that the sidecar bills. The credential is `Authorization: Bearer <key>` (or
`api-key`), as on bench/provider.py.

Why not sidecar.testing.fake_calls.FakeCallProvider: it is Starlette under uvicorn with every fault and a
record of every request, about 30 to 50 µs of CPU per event sent; at 1,000 calls and 10 events a second each it
would need most of the load side's one core (which the load generator shares). This one is HTTP/1.1 and the
server side of RFC 6455 written out on asyncio.Protocol (keep-alive; server frames unmasked, so an event is a
header and the payload; a client frame is read only for its opcode: ping, close): a few µs per event.
Prints its `ws://host:port` URL on stdout once listening; runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import struct
import time
from dataclasses import dataclass, field
from typing import Final, cast
from urllib.parse import parse_qs, urlsplit

import orjson

from bench.procs import provider_main, serve_until_signal
from sidecar.testing.fake_provider import DEFAULT_API_KEY, ga_session, response_usage

WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
ANSWER_SDP: Final = (
    b"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n"
    b"m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendrecv\r\na=rtpmap:111 opus/48000/2\r\n"
)
OP_TEXT: Final = 0x1
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
_USAGE: Final = orjson.dumps(response_usage())
_DONE_HEAD: Final = b'{"type":"response.done","event_id":"event_'
_DONE_MIDDLE: Final = b'","response":{"object":"realtime.response","id":"resp_'
_DONE_TAIL: Final = b'","status":"completed","status_details":null,"output":[],"usage":' + _USAGE + b"}}"
_TRANSCRIPT_HEAD: Final = b'{"type":"conversation.item.input_audio_transcription.completed","event_id":"event_'
_TRANSCRIPT_MIDDLE: Final = b'","item_id":"item_'
_TRANSCRIPT_TAIL: Final = b'","content_index":0,"transcript":"hello there","usage":{"type":"duration","seconds":1.0}}'
_ids = itertools.count(1)


def pushed_event(n: int) -> bytes:
    """The n-th pushed event's JSON: a `response.done` with usage for even n, a transcription `completed` for odd."""
    number = b"%d" % next(_ids)
    if n % 2 == 0:
        return b"".join((_DONE_HEAD, number, _DONE_MIDDLE, number, _DONE_TAIL))
    return b"".join((_TRANSCRIPT_HEAD, number, _TRANSCRIPT_MIDDLE, number, _TRANSCRIPT_TAIL))


def session_created(model: str) -> bytes:
    """The `session.created` a /v1/realtime WebSocket session opens with (the GA shape, as bench/provider.py's)."""
    session = ga_session(model, transcription=False)
    return orjson.dumps({"type": "session.created", "event_id": f"event_{next(_ids)}", "session": session})


def frame(opcode: int, payload: bytes) -> bytes:
    """A server WebSocket frame (FIN, unmasked)."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, size)
    elif size < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    return head + payload


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


def client_frames(buffer: bytearray) -> list[tuple[int, bytes]]:
    """The complete client frames at the front of `buffer` (consumed), each (opcode, unmasked payload)."""
    out: list[tuple[int, bytes]] = []
    while len(buffer) >= 2:
        opcode, size = buffer[0] & 0x0F, buffer[1] & 0x7F
        masked = buffer[1] & 0x80
        at = 2
        if size == 126:
            if len(buffer) < 4:
                break
            size, at = struct.unpack_from("!H", buffer, 2)[0], 4
        elif size == 127:
            if len(buffer) < 10:
                break
            size, at = struct.unpack_from("!Q", buffer, 2)[0], 10
        mask = bytes(buffer[at : at + 4]) if masked else b""
        at += 4 if masked else 0
        if len(buffer) < at + size:
            break
        payload = bytes(buffer[at : at + size])
        if masked:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        del buffer[: at + size]
        out.append((opcode, payload))
    return out


@dataclass
class Schedule:
    """When sidebands push events (monotonic seconds), and what was sent."""

    start: float = float("inf")
    until: float = float("-inf")
    every_s: float = 0.1
    events: int = 0
    events_in_window: int = 0


@dataclass
class Call:
    call_id: str
    sidebands: list[Connection] = field(default_factory=list)
    ended: bool = False


class Provider:
    """The calls, the schedule and the counters of one provider process."""

    def __init__(self, api_key: str) -> None:
        self.accepted = {f"Bearer {api_key}", api_key}
        self.calls: dict[str, Call] = {}
        self.schedule = Schedule()
        self.created = self.hangups = self.sidebands = 0
        self.open = 0  # sidebands (and pushed sessions) whose socket is open


class Connection(asyncio.Protocol):
    """One TCP connection: HTTP/1.1 requests (keep-alive) until it is upgraded to a sideband."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.call: Call | None = None  # set once upgraded to this call's sideband
        self.closed = False
        self.sent = 0
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.call is not None:
            self.provider.open -= 1
        if self.timer is not None:
            self.timer.cancel()
        if self.call is not None and self in self.call.sidebands:
            self.call.sidebands.remove(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.call is not None:
            self._frames()
            return
        while self.call is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buffer[:end].decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            length = int(headers.get("content-length", "0") or 0)
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            self._request(method, target, headers, body)
        if self.buffer:
            self._frames()

    # ---- HTTP ---------------------------------------------------------------------------------------

    def _respond(self, status: str, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()) -> None:
        assert self.transport is not None
        head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers)]
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)

    def _request(self, method: str, target: str, headers: dict[str, str], body: bytes) -> None:
        provider = self.provider
        parts = urlsplit(target)
        path = parts.path.rstrip("/")
        if path == "/bench/schedule":
            plan = orjson.loads(body)
            provider.schedule.start, provider.schedule.until = float(plan["from"]), float(plan["until"])
            provider.schedule.every_s = float(plan.get("every_s", 0.1))
            return self._respond("200 OK")
        if path == "/bench/stats":
            s = provider.schedule
            stats = {"created": provider.created, "hangups": provider.hangups, "sidebands": provider.sidebands}
            stats |= {"events": s.events, "events_in_window": s.events_in_window, "open_sidebands": provider.open}
            return self._respond("200 OK", orjson.dumps(stats), (("Content-Type", "application/json"),))
        if headers.get("authorization") not in provider.accepted and headers.get("api-key") not in provider.accepted:
            return self._respond("401 Unauthorized", b'{"error":{"code":"invalid_api_key"}}')
        if method == "POST" and path.endswith("/realtime/calls"):
            call = Call(f"rtc_{next(_ids)}")
            provider.calls[call.call_id] = call
            provider.created += 1
            location = ("Location", f"/v1/realtime/calls/{call.call_id}")
            return self._respond("201 Created", ANSWER_SDP, (location, ("Content-Type", "application/sdp")))
        if method == "POST" and path.endswith("/hangup"):
            call_id = path.rsplit("/", 2)[-2]
            found = provider.calls.pop(call_id, None)
            if found is None:
                return self._respond("404 Not Found")
            provider.hangups += 1
            found.ended = True
            for sideband in list(found.sidebands):
                sideband.close(1000)
            return self._respond("200 OK")
        if method == "GET" and headers.get("upgrade", "").lower() == "websocket":
            query = parse_qs(parts.query)
            if "call_id" not in query:  # a /v1/realtime WebSocket session: the same pushes, relayed to a client
                model = (query.get("model") or [""])[0]
                return self._upgrade(Call(f"sess_{next(_ids)}"), headers, opening=session_created(model))
            found = provider.calls.get(query["call_id"][0])
            if found is None or found.ended:
                return self._respond("404 Not Found")
            return self._upgrade(found, headers)
        return self._respond("404 Not Found")

    # ---- the sideband ---------------------------------------------------------------------------------

    def _upgrade(self, call: Call, headers: dict[str, str], *, opening: bytes | None = None) -> None:
        assert self.transport is not None
        accept = accept_key(headers.get("sec-websocket-key", ""))
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept.encode() + b"\r\n\r\n"
        )
        self.call = call
        call.sidebands.append(self)
        self.provider.sidebands += 1
        self.provider.open += 1
        if opening is None:
            created = {"type": "session.created", "event_id": f"event_{next(_ids)}", "session": {"id": call.call_id}}
            opening = orjson.dumps(created)
        self.transport.write(frame(OP_TEXT, opening))
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.provider.schedule.every_s, self._push)

    def _push(self) -> None:
        if self.closed or self.transport is None:
            return
        schedule = self.provider.schedule
        now = time.monotonic()
        if now <= schedule.until:
            if now >= schedule.start:
                self.transport.write(frame(OP_TEXT, pushed_event(self.sent)))
                self.sent += 1
                schedule.events += 1
                schedule.events_in_window += 1
            self.timer = asyncio.get_running_loop().call_later(schedule.every_s, self._push)
        elif schedule.until < schedule.start:  # no schedule yet: wait for one
            self.timer = asyncio.get_running_loop().call_later(schedule.every_s, self._push)

    def _frames(self) -> None:
        assert self.transport is not None
        for opcode, payload in client_frames(self.buffer):
            if opcode == OP_PING:
                self.transport.write(frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                self.close(int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1000)
                self.transport.close()

    def close(self, code: int) -> None:
        """Send a close frame (once); the peer's answer closes the socket."""
        if self.closed or self.transport is None:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        self.transport.write(frame(OP_CLOSE, code.to_bytes(2, "big")))


async def serve(*, host: str, port: int, api_key: str) -> None:
    """Listen until a stop signal, printing the URL first."""
    loop = asyncio.get_running_loop()
    provider = Provider(api_key)
    server = await loop.create_server(lambda: Connection(provider), host, port, backlog=4096)
    await serve_until_signal(server, host)


def main(argv: list[str] | None = None) -> None:
    """Run the provider (on uvloop, like the relays under test)."""
    provider_main(
        argv,
        prog="python -m bench.callprovider",
        description=__doc__.split("\n")[0],
        serve=serve,
        default_api_key=DEFAULT_API_KEY,
    )


if __name__ == "__main__":
    main()
