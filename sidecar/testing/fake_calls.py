"""A fake provider's WebRTC side: SDP create, sideband WebSockets and hangup, for OpenAI and Azure paths.

`FakeCallProvider` runs a real HTTP + WebSocket server (Starlette under uvicorn, in the test's loop) on
127.0.0.1, port 0 by default:

    Realtime API                          OpenAI (Authorization: Bearer <key>)  Azure (api-key: <key>)
    create    POST                        /v1/realtime/calls                    /openai/v1/realtime/calls
    sideband  WebSocket                   /v1/realtime?call_id=<id>             /openai/v1/realtime?call_id=<id>
    hangup    POST                        /v1/realtime/calls/<id>/hangup        /openai/v1/realtime/calls/<id>/hangup
    GPT-Live
    create    POST (JSON)                 /v1/live/sessions                     /openai/v1/live/sessions
    sideband  WebSocket                   /v1/live/sessions/<id>/attach         /openai/v1/live/sessions/<id>/attach
    hangup    POST                        /v1/live/sessions/<id>/hangup         /openai/v1/live/sessions/<id>/hangup

A realtime create takes `application/sdp` (model in `?model=`) or multipart `sdp` + `session` (the SDK's
`client.realtime.calls.create`) and answers 201 with the SDP answer and `Location: <prefix>/realtime/calls/<id>`
(ids `rtc_...`); a GPT-Live create (`client.live.create`) answers 200 with `{"session": {"id"}, "transport":
{"type": "webrtc", "sdp"}}` (ids `sess_...`). Refusals are OpenAI-shaped JSON (`{"error": {"message", "type",
"code", "param"}}`): 401 `invalid_api_key`, 400 for a missing or unusable SDP or session (fake_call_protocol.py,
fake_sdp.py), 404 for an unknown path, an unknown or ended call (sidebands are refused before the upgrade),
and the injected faults below. A hangup of an ended call is 404, not counted.

A sideband gets `session.created` (GPT-Live: `session.started`) on attach, then every event of its call; the
client events it sends are answered per fake_call_protocol.py (replies to every sideband of the call and the
data channel; errors to the sender only). A hangup, a GPT-Live `session.close`, or `await call.end(reason)` (the
provider's side: the browser left, the call expired) ends the call: a GPT-Live call's sidebands first get
`session.closed` with the last usage reported, then every sideband closes with 1000 and `call.ended` is set
(`call.hung_up` too, for a hangup).

Test handles: `await fake.wait_for_call(index)` -> FakeCall (`call_id`, `route`, `model`, `session`, `offer_sdp`,
`auth`, `hung_up`, `ended`, `wait_for_sideband(n)`, `emit` and its helpers, `drop_sidebands`, `close_sidebands`,
`end`), `fake.calls`, `fake.hangups`, `fake.offer_attempts`, and `fake.requests`: every HTTP request and WebSocket
handshake as received, before any check (to prove what a sidecar sent, or did not send, to the provider).

Faults (attributes of the provider, read on each request or event, settable any time):
    refuse_offer_status     refuse every create with this status (5xx: `server_error`, 429: `rate_limit_exceeded`)
    refuse_sideband_status  refuse every sideband upgrade of a known call with this status (counted in
                            `call.attach_attempts`)
    drop_sideband_after     abort a sideband's TCP connection (no close frame) right after it has been sent this
                            many server events; its opening `session.created`/`session.started` counts
    hangup_status           answer every hangup with this status; the call goes on

The media peer (`answerer=`, e.g. HD's aiortc peer, `async (offer_sdp, call) -> answer_sdp`) answers instead
of `fake_sdp.answer_sdp`. It may set `call.data_channel` (an `async (event) -> None`): every event of the call
(`call.emit`, replies to client events) then goes to it too; it hands the client events its data channel
receives to `await call.client_event(text)`; and it emits its own events with `await call.emit(event)`.
An answerer that raises gets the create a 500 (`server_error`), and no call is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import parse_qsl

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request as WsRequest

from sidecar.catalog import LIVE_ENDPOINT, REALTIME_ENDPOINT
from sidecar.catalog import Route as SessionRoute
from sidecar.testing.fake_call_protocol import (
    DEFAULT_TRANSCRIPT,
    BadRequest,
    CallProtocol,
    CallReply,
    CreateRequest,
    LiveCallProtocol,
    RealtimeCallProtocol,
    error_body,
    parse_live_create,
    parse_realtime_create,
)
from sidecar.testing.fake_provider import response_usage
from sidecar.testing.fake_sdp import AnswerIdentity, SdpError, answer_sdp, check_offer
from sidecar.testing.fake_wire import Event, new_id

DEFAULT_API_KEY: Final = "sk-fake-provider-key"
DEFAULT_HOST: Final = "127.0.0.1"
_PROTOCOL: Final = "fake_calls.protocol"  # the scope extension carrying uvicorn's protocol (aborts, close codes)
#: The `session.closed` reason a GPT-Live call's sidebands get when it ends (types/live/session_closed_event.py).
_LIVE_REASONS: Final = frozenset({"close_requested", "expired", "content", "remote_hangup", "connection_lost"})
_LIVE_CLOSE_REASONS: Final = {"hangup": "close_requested", "provider_shutdown": "connection_lost"}

#: `async (offer_sdp, call) -> answer_sdp`: a real media peer answering the offer.
Answerer = Callable[[str, "FakeCall"], Awaitable[str]]
#: `async (event) -> None`: the media peer's data channel, fed every event of its call.
DataChannel = Callable[[Event], Awaitable[None]]


class _AbortableProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol, handing the app its TCP transport (to abort it: a dropped
    connection, no close frame)."""

    def handle_connect(self, event: WsRequest) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][_PROTOCOL] = {"protocol": self}

    async def send(self, message: Any) -> None:
        await super().send(message)
        # A denial response ends the exchange: without this uvicorn logs "ASGI callable returned without
        # completing handshake" for every refused sideband (it only counts an accepted upgrade as complete).
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            self.handshake_complete = True


@dataclass(frozen=True)
class FakeRequest:
    """One HTTP request or WebSocket handshake as received, recorded before any check."""

    #: `POST`, or `WEBSOCKET` for a handshake.
    method: str
    path: str
    #: Query parameters (the last value of a repeated one).
    query: dict[str, str]
    #: Headers, names lower-cased.
    headers: dict[str, str]

    @classmethod
    def of(cls, scope: Scope) -> FakeRequest:
        raw: bytes = scope.get("query_string", b"")
        return cls(
            method=scope.get("method", "WEBSOCKET"),
            path=scope["path"],
            query=dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True)),
            headers={name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]},
        )


class _Recorder:
    """ASGI middleware keeping every request and handshake in `requests` (FakeCallProvider.requests)."""

    def __init__(self, app: ASGIApp, *, requests: list[FakeRequest]) -> None:
        self.app = app
        self.requests = requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            self.requests.append(FakeRequest.of(scope))
        await self.app(scope, receive, send)


class _QuietServer(uvicorn.Server):
    """uvicorn.Server that leaves the process's signal handlers alone (several run in one test)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass(eq=False)
class FakeSideband:
    """One sideband WebSocket of a call, as the provider saw it."""

    call: FakeCall
    path: str
    query: dict[str, str]
    #: Request headers, names lower-cased.
    headers: dict[str, str]
    _websocket: WebSocket
    _protocol: _AbortableProtocol | None
    #: Client events received on this sideband (JSON objects only).
    events: list[Event] = field(default_factory=list)
    #: Server events sent on it.
    sent: int = 0
    #: Set when the connection has ended; `close_code` is then final.
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    #: The closing handshake's code: the provider's when it closed first (`close`, a hangup), else the client's;
    #: None when the connection dropped without one (either side's abort).
    close_code: int | None = None
    _closing: int | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def open(self) -> bool:
        return not self.closed.is_set()

    async def send(self, event: Event) -> None:
        """Send one event (nothing once closed), then abort if `drop_sideband_after` is reached."""
        async with self._lock:
            if not self.open:
                return
            try:
                await self._websocket.send_text(orjson.dumps(event).decode())
            except (WebSocketDisconnect, RuntimeError, OSError):
                return
            self.sent += 1
            limit = self.call.provider.drop_sideband_after
            if limit is not None and self.sent >= limit:
                self.abort()

    def abort(self) -> None:
        """Abort the TCP connection: the peer sees no close frame."""
        if self._protocol is not None:
            self._protocol.transport.abort()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close cleanly with `code` and `reason` (the receive loop then ends)."""
        async with self._lock:
            if not self.open:
                return
            self._closing = code
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                await self._websocket.close(code, reason)


@dataclass(eq=False)
class FakeCall:
    """One call the provider created. Test handles: the `wait_for_*` methods, `emit` and its helpers."""

    provider: FakeCallProvider
    call_id: str
    #: catalog.REALTIME_ENDPOINT or catalog.LIVE_ENDPOINT.
    route: SessionRoute
    #: Created on an Azure path (`/openai/v1/...`, `api-key`).
    azure: bool
    #: The model the create named (realtime: session part, `?model=`, or transcription model; GPT-Live:
    #: session.model); None when none was named.
    model: str | None
    #: The session configuration received ({} when none).
    session: dict[str, Any]
    offer_sdp: str
    #: The credential header's value as received (`Bearer sk-...`, or the `api-key` value).
    auth: str
    protocol: CallProtocol
    answer_sdp: str = ""
    #: Set by a successful hangup (`ended` too).
    hung_up: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set when the call has ended, for any reason (`end_reason`: hangup, session_close (GPT-Live's
    #: `session.close`), provider_shutdown, or what a test gave `end`).
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    end_reason: str | None = None
    #: Every sideband ever attached, in order.
    sidebands: list[FakeSideband] = field(default_factory=list)
    #: Sideband upgrade requests for this call that passed authentication (refused ones included).
    attach_attempts: int = 0
    #: The media peer's data channel (set by an answerer), fed every event of the call.
    data_channel: DataChannel | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def sideband_count(self) -> int:
        """Sidebands open now."""
        return sum(1 for sideband in self.sidebands if sideband.open)

    async def wait_for_sideband(self, n: int = 1) -> FakeSideband:
        """Wait until `n` sidebands have attached (ever), and return the `n`th (1-based)."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.sidebands) >= n)
        return self.sidebands[n - 1]

    async def emit(self, event: Event) -> Event:
        """Send `event` to every open sideband of the call and to the data channel; returns it as sent.

        An `event_id` is added when missing (a given one is kept: duplicates can be sent on purpose)."""
        sent = event if "event_id" in event else {"type": event.get("type"), "event_id": new_id("event"), **event}
        for sideband in list(self.sidebands):
            await sideband.send(sent)
        if self.data_channel is not None:
            await self.data_channel(sent)
        return sent

    async def response_done(self, usage: dict[str, Any] | None = None) -> Event:
        """Emit a realtime `response.done` (completed) with `usage` (default fake_provider.response_usage())."""
        return await self.emit(self._realtime().response_done(usage if usage is not None else response_usage()))

    async def transcription_completed(
        self, seconds: float = 1.0, text: str = DEFAULT_TRANSCRIPT, *, usage: dict[str, Any] | None = None
    ) -> Event:
        """Emit a realtime `conversation.item.input_audio_transcription.completed` with `usage` (default: a
        duration of `seconds`, or tokens for a `*-transcribe` transcription model)."""
        completed = self._realtime().transcription_completed(seconds=seconds, text=text, usage=usage)
        return await self.emit(completed)

    async def usage_updated(
        self, seconds: float, *, active_seconds: int | None = None, paused_seconds: int | None = None
    ) -> Event:
        """Emit a GPT-Live `session.usage.updated` with cumulative `seconds` (SessionUsage)."""
        usage: dict[str, Any] = {"seconds": seconds}
        if active_seconds is not None:
            usage["active_seconds"] = active_seconds
        if paused_seconds is not None:
            usage["paused_seconds"] = paused_seconds
        return await self.emit(self._live().usage_updated(usage))

    async def client_event(self, message: str | bytes) -> None:
        """A client event from the media peer's data channel: answered like one from a sideband (errors go
        back to the data channel only)."""
        reply = self.protocol.receive(message)
        if self.data_channel is not None:
            for event in reply.direct:
                await self.data_channel(event)
        await self._apply(reply)

    async def drop_sidebands(self) -> None:
        """Abort every open sideband's TCP connection (no close frame) and wait until each has ended."""
        sidebands = [sideband for sideband in self.sidebands if sideband.open]
        for sideband in sidebands:
            sideband.abort()
        for sideband in sidebands:
            await sideband.closed.wait()

    async def close_sidebands(self, code: int = 1000, reason: str = "") -> None:
        """Close every open sideband cleanly with `code` (the call goes on) and wait until each has ended."""
        sidebands = [sideband for sideband in self.sidebands if sideband.open]
        for sideband in sidebands:
            await sideband.close(code, reason)
        for sideband in sidebands:
            await sideband.closed.wait()

    async def end(self, reason: str = "remote_hangup", *, code: int = 1000) -> None:
        """The provider ends the call (a test calls this for a call the browser left, or that expired).

        A GPT-Live call's sidebands first get `session.closed` with the last usage reported and a Live reason
        (`hangup` -> close_requested, `provider_shutdown` -> connection_lost, `reason` itself when it is one:
        remote_hangup, expired, content, connection_lost; else remote_hangup); then `ended` is set (`end_reason`
        = `reason`) and every sideband is closed with `code`, without waiting for the closing handshakes.
        Idempotent."""
        if self.end_reason is not None:
            return
        self.end_reason = reason
        if isinstance(self.protocol, LiveCallProtocol) and reason != "session_close":  # it sent its own
            live_reason = _LIVE_CLOSE_REASONS.get(reason, reason)
            await self.emit(self.protocol.closed(live_reason if live_reason in _LIVE_REASONS else "remote_hangup"))
        self.ended.set()
        for sideband in list(self.sidebands):
            await sideband.close(code)

    async def _apply(self, reply: CallReply) -> None:
        for event in reply.broadcast:
            await self.emit(event)
        if reply.end:
            await self.end("session_close")

    async def _attached(self, sideband: FakeSideband) -> None:
        async with self._changed:
            self.sidebands.append(sideband)
            self._changed.notify_all()

    def _realtime(self) -> RealtimeCallProtocol:
        if not isinstance(self.protocol, RealtimeCallProtocol):
            raise TypeError(f"{self.call_id} is a GPT-Live call: no Realtime API events")
        return self.protocol

    def _live(self) -> LiveCallProtocol:
        if not isinstance(self.protocol, LiveCallProtocol):
            raise TypeError(f"{self.call_id} is a Realtime API call: no GPT-Live events")
        return self.protocol


def _bound_socket(host: str, port: int) -> socket.socket:
    """A listening socket: connections queue until uvicorn serves them."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def _mask_key(key: str) -> str:
    """How OpenAI echoes a wrong key: its first 3 and last 4 characters."""
    return f"{key[:3]}{'*' * 8}{key[-4:]}" if len(key) > 8 else "*" * len(key)


def _error(status: int, code: str, message: str, *, param: str | None = None) -> JSONResponse:
    kind = "server_error" if status >= 500 else "rate_limit_exceeded" if status == 429 else "invalid_request_error"
    return JSONResponse(error_body(code, message, type_=kind, param=param), status_code=status)


class FakeCallProvider:
    """The fake WebRTC provider. `async with FakeCallProvider() as fake:`; `fake.url` is its base URL."""

    def __init__(
        self,
        *,
        api_key: str = DEFAULT_API_KEY,
        host: str = DEFAULT_HOST,
        port: int = 0,
        answerer: Answerer | None = None,
        transcript: str = DEFAULT_TRANSCRIPT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`answerer` answers offers instead of the fake's SDP builder; `clock` (Unix seconds) dates GPT-Live
        sessions (`expires_at`)."""
        self.api_key = api_key
        self.answerer = answerer
        #: Faults (module docstring), read on each request or event: refuse every create with this status,
        self.refuse_offer_status: int | None = None
        #: refuse every sideband upgrade of a known call with this status,
        self.refuse_sideband_status: int | None = None
        #: abort a sideband's TCP connection once it has been sent this many server events (its opening counts),
        self.drop_sideband_after: int | None = None
        #: answer every hangup with this status (the call goes on).
        self.hangup_status: int | None = None
        #: Every call created, in order.
        self.calls: list[FakeCall] = []
        #: Successful hangups.
        self.hangups = 0
        #: Create requests that passed authentication (refused ones included).
        self.offer_attempts = 0
        #: Every HTTP request and WebSocket handshake, as received (before any check).
        self.requests: list[FakeRequest] = []
        self._by_id: dict[str, FakeCall] = {}
        self._host = host
        self._port = port
        self._transcript = transcript
        self._clock = clock
        self._changed = asyncio.Condition()
        self._socket: socket.socket | None = None
        self._url: str | None = None
        self._server: _QuietServer | None = None
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """`http://127.0.0.1:PORT` (no path; still known after `aclose`). Raises RuntimeError before `start()`."""
        if self._url is None:
            raise RuntimeError("FakeCallProvider is not started")
        return self._url

    async def start(self) -> None:
        """Listen and serve. Raises OSError if the address is taken, RuntimeError if already started."""
        if self._socket is not None:
            raise RuntimeError("FakeCallProvider is already started")
        self._socket = _bound_socket(self._host, self._port)
        host, port = self._socket.getsockname()[:2]
        self._url = f"http://{host}:{port}"
        config = uvicorn.Config(
            self._app(),
            lifespan="off",
            log_level="warning",
            access_log=False,
            ws=_AbortableProtocol,
            ws_ping_interval=None,
            timeout_graceful_shutdown=5,
        )
        self._server = _QuietServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))

    async def aclose(self) -> None:
        """End every call (sidebands closed with 1001) and stop serving. Idempotent."""
        if self._server is None or self._task is None or self._socket is None:
            return
        for call in list(self.calls):
            await call.end("provider_shutdown", code=1001)
        self._server.should_exit = True
        await self._task
        self._socket.close()
        self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # ---- test handles ----------------------------------------------------------------------------

    async def wait_for_call(self, index: int = 0) -> FakeCall:
        """Wait until call number `index` (0-based) has been created, and return it."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.calls) > index)
        return self.calls[index]

    def call(self, call_id: str) -> FakeCall:
        """The call with this provider id. Raises KeyError."""
        return self._by_id[call_id]

    # ---- the app ---------------------------------------------------------------------------------

    def _app(self) -> Starlette:
        routes: list[Route | WebSocketRoute] = []
        for prefix in ("/v1", "/openai/v1"):
            routes += [
                Route(f"{prefix}/realtime/calls", self._create_realtime, methods=["POST"]),
                Route(f"{prefix}/realtime/calls/{{call_id}}/hangup", self._hangup_realtime, methods=["POST"]),
                WebSocketRoute(f"{prefix}/realtime", self._realtime_sideband),
                Route(f"{prefix}/live/sessions", self._create_live, methods=["POST"]),
                Route(f"{prefix}/live/sessions/{{call_id}}/hangup", self._hangup_live, methods=["POST"]),
                WebSocketRoute(f"{prefix}/live/sessions/{{call_id}}/attach", self._live_sideband),
            ]

        async def not_found(request: Request, exc: Exception) -> Response:
            return _error(404, "not_found", f"Invalid URL ({request.method} {request.url.path})")

        async def crashed(request: Request, exc: Exception) -> Response:
            return _error(500, "server_error", "The fake provider failed on this request.")

        handlers = {404: not_found, 405: not_found, Exception: crashed}
        middleware = [Middleware(_Recorder, requests=self.requests)]
        return Starlette(routes=routes, exception_handlers=handlers, middleware=middleware)

    def _credential(self, headers: dict[str, str], *, azure: bool) -> tuple[str, JSONResponse | None]:
        """The credential header's value, and a 401 unless it carries the key (Azure: `api-key`)."""
        seen = headers.get("api-key" if azure else "authorization", "")
        sent = seen
        if not azure:
            scheme, _, sent = seen.partition(" ")
            sent = sent.strip() if scheme.lower() == "bearer" else ""
        if sent == self.api_key:
            return seen, None
        return seen, _error(401, "invalid_api_key", f"Incorrect API key provided: {_mask_key(sent)}.")

    def _fault(self, status: int | None, what: str) -> JSONResponse | None:
        if status is None:
            return None
        return _error(status, "fault_injected", f"{what} refused by fault injection (HTTP {status}).")

    async def _create_realtime(self, request: Request) -> Response:
        query_model = request.query_params.get("model")
        content_type = request.headers.get("content-type", "")

        def parse(body: bytes) -> CreateRequest:
            return parse_realtime_create(content_type, body, query_model=query_model)

        return await self._create(request, REALTIME_ENDPOINT, parse)

    async def _create_live(self, request: Request) -> Response:
        return await self._create(request, LIVE_ENDPOINT, parse_live_create)

    async def _create(self, request: Request, route: SessionRoute, parse: Callable[[bytes], CreateRequest]) -> Response:
        """Authenticate, apply the fault, parse, check the SDP, answer, then keep the call."""
        azure = request.url.path.startswith("/openai/")
        auth, refusal = self._credential(dict(request.headers), azure=azure)
        if refusal is not None:
            return refusal
        self.offer_attempts += 1
        if (fault := self._fault(self.refuse_offer_status, "The offer was")) is not None:
            return fault
        try:
            created = parse(await request.body())
            check_offer(created.sdp)
        except BadRequest as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        except SdpError as exc:
            return _error(400, "invalid_offer", f"Invalid SDP offer: {exc}", param="sdp")
        call = self._new_call(route, azure=azure, auth=auth, created=created)
        try:
            call.answer_sdp = await self._answer(created.sdp, call)
        except Exception:
            return _error(500, "server_error", "The media server could not answer the offer.")
        await self._keep(call)
        prefix = "/openai/v1" if azure else "/v1"
        if route == LIVE_ENDPOINT:
            body = {"session": {"id": call.call_id}, "transport": {"type": "webrtc", "sdp": call.answer_sdp}}
            return JSONResponse(body, status_code=200)
        location = f"{prefix}/realtime/calls/{call.call_id}"
        return Response(call.answer_sdp, status_code=201, media_type="application/sdp", headers={"Location": location})

    def _new_call(self, route: SessionRoute, *, azure: bool, auth: str, created: CreateRequest) -> FakeCall:
        if route == LIVE_ENDPOINT:
            call_id = new_id("sess")
            protocol: CallProtocol = LiveCallProtocol(
                call_id=call_id, session=created.session, created_at=self._clock(), transcript=self._transcript
            )
        else:
            call_id = f"rtc_{uuid.uuid4().hex}"
            protocol = RealtimeCallProtocol(model=created.model, session=created.session)
        return FakeCall(
            provider=self,
            call_id=call_id,
            route=route,
            azure=azure,
            model=created.model,
            session=created.session,
            offer_sdp=created.sdp,
            auth=auth,
            protocol=protocol,
        )

    async def _answer(self, offer: str, call: FakeCall) -> str:
        if self.answerer is not None:
            return await self.answerer(offer, call)
        return answer_sdp(offer, AnswerIdentity.random())

    async def _keep(self, call: FakeCall) -> None:
        async with self._changed:
            self.calls.append(call)
            self._by_id[call.call_id] = call
            self._changed.notify_all()

    def _live_call(self, call_id: str | None, route: SessionRoute) -> FakeCall | None:
        call = self._by_id.get(call_id or "")
        return call if call is not None and call.route == route and not call.ended.is_set() else None

    async def _hangup_realtime(self, request: Request) -> Response:
        return await self._hangup(request, REALTIME_ENDPOINT)

    async def _hangup_live(self, request: Request) -> Response:
        return await self._hangup(request, LIVE_ENDPOINT)

    async def _hangup(self, request: Request, route: SessionRoute) -> Response:
        _, refusal = self._credential(dict(request.headers), azure=request.url.path.startswith("/openai/"))
        if refusal is not None:
            return refusal
        call_id = request.path_params["call_id"]
        call = self._live_call(call_id, route)
        if call is None:
            return _error(404, "call_not_found", f"No active call {call_id}.")
        if (fault := self._fault(self.hangup_status, "The hangup was")) is not None:
            return fault
        call.hung_up.set()
        self.hangups += 1
        await call.end("hangup")
        return Response(status_code=200)

    # ---- sidebands -------------------------------------------------------------------------------

    async def _realtime_sideband(self, websocket: WebSocket) -> None:
        await self._sideband(websocket, websocket.query_params.get("call_id"), REALTIME_ENDPOINT)

    async def _live_sideband(self, websocket: WebSocket) -> None:
        await self._sideband(websocket, websocket.path_params["call_id"], LIVE_ENDPOINT)

    async def _sideband(self, websocket: WebSocket, call_id: str | None, route: SessionRoute) -> None:
        """Refuse (HTTP, before the upgrade) or attach, then serve the sideband until it ends."""
        call = self._admit_sideband(websocket, call_id, route)
        if isinstance(call, JSONResponse):
            await websocket.send_denial_response(call)
            return
        await websocket.accept()
        protocol = websocket.scope.get("extensions", {}).get(_PROTOCOL, {}).get("protocol")
        sideband = FakeSideband(
            call=call,
            path=websocket.url.path,
            query=dict(websocket.query_params),
            headers={name.lower(): value for name, value in websocket.headers.items()},
            _websocket=websocket,
            _protocol=protocol,
        )
        await call._attached(sideband)
        try:
            for event in call.protocol.opening():
                await sideband.send(event)
            await self._serve(sideband)
        finally:
            sideband.closed.set()

    def _admit_sideband(
        self, websocket: WebSocket, call_id: str | None, route: SessionRoute
    ) -> FakeCall | JSONResponse:
        """The call to attach to, or the refusal: 401, 400 (no call_id), 404 (unknown/ended), the fault."""
        azure = websocket.url.path.startswith("/openai/")
        _, refusal = self._credential(dict(websocket.headers), azure=azure)
        if refusal is not None:
            return refusal
        if not call_id:
            return _error(400, "missing_required_parameter", "Missing required parameter: 'call_id'.")
        known = self._by_id.get(call_id)
        if known is not None and known.route == route:
            known.attach_attempts += 1
        call = self._live_call(call_id, route)
        if call is None:
            return _error(404, "call_not_found", f"No active call {call_id}.")
        return self._fault(self.refuse_sideband_status, "The sideband was") or call

    async def _serve(self, sideband: FakeSideband) -> None:
        """Receive client events until the connection ends; never raises on client misbehaviour."""
        call = sideband.call
        while True:
            message = await sideband._websocket.receive()
            if message["type"] == "websocket.disconnect":
                sideband.close_code = sideband._closing if sideband._closing is not None else _received(sideband)
                return
            data = message.get("text")
            data = data if data is not None else message.get("bytes") or b""
            reply = call.protocol.receive(data)
            if reply.received is not None:
                sideband.events.append(reply.received)
            for event in reply.direct:
                await sideband.send(event)
            await call._apply(reply)


def _received(sideband: FakeSideband) -> int | None:
    """The code of the close frame the client sent, if one arrived."""
    received = sideband._protocol.conn.close_rcvd if sideband._protocol is not None else None
    return received.code if received is not None else None
