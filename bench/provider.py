"""The benchmark's provider, as its own process: `python -m bench.provider [--port 0]`.

A realtime server that does only what the benchmark measures: it accepts a WebSocket upgrade on any path
that carries the provider key (`Authorization: Bearer` or `api-key`), announces `session.created`
(a GA transcription or realtime session, from the `intent` query), answers `session.update` and
`transcription_session.update` with the matching `.updated` event, and answers every
`input_audio_buffer.append` with a `conversation.item.input_audio_transcription.delta` whose `delta` is
the append's `event_id`. Nothing is recorded, so memory stays flat however long it runs.

The protocol rules and faults live in `sidecar.testing.fake_provider`, which the test suite drives; this
one is built on picows (WebSocket framing in C, one callback per frame, no task per connection) so that
the load side of a benchmark, which shares one core with the load generator, costs as little as the
machine allows: the `direct` target measures exactly this process and the load generator, and it is the
floor every relay is read against. Prints its `ws://host:port` URL on stdout once listening; runs until
SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

from bench.procs import quiet_gc, raise_fd_limit
from sidecar.testing.fake_provider import DEFAULT_API_KEY, ga_session

APPEND: Final = "input_audio_buffer.append"
DELTA_HEAD: Final = b'{"type":"conversation.item.input_audio_transcription.delta","event_id":"event_'
_ids = itertools.count(1)


def created_event(*, model: str, transcription: bool) -> bytes:
    """The `session.created` a connection opens with (the GA shape, PCM16 at 24 kHz)."""
    session = ga_session(model, transcription=transcription)
    return orjson.dumps({"type": "session.created", "event_id": f"event_{next(_ids)}", "session": session})


def reply_to(payload: bytes, session: dict[str, Any]) -> bytes | None:
    """The reply to one client event (None: no reply). Appends are answered without decoding the audio."""
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        event = None
    if not isinstance(event, dict):
        return orjson.dumps({"type": "error", "error": {"type": "invalid_request_error", "code": "invalid_json"}})
    kind = event.get("type")
    if kind == APPEND:
        event_id = orjson.dumps(str(event.get("event_id", "")))
        return b"".join(
            (DELTA_HEAD, b"%d" % next(_ids), b'","item_id":"item_1","content_index":0,"delta":', event_id, b"}")
        )
    if kind in ("session.update", "transcription_session.update"):
        update = event.get("session")
        if isinstance(update, dict):
            session.update(update)
        updated = kind.replace(".update", ".updated")
        return orjson.dumps({"type": updated, "event_id": f"event_{next(_ids)}", "session": session})
    return None


class Connection(WSListener):
    """One upgraded connection: the opening event, then a reply per client event."""

    def __init__(self, model: str, transcription: bool) -> None:
        self.model = model
        self.transcription = transcription
        self.session: dict[str, Any] = {"model": model}

    def on_ws_connected(self, transport: WSTransport) -> None:
        transport.send(WSMsgType.TEXT, created_event(model=self.model, transcription=self.transcription))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.TEXT:
            reply = reply_to(frame.get_payload_as_bytes(), self.session)
            if reply is not None:
                transport.send(WSMsgType.TEXT, reply)
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
        query = parse_qs(urlsplit(request.path.decode()).query)
        model = (query.get("model") or query.get("deployment") or [""])[0]
        return Connection(model, transcription=query.get("intent", [""])[0] == "transcription")

    return factory


async def serve(*, host: str, port: int, api_key: str) -> None:
    """Listen until a stop signal, printing the URL first."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server = await ws_create_server(listener_for(api_key), host, port, backlog=4096, max_frame_size=2**24)
    bound_port = server.sockets[0].getsockname()[1]
    print(f"ws://{host}:{bound_port}", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark provider (on uvloop, like the relays under test)."""
    parser = argparse.ArgumentParser(prog="python -m bench.provider", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    args = parser.parse_args(argv)
    raise_fd_limit()
    quiet_gc()
    import uvloop

    uvloop.run(serve(host=args.host, port=args.port, api_key=args.api_key))


if __name__ == "__main__":
    main()
