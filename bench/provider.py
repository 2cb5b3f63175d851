"""The benchmark's provider, as its own process: `python -m bench.provider [--port 0]`.

A server for the three WebSocket voice APIs that does only what the benchmark measures. It accepts a
WebSocket upgrade on any path that carries the provider key (`Authorization: Bearer` or `api-key`) and
speaks the protocol its path names (the same paths, OpenAI's and Azure's, the sidecar connects to):

    /v1/realtime?model=&intent=       `session.created` (a GA transcription or realtime session, from
                                      `intent`); `session.update` / `transcription_session.update` ->
                                      the matching `.updated`; `input_audio_buffer.append` ->
                                      `conversation.item.input_audio_transcription.delta`
    .../live/sessions (GPT-Live)      nothing until the client's `session.start` -> `session.started`;
                                      `session.update` -> `session.updated`; `session.input_audio.append`
                                      -> `session.input_transcript.delta`; `session.close` ->
                                      `session.closed`, then close 1000
    .../realtime/translations?model=  `session.created` (a translation session); `session.update` ->
                                      `session.updated`; `session.input_audio_buffer.append` ->
                                      `session.output_transcript.delta`; `session.close` ->
                                      `session.closed`, then close 1000

Every append is answered by one delta whose `delta` is the append's `event_id`, whatever the protocol: the
same load shape on every route (one reply frame of about the same size per 100 ms chunk), so the load
generator matches replies the same way and the relay's cost per frame is comparable across surfaces.
Nothing is recorded, so memory stays flat however long it runs.

The protocol rules and faults live in `sidecar.testing.fake_provider` (and its `fake_live` and
`fake_translation`), which the test suite drives; this one is built on picows (WebSocket framing in C,
one callback per frame, no task per connection) so that the load side of a benchmark, which shares one
core with the load generator, costs as little as the machine allows: the `direct` target measures exactly
this process and the load generator, and it is the floor every relay is read against. Prints its
`ws://host:port` URL on stdout once listening; runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

from bench.procs import provider_main, serve_until_signal
from sidecar.testing.fake_provider import DEFAULT_API_KEY, ga_session
from sidecar.testing.fake_translation import translation_session

REALTIME: Final = "realtime"
LIVE: Final = "live"
TRANSLATION: Final = "translation"

APPEND: Final = "input_audio_buffer.append"
LIVE_APPEND: Final = "session.input_audio.append"
TRANSLATION_APPEND: Final = "session.input_audio_buffer.append"
CLOSE: Final = "session.close"
LIVE_START: Final = "session.start"
# Each protocol's answer to an append, written around its event id and the append's event_id (no encoding).
DELTA_HEAD: Final = b'{"type":"conversation.item.input_audio_transcription.delta","event_id":"event_'
_DELTA_MIDDLE: Final = b'","item_id":"item_1","content_index":0,"delta":'
LIVE_DELTA_HEAD: Final = b'{"type":"session.input_transcript.delta","event_id":"event_'
_LIVE_DELTA_MIDDLE: Final = b'","start_ms":0,"end_ms":0,"delta":'
TRANSLATION_DELTA_HEAD: Final = b'{"type":"session.output_transcript.delta","event_id":"event_'
_TRANSLATION_DELTA_MIDDLE: Final = b'","elapsed_ms":0,"delta":'
CLOSED_HEAD: Final = b'{"type":"session.closed"'
_APPENDS: Final = {
    REALTIME: (APPEND, DELTA_HEAD, _DELTA_MIDDLE),
    LIVE: (LIVE_APPEND, LIVE_DELTA_HEAD, _LIVE_DELTA_MIDDLE),
    TRANSLATION: (TRANSLATION_APPEND, TRANSLATION_DELTA_HEAD, _TRANSLATION_DELTA_MIDDLE),
}
_UPDATES: Final = {
    REALTIME: ("session.update", "transcription_session.update"),
    LIVE: ("session.update",),
    TRANSLATION: ("session.update",),
}
_ids = itertools.count(1)


def surface_of(path: str) -> str:
    """The protocol a request path names: GPT-Live, translation, or (anything else) /v1/realtime."""
    route = urlsplit(path).path
    if route.endswith("/live/sessions"):
        return LIVE
    if route.endswith("/realtime/translations"):
        return TRANSLATION
    return REALTIME


def created_event(*, model: str, transcription: bool) -> bytes:
    """The `session.created` a /v1/realtime connection opens with (the GA shape, PCM16 at 24 kHz)."""
    session = ga_session(model, transcription=transcription)
    return orjson.dumps({"type": "session.created", "event_id": f"event_{next(_ids)}", "session": session})


def translation_created_event(*, model: str) -> bytes:
    """The `session.created` a translation connection opens with (RealtimeTranslationSession)."""
    session = translation_session(model, now=time.time())
    return orjson.dumps({"type": "session.created", "event_id": f"event_{next(_ids)}", "session": session})


def opening(surface: str, *, model: str, transcription: bool) -> bytes | None:
    """The server's first event on `surface` (None for GPT-Live, which waits for `session.start`)."""
    if surface == LIVE:
        return None
    if surface == TRANSLATION:
        return translation_created_event(model=model)
    return created_event(model=model, transcription=transcription)


def reply_to(payload: bytes, session: dict[str, Any], *, surface: str = REALTIME) -> bytes | None:
    """The reply to one client event on `surface` (None: no reply). Appends are answered without decoding
    the audio; a reply starting with CLOSED_HEAD is the last (the connection then closes with 1000)."""
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        event = None
    if not isinstance(event, dict):
        return orjson.dumps({"type": "error", "error": {"type": "invalid_request_error", "code": "invalid_json"}})
    kind = event.get("type")
    append, head, middle = _APPENDS[surface]
    if kind == append:
        event_id = orjson.dumps(str(event.get("event_id", "")))
        return b"".join((head, b"%d" % next(_ids), middle, event_id, b"}"))
    if kind in _UPDATES[surface]:
        update = event.get("session")
        if isinstance(update, dict):
            session.update(update)
        updated = kind.replace(".update", ".updated")
        return orjson.dumps({"type": updated, "event_id": f"event_{next(_ids)}", "session": _shown(session)})
    if surface == LIVE and kind == LIVE_START:
        return _started(event, session)
    if surface != REALTIME and kind == CLOSE:
        return _closed(surface, session)
    return None


def _closed(surface: str, session: dict[str, Any]) -> bytes:
    """`session.closed`: GPT-Live's (SessionClosedEvent) carries the reason, session and usage (in seconds
    since `session.started`; nothing is billed from it here), translation's (its own) only the type."""
    closed: dict[str, Any] = {"type": "session.closed", "event_id": f"event_{next(_ids)}"}
    if surface == LIVE:
        seconds = max(0, int(time.monotonic() - session.get("_started", time.monotonic())))
        closed |= {"reason": "close_requested", "session": _shown(session), "usage": {"seconds": seconds}}
    return orjson.dumps(closed)


def _shown(session: dict[str, Any]) -> dict[str, Any]:
    """The session as sent: without the provider's own `_` keys."""
    return {k: v for k, v in session.items() if not k.startswith("_")}


def _started(event: dict[str, Any], session: dict[str, Any]) -> bytes:
    """GPT-Live's `session.started` (SessionStartedEvent): the client's startup session, with an id."""
    start = event.get("session")
    session.update(start if isinstance(start, dict) else {})
    session.update(id=f"sess_{next(_ids)}", object="live.session", status="active")
    session["expires_at"] = int(time.time()) + 3600
    ref = event.get("event_id")
    started = {"type": "session.started", "event_id": f"event_{next(_ids)}", "session": dict(session)}
    session["_started"] = time.monotonic()  # kept out of what is sent
    return orjson.dumps(started | {"client_event_id": ref} if isinstance(ref, str) else started)


class Connection(WSListener):
    """One upgraded connection: the opening event (if its protocol has one), then a reply per client event."""

    def __init__(self, model: str, transcription: bool, surface: str = REALTIME) -> None:
        self.model = model
        self.transcription = transcription
        self.surface = surface
        self.session: dict[str, Any] = {"model": model}

    def on_ws_connected(self, transport: WSTransport) -> None:
        first = opening(self.surface, model=self.model, transcription=self.transcription)
        if first is not None:
            transport.send(WSMsgType.TEXT, first)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.TEXT:
            reply = reply_to(frame.get_payload_as_bytes(), self.session, surface=self.surface)
            if reply is not None:
                transport.send(WSMsgType.TEXT, reply)
                if reply.startswith(CLOSED_HEAD):
                    transport.send_close(WSCloseCode.OK)
                    transport.disconnect()
        elif kind is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()


def listener_for(api_key: str) -> Any:
    """The picows listener factory: a Connection for a request with the key, None (404) otherwise."""
    accepted = {f"Bearer {api_key}", api_key}

    def factory(request: WSUpgradeRequest) -> Connection | None:
        headers = request.headers
        if headers.get("Authorization") not in accepted and headers.get("api-key") not in accepted:
            return None
        path = request.path.decode()
        query = parse_qs(urlsplit(path).query)
        model = (query.get("model") or query.get("deployment") or [""])[0]
        transcription = query.get("intent", [""])[0] == "transcription"
        return Connection(model, transcription=transcription, surface=surface_of(path))

    return factory


async def serve(*, host: str, port: int, api_key: str) -> None:
    """Listen until a stop signal, printing the URL first."""
    server = await ws_create_server(listener_for(api_key), host, port, backlog=4096, max_frame_size=2**24)
    await serve_until_signal(server, host)


def main(argv: list[str] | None = None) -> None:
    """Run the provider (on uvloop, like the relays under test)."""
    provider_main(
        argv,
        prog="python -m bench.provider",
        description=__doc__.split("\n")[0],
        serve=serve,
        default_api_key=DEFAULT_API_KEY,
    )


if __name__ == "__main__":
    main()
