"""A fake realtime provider: a real WebSocket server speaking enough of OpenAI's three WebSocket voice APIs.

It listens on 127.0.0.1 (port 0 by default) and accepts the upstream forms the sidecar dials:

    Realtime API
    OpenAI          /v1/realtime?model=..&intent=..             Authorization: Bearer <key>
    Azure GA        /openai/v1/realtime?model=..&intent=..      api-key: <key>
    Azure preview   /openai/realtime?api-version=..&deployment=..   api-key: <key>
    xAI, with `xai=True` (fake_xai.py): only /v1/realtime?model=..   Authorization: Bearer <key>
    Azure GA transcription, with `azure_deployments` (fake_azure.py): POST /openai/v1/realtime/client_secrets
                    (api-key) mints an `ek_...`; /openai/v1/realtime?intent=transcription   Bearer ek_...
    GPT-Live (fake_live.py)
    OpenAI          /v1/live/sessions (no query)                Authorization: Bearer <key>
    Azure           /openai/v1/live/sessions (no query)         api-key: <key>
    Realtime translation (fake_translation.py)
    OpenAI          /v1/realtime/translations?model=..          Authorization: Bearer <key>
    Azure           /openai/v1/realtime/translations?model=..   api-key: <key>

Refusals happen before the upgrade, as HTTP responses with an OpenAI-shaped JSON body
`{"error": {"message", "type", "code", "param"}}`: 404 unknown path, 401 `invalid_api_key`,
400 `missing_required_parameter` (Azure preview without `api-version`/`deployment`, translation without
`model`), 400 `unknown_parameter` (a query on GPT-Live: its model belongs in `session.start`), 400
`invalid_model` (OpenAI path with `intent=transcription` and `model=`, as OpenAI itself refuses), or any
status injected with `Faults.refuse_status`.

After the upgrade the protocol logic lives in one sans-I/O state machine per protocol (`_Conversation`,
fake_live.LiveConversation, fake_translation.TranslationConversation: client text and the provider's clock
in, server events and a drop/close action out); `FakeProvider` only moves frames, keeps time (an injected
clock) and applies the same `Faults` to all three.
Every server event carries a unique `event_id`. Nothing here ever crashes a connection on bad input:
malformed JSON, binary frames, unknown event types and invalid base64 are answered with `error` events.

The empty-commit `error` DELIBERATELY leaks the provider's api key, host:port and model/deployment
name in its message, so that tests can prove the sidecar scrubs them (docs/api.md, "After the upgrade");
on GPT-Live and translation the refusal of a `session.update` naming the model does the same.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http
import signal
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from fractions import Fraction
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import parse_qsl, urlsplit

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from sidecar.testing import fake_xai
from sidecar.testing.fake_azure import CLIENT_SECRETS_PATH, AzureTranscription, posted
from sidecar.testing.fake_live import LiveConversation
from sidecar.testing.fake_translation import DEFAULT_TRANSLATION, TranslationConversation
from sidecar.testing.fake_wire import (
    G711_BYTES_PER_SECOND,
    PCM16_BYTES_PER_SECOND,
    Conversation,
    Event,
    FakeSession,
    Faults,
    Handshake,
    Reply,
    append_faults,
    appended_bytes,
)
from sidecar.testing.fake_wire import deep_merge as _deep_merge
from sidecar.testing.fake_wire import error as _error
from sidecar.testing.fake_wire import event as _event
from sidecar.testing.fake_wire import new_id as _new_id
from sidecar.testing.fake_wire import word_chunks as _word_chunks

DEFAULT_API_KEY: Final = "sk-fake-provider-key-0123456789"
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_TRANSCRIPT: Final = (
    "The quick brown fox jumps over the lazy dog. Realtime transcription is billed by the second."
)
#: Incoming frames may be large (a whole recording in one append); 16 MiB like the sidecar's own limit.
MAX_FRAME_BYTES: Final = 16 * 1024 * 1024
_G711_FORMATS: Final = frozenset({"audio/pcmu", "audio/pcma", "g711_ulaw", "g711_alaw"})

#: Fixed `response.done` usage (OpenAI Realtime `response.done.response.usage` shape).
RESPONSE_INPUT_TOKENS: Final = 120
RESPONSE_OUTPUT_TOKENS: Final = 40
RESPONSE_INPUT_TEXT_TOKENS: Final = 20
RESPONSE_INPUT_AUDIO_TOKENS: Final = 100
RESPONSE_CACHED_TOKENS: Final = 10
RESPONSE_CACHED_TEXT_TOKENS: Final = 10
RESPONSE_CACHED_AUDIO_TOKENS: Final = 0
RESPONSE_OUTPUT_TEXT_TOKENS: Final = 10
RESPONSE_OUTPUT_AUDIO_TOKENS: Final = 30
RESPONSE_TOTAL_TOKENS: Final = RESPONSE_INPUT_TOKENS + RESPONSE_OUTPUT_TOKENS

_OPENAI_PATH: Final = "/v1/realtime"
_AZURE_GA_PATH: Final = "/openai/v1/realtime"
_AZURE_PREVIEW_PATH: Final = "/openai/realtime"
_LIVE_PATHS: Final = {"/v1/live/sessions": "authorization", "/openai/v1/live/sessions": "api-key"}
_TRANSLATION_PATHS: Final = {
    "/v1/realtime/translations": "authorization",
    "/openai/v1/realtime/translations": "api-key",
}


def response_usage() -> dict[str, Any]:
    """The usage object every `response.done` carries (a fresh dict built from the constants above)."""
    return {
        "total_tokens": RESPONSE_TOTAL_TOKENS,
        "input_tokens": RESPONSE_INPUT_TOKENS,
        "output_tokens": RESPONSE_OUTPUT_TOKENS,
        "input_token_details": {
            "text_tokens": RESPONSE_INPUT_TEXT_TOKENS,
            "audio_tokens": RESPONSE_INPUT_AUDIO_TOKENS,
            "cached_tokens": RESPONSE_CACHED_TOKENS,
            "cached_tokens_details": {
                "text_tokens": RESPONSE_CACHED_TEXT_TOKENS,
                "audio_tokens": RESPONSE_CACHED_AUDIO_TOKENS,
            },
        },
        "output_token_details": {
            "text_tokens": RESPONSE_OUTPUT_TEXT_TOKENS,
            "audio_tokens": RESPONSE_OUTPUT_AUDIO_TOKENS,
        },
    }


@dataclass(frozen=True)
class _Refusal:
    """An HTTP refusal of the upgrade with an OpenAI-shaped error body."""

    status: int
    code: str
    message: str
    type: str = "invalid_request_error"

    def to_response(self) -> Response:
        """The HTTP response carrying `{"error": {...}}` as JSON."""
        error = {"message": self.message, "type": self.type, "code": self.code, "param": None}
        return _json_response(self.status, {"error": error})


def _json_response(status: int, body: dict[str, Any]) -> Response:
    """An HTTP response with a JSON body (refusals; fake_azure's answers)."""
    data = orjson.dumps(body)
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    headers = Headers(
        [("Content-Type", "application/json"), ("Content-Length", str(len(data))), ("Connection", "close")]
    )
    return Response(status, phrase, headers, data)


def _mask_key(key: str) -> str:
    """How OpenAI echoes a wrong key: its first 3 and last 4 characters."""
    return f"{key[:3]}{'*' * 8}{key[-4:]}" if len(key) > 8 else "*" * len(key)


def _parse_handshake(request: Request) -> Handshake:
    """The path, query (last value wins) and lower-cased headers of an upgrade request."""
    url = urlsplit(request.path)
    headers = {name.lower(): value for name, value in request.headers.raw_items()}
    return Handshake(path=url.path, query=dict(parse_qsl(url.query, keep_blank_values=True)), headers=headers)


def _check_key(handshake: Handshake, *, header: str, api_key: str) -> _Refusal | None:
    """401 `invalid_api_key` unless `header` carries the key (`Authorization` in its Bearer form)."""
    sent = handshake.headers.get(header, "")
    if header == "authorization":
        scheme, _, sent = sent.partition(" ")
        sent = sent.strip() if scheme.lower() == "bearer" else ""
    if sent == api_key:
        return None
    return _Refusal(401, "invalid_api_key", f"Incorrect API key provided: {_mask_key(sent)}.")


def _refusal(handshake: Handshake, *, api_key: str, faults: Faults) -> _Refusal | None:
    """Why this handshake is refused (404, 401, 400 or an injected status), or None to accept it."""
    if faults.refuse_status is not None:
        kind = "server_error" if faults.refuse_status >= 500 else "invalid_request_error"
        message = f"Refused by fault injection (HTTP {faults.refuse_status})."
        return _Refusal(faults.refuse_status, "fault_injected", message, kind)
    query = handshake.query
    if handshake.path == _OPENAI_PATH:
        refusal = _check_key(handshake, header="authorization", api_key=api_key)
        if (
            refusal is None
            and faults.reject_model_on_transcription
            and query.get("intent") == "transcription"
            and "model" in query
        ):
            message = "Model is not supported on transcription sessions; set it in the session config."
            return _Refusal(400, "invalid_model", message)
        return refusal
    if handshake.path == _AZURE_GA_PATH:
        return _check_key(handshake, header="api-key", api_key=api_key)
    if handshake.path == _AZURE_PREVIEW_PATH:
        refusal = _check_key(handshake, header="api-key", api_key=api_key)
        missing = [name for name in ("api-version", "deployment") if not query.get(name)]
        if refusal is None and missing:
            return _Refusal(400, "missing_required_parameter", f"Missing required query parameter: {missing[0]}.")
        return refusal
    if handshake.path in _LIVE_PATHS:
        refusal = _check_key(handshake, header=_LIVE_PATHS[handshake.path], api_key=api_key)
        if refusal is None and query:
            message = f"Unknown query parameter: {next(iter(query))}. Send the model in session.start."
            return _Refusal(400, "unknown_parameter", message)
        return refusal
    if handshake.path in _TRANSLATION_PATHS:
        refusal = _check_key(handshake, header=_TRANSLATION_PATHS[handshake.path], api_key=api_key)
        if refusal is None and not query.get("model"):
            return _Refusal(400, "missing_required_parameter", "Missing required query parameter: model.")
        return refusal
    return _Refusal(404, "not_found", f"Invalid URL (GET {handshake.path})")


def _upstream_model(handshake: Handshake) -> str | None:
    """The model (OpenAI, Azure GA) or deployment (Azure preview) the handshake names, if any."""
    if handshake.path == _AZURE_PREVIEW_PATH:
        return handshake.query.get("deployment")
    return handshake.query.get("model")


def ga_session(model: str | None, *, transcription: bool) -> dict[str, Any]:
    """The GA session object `session.created` announces (PCM16 at 24 kHz; bench/provider.py uses it too)."""
    return {
        "id": _new_id("sess"),
        "object": "realtime.session",
        "type": "transcription" if transcription else "realtime",
        "model": model,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": {"model": model} if transcription and model else None,
            }
        },
    }


def _initial_session(handshake: Handshake) -> dict[str, Any]:
    """The session announced to this handshake: its model, and transcription-only for `intent=transcription`."""
    return ga_session(_upstream_model(handshake), transcription=handshake.query.get("intent") == "transcription")


def _bytes_per_second(session: dict[str, Any]) -> int:
    """The input format's byte rate: the beta `input_audio_format` if set, else GA `audio.input.format`."""
    beta = session.get("input_audio_format")
    audio = session.get("audio")
    ga = audio.get("input", {}).get("format", {}) if isinstance(audio, dict) else {}
    name = beta if isinstance(beta, str) else ga.get("type") if isinstance(ga, dict) else None
    return G711_BYTES_PER_SECOND if name in _G711_FORMATS else PCM16_BYTES_PER_SECOND


#: Audio tokens per second the token-billed transcription models report (OpenAI: ~10 per second).
AUDIO_TOKENS_PER_SECOND: Final = 10
TRANSCRIPT_TOKENS: Final = 20


def transcription_usage(model: str, seconds: float) -> dict[str, Any]:
    """The `usage` of a transcription `completed` event, as OpenAI reports it: tokens for the
    `*-transcribe` models (gpt-4o-transcribe, gpt-4o-mini-transcribe), a duration for the others (whisper-1,
    gpt-realtime-whisper)."""
    if not model.endswith("transcribe"):
        return {"type": "duration", "seconds": seconds}
    audio = round(seconds * AUDIO_TOKENS_PER_SECOND)
    return {
        "type": "tokens",
        "total_tokens": audio + TRANSCRIPT_TOKENS,
        "input_tokens": audio,
        "input_token_details": {"text_tokens": 0, "audio_tokens": audio},
        "output_tokens": TRANSCRIPT_TOKENS,
    }


class _Conversation:
    """Sans-I/O protocol state of one connection: client frames in, server events and actions out.

    Records into its `FakeSession`; reads no clock and does no I/O.
    """

    def __init__(
        self,
        record: FakeSession,
        *,
        api_key: str,
        host_port: str,
        transcript: str,
        azure: AzureTranscription | None = None,
        xai: bool = False,
    ) -> None:
        self.record = record
        self._xai = xai  # xAI's differences (fake_xai.py): conversation.created first, empty response usage
        self._api_key = api_key
        self._azure = azure  # an Azure transcription socket: its transcription model must be a deployment
        self._host_port = host_port
        self._transcript = transcript
        self._buffer = 0  # uncommitted decoded bytes
        self._buffer_seconds = Fraction(0)  # the same, as decoded seconds (exact)
        self._appends = 0
        self._item_id = _new_id("item")
        self._handlers: dict[str, Callable[[Event, Faults], Reply]] = {
            "session.update": self._update,
            "transcription_session.update": self._update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._commit,
            "input_audio_buffer.clear": self._clear,
            "conversation.item.create": self._create_item,
            "response.create": self._create_response,
            "response.cancel": self._cancel_response,
        }
        #: Responses created and not done (Faults.hold_responses), by id.
        self._in_progress: dict[str, dict[str, Any]] = {}

    def opening(self, *, now: float = 0.0) -> list[Event]:
        """The events sent as soon as the connection is upgraded (the Realtime API fake keeps no time)."""
        if self._xai:
            return fake_xai.opening()
        return [_event("session.created", session=self.record.session)]

    def receive(self, message: str | bytes, faults: Faults, *, now: float = 0.0) -> Reply:
        """Handle one client frame; never raises on bad input (it becomes an `error` event)."""
        if isinstance(message, bytes):
            self.record.binary_frames += 1
            return Reply([_error("binary_not_supported", "Binary frames are not supported; send JSON text.")])
        try:
            event = orjson.loads(message)
        except orjson.JSONDecodeError:
            return Reply([_error("invalid_json", "The event is not valid JSON.")])
        if not isinstance(event, dict):
            return Reply([_error("invalid_json", "The event must be a JSON object.")])
        self.record.events.append(event)
        handler = self._handlers.get(str(event.get("type")))
        if handler is None:
            message = f"Unknown event type: {event.get('type')!r}."
            return Reply([_error("unknown_event", message, client_event_id=event.get("event_id"))])
        return handler(event, faults)

    def _update(self, event: Event, faults: Faults) -> Reply:
        """`session.update` -> `session.updated`; beta `transcription_session.update` likewise."""
        update = event.get("session")
        if not isinstance(update, dict):
            error = _error("invalid_value", "`session` must be an object.", client_event_id=event.get("event_id"))
            return Reply([error])
        if self._azure is not None and (problem := self._azure.model_error(update)) is not None:
            return Reply([_error("invalid_value", problem, client_event_id=event.get("event_id"))])
        _deep_merge(self.record.session, update)
        reply_type = event["type"].replace(".update", ".updated")
        return Reply([_event(reply_type, session=self.record.session)])

    def _append(self, event: Event, faults: Faults) -> Reply:
        """Count decoded audio (invalid base64 is answered with an error and not counted), then faults."""
        index = self._appends
        self._appends += 1
        size = appended_bytes(event.get("audio"))
        if size is None:
            message = "Invalid 'audio': not valid base64."
            events = [_error("invalid_base64", message, client_event_id=event.get("event_id"))]
        else:
            seconds = Fraction(size, _bytes_per_second(self.record.session))
            self.record.audio_bytes += size
            self.record.audio_seconds += seconds
            self._buffer += size
            self._buffer_seconds += seconds
            events = [self._delta(str(event.get("event_id", index)))] if faults.reply_each_append else []
        return self._apply_append_faults(events, faults)

    def _apply_append_faults(self, events: list[Event], faults: Faults) -> Reply:
        """Drop or close when this append reaches the configured count."""
        return append_faults(events, faults, self._appends)

    def _commit(self, event: Event, faults: Faults) -> Reply:
        """Empty buffer -> the leaky error; else committed, deltas, completed with duration usage."""
        if self._buffer == 0:
            return Reply([self._empty_commit_error(event.get("event_id"))])
        seconds = float(self._buffer_seconds)
        if faults.duration_at_commit_format:
            seconds = self._buffer / _bytes_per_second(self.record.session)
        item_id, self._item_id, self._buffer, self._buffer_seconds = self._item_id, _new_id("item"), 0, Fraction(0)
        events = [_event("input_audio_buffer.committed", previous_item_id=None, item_id=item_id)]
        events += [self._delta(chunk, item_id=item_id) for chunk in _word_chunks(self._transcript)]
        usage = transcription_usage(self._transcription_model(), seconds)
        completed = _event(
            "conversation.item.input_audio_transcription.completed",
            item_id=item_id,
            content_index=0,
            transcript=self._transcript,
            usage=usage,
        )
        return Reply([*events, completed])

    def _empty_commit_error(self, client_event_id: Any) -> Event:
        """The commit-empty error, DELIBERATELY naming the key, host:port and deployment (scrub bait)."""
        message = (
            "Error committing input audio buffer: buffer too small. Expected at least 100ms of audio, "
            f"but buffer only has 0.00ms of audio. (key {self._api_key}, deployment {self._model_name()} "
            f"at {self._host_port})"
        )
        if self._azure is not None:  # an Azure transcription socket echoes its minted client secret too
            message += f" [{self.record.handshake.headers.get('authorization', '')}]"
        return _error("input_audio_buffer_commit_empty", message, client_event_id=client_event_id)

    def _transcription_model(self) -> str:
        """The input transcription model the session names (GA, else beta), or ""."""
        session = self.record.session
        ga = session.get("audio", {}).get("input", {}).get("transcription")
        beta = session.get("input_audio_transcription")
        for holder in (ga, beta):
            if isinstance(holder, dict) and isinstance(holder.get("model"), str):
                return str(holder["model"])
        return ""

    def _model_name(self) -> str:
        """The handshake's model/deployment, else the session's (transcription) model."""
        named = _upstream_model(self.record.handshake)
        if named:
            return named
        transcription = self.record.session.get("audio", {}).get("input", {}).get("transcription")
        if isinstance(transcription, dict) and transcription.get("model"):
            return str(transcription["model"])
        return str(self.record.session.get("model") or "default")

    def _clear(self, event: Event, faults: Faults) -> Reply:
        """`input_audio_buffer.clear` -> `input_audio_buffer.cleared`; the uncommitted audio is gone."""
        self._buffer = 0
        return Reply([_event("input_audio_buffer.cleared")])

    def _create_item(self, event: Event, faults: Faults) -> Reply:
        """`conversation.item.create` -> GA `conversation.item.added` then `conversation.item.done`."""
        raw_item = event.get("item")
        item = {"id": _new_id("item"), **raw_item} if isinstance(raw_item, dict) else {"id": _new_id("item")}
        previous = event.get("previous_item_id")
        return Reply(
            [
                _event("conversation.item.added", previous_item_id=previous, item=item),
                _event("conversation.item.done", previous_item_id=previous, item=item),
            ]
        )

    def _create_response(self, event: Event, faults: Faults) -> Reply:
        """`response.create` -> `response.created`, then `response.done` with the fixed usage (unless
        Faults.hold_responses keeps it in progress until a `response.cancel`)."""
        response: dict[str, Any] = {"id": _new_id("resp"), "object": "realtime.response", "output": []}
        created = _event("response.created", response={**response, "status": "in_progress", "usage": None})
        if faults.hold_responses:
            self._in_progress[response["id"]] = response
            return Reply([created])
        usage = fake_xai.response_usage() if self._xai else response_usage()
        done = _event("response.done", response={**response, "status": "completed", "usage": usage})
        return Reply([created, done])

    def _cancel_response(self, event: Event, faults: Faults) -> Reply:
        """`response.cancel` -> `response.done` (status `cancelled`, the fixed usage) for the response it names
        (else the oldest in progress); nothing when none is in progress or Faults.ignore_cancel."""
        if faults.close_on_cancel is not None:
            return Reply([], close=faults.close_on_cancel)
        if faults.ignore_cancel or not self._in_progress:
            return Reply([])
        named = event.get("response_id")
        response_id = named if isinstance(named, str) and named in self._in_progress else next(iter(self._in_progress))
        response = self._in_progress.pop(response_id)
        usage = response_usage()
        return Reply([_event("response.done", response={**response, "status": "cancelled", "usage": usage})])

    def _delta(self, text: str, *, item_id: str | None = None) -> Event:
        """A transcription delta for the current (or given) item."""
        return _event(
            "conversation.item.input_audio_transcription.delta",
            item_id=item_id or self._item_id,
            content_index=0,
            delta=text,
        )


def _tracking_connection_class(registry: set[ServerConnection]) -> type[ServerConnection]:
    """A `ServerConnection` that keeps itself in `registry` while its TCP connection lives.

    This lets `aclose` abort connections that never sent an HTTP request (the server runs without an
    open timeout so that `Faults.stall_handshake` can stall for as long as the test wants).
    """

    class _TrackedConnection(ServerConnection):
        #: A plain HTTP POST's body (fake_azure.posted), its request handed on as a GET for process_request.
        posted_body: bytes | None = None
        _post: bytes | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            registry.add(self)

        def data_received(self, data: bytes) -> None:
            if self._post is None and self.request is None and self.posted_body is None and data[:5] == b"POST ":
                self._post = b""
            if self._post is None:
                super().data_received(data)
                return
            self._post += data
            if (done := posted(self._post)) is not None:
                head, self.posted_body = done
                self._post = None
                super().data_received(head)

        def connection_lost(self, exc: Exception | None) -> None:
            registry.discard(self)
            super().connection_lost(exc)

    return _TrackedConnection


class FakeProvider:
    """The fake provider server. Use `async with FakeProvider() as provider:` or `start()`/`aclose()`."""

    def __init__(
        self,
        *,
        api_key: str = DEFAULT_API_KEY,
        host: str = DEFAULT_HOST,
        port: int = 0,
        transcript: str = DEFAULT_TRANSCRIPT,
        translation: str = DEFAULT_TRANSLATION,
        faults: Faults | None = None,
        clock: Callable[[], float] = time.monotonic,
        azure_deployments: Collection[str] | None = None,
        xai: bool = False,
    ) -> None:
        """`clock` (seconds) times GPT-Live sessions (their usage seconds); tests pass one they advance.
        `azure_deployments` turns on the Azure transcription mode (fake_azure.py) with those deployments; `xai`
        the xAI mode (fake_xai.py): only xAI's form is accepted."""
        self.xai = xai
        self.api_key = api_key
        #: The Azure transcription mode's state, when on.
        self.azure = AzureTranscription(api_key, azure_deployments) if azure_deployments is not None else None
        self.faults = faults if faults is not None else Faults()
        self.handshakes: list[Handshake] = []
        self.sessions: list[FakeSession] = []
        self._host = host
        self._port = port
        self._transcript = transcript
        self._translation = translation
        self._clock = clock
        self._server: Server | None = None
        self._connections: set[ServerConnection] = set()
        self._live: dict[ServerConnection, FakeSession] = {}
        self._conversations: dict[ServerConnection, Conversation] = {}
        self._accepted: dict[ServerConnection, Handshake] = {}  # upgraded, not yet handled
        self._changed = asyncio.Condition()
        self._stopping = asyncio.Event()
        self._reading = asyncio.Event()  # cleared by hold_reads(): every session stops reading
        self._reading.set()

    @property
    def host_port(self) -> str:
        """`host:port` actually listened on. Raises RuntimeError before `start()`."""
        if self._server is None:
            raise RuntimeError("FakeProvider is not started")
        host, port = next(iter(self._server.sockets)).getsockname()[:2]
        return f"{host}:{port}"

    @property
    def url(self) -> str:
        """`ws://host:port` (no path). Raises RuntimeError before `start()`."""
        return f"ws://{self.host_port}"

    async def start(self) -> None:
        """Listen. Raises OSError if the address is taken, RuntimeError if already started."""
        if self._server is not None:
            raise RuntimeError("FakeProvider is already started")
        self._server = await serve(
            self._handle,
            self._host,
            self._port,
            process_request=self._process_request,
            compression=None,
            open_timeout=None,
            max_size=MAX_FRAME_BYTES,
            create_connection=_tracking_connection_class(self._connections),
        )

    async def aclose(self) -> None:
        """Release stalled handshakes (HTTP 503), close live sessions with 1001 and stop. Idempotent."""
        if self._server is None:
            return
        self._stopping.set()
        for connection in list(self._connections):
            # Never sent its HTTP request, so nothing else would end it (websockets < 17 logs this abort).
            if connection.request is None:
                connection.transport.abort()
        self._server.close()
        await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def wait_for_session(self, index: int = 0) -> FakeSession:
        """Wait until session number `index` (0-based) has been upgraded, and return it."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.sessions) > index)
        return self.sessions[index]

    async def wait_for_handshake(self, index: int = 0) -> Handshake:
        """Wait until handshake number `index` (0-based) has been received (accepted or not)."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.handshakes) > index)
        return self.handshakes[index]

    async def send_all(self, event: Event) -> None:
        """Send `event` to every live session (an `event_id` is added when missing)."""
        text = orjson.dumps({"event_id": _new_id("event"), **event}).decode()
        for connection in list(self._live):
            with contextlib.suppress(ConnectionClosed):
                await connection.send(text)

    async def report_usage(self) -> None:
        """Send every started GPT-Live session its `session.usage.updated` (cumulative seconds now)."""
        for connection, conversation in list(self._conversations.items()):
            if isinstance(conversation, LiveConversation) and conversation.started:
                usage = conversation.usage_event(now=self._clock())
                with contextlib.suppress(ConnectionClosed):
                    await connection.send(orjson.dumps(usage).decode())

    async def send_raw(self, message: str | bytes) -> None:
        """Send `message` to every live session exactly as given: a text frame (str), a binary frame (bytes).

        For frames `send_all` cannot produce: JSON spelled with escapes, not JSON at all, binary.
        """
        for connection in list(self._live):
            with contextlib.suppress(ConnectionClosed):
                await connection.send(message)

    def hold_reads(self) -> None:
        """Stop reading client events on every session (a stalled provider) until `release_reads()`."""
        self._reading.clear()

    def release_reads(self) -> None:
        """Read client events again after `hold_reads()`."""
        self._reading.set()

    async def drop_all(self) -> None:
        """Abort every live connection's TCP transport: the peers see no close frame."""
        connections = list(self._live)
        for connection in connections:
            connection.transport.abort()
        for connection in connections:
            await connection.wait_closed()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Record the handshake, then stall, refuse (HTTP + JSON body) or accept (None)."""
        handshake = _parse_handshake(request)
        body = getattr(connection, "posted_body", None)
        if body is not None:  # a plain HTTP POST (fake_azure.posted), not a handshake
            return self._post(handshake, body)
        self.handshakes.append(handshake)
        await self._notify()
        azure = self._azure_refusal(handshake)
        if azure is not None:
            return azure
        refusal = None if self._ephemeral(handshake) else _refusal(handshake, api_key=self.api_key, faults=self.faults)
        if refusal is None and self.xai and (xai := fake_xai.refusal(handshake, api_key=self.api_key)) is not None:
            refusal = _Refusal(*xai)
        if refusal is None and self.faults.stall_handshake:
            await self._stall(connection)
            refusal = _Refusal(503, "server_shutting_down", "The server is shutting down.", "server_error")
        if refusal is not None:
            return refusal.to_response()
        self._accepted[connection] = handshake
        return None

    def _ephemeral(self, handshake: Handshake) -> bool:
        """An Azure transcription socket in the Azure transcription mode (its credential is fake_azure's)."""
        intent = handshake.query.get("intent") == "transcription"
        return self.azure is not None and handshake.path == _AZURE_GA_PATH and intent

    def _azure_refusal(self, handshake: Handshake) -> Response | None:
        """Injected refusals first, then fake_azure's rules, for an Azure transcription socket."""
        if self.azure is None or not self._ephemeral(handshake):
            return None
        if self.faults.refuse_status is not None:
            refusal = _refusal(handshake, api_key=self.api_key, faults=self.faults)
            return refusal.to_response() if refusal is not None else None
        answer = self.azure.refusal(handshake)
        return _json_response(answer.status, answer.body) if answer is not None else None

    def _post(self, request: Handshake, body: bytes) -> Response:
        """Answer a plain HTTP POST: the client-secret exchange in the Azure transcription mode, else 404."""
        if self.azure is None or request.path != CLIENT_SECRETS_PATH:
            return _Refusal(404, "not_found", f"Invalid URL (POST {request.path})").to_response()
        answer = self.azure.client_secret(request.headers, body, now=time.time())
        return _json_response(answer.status, answer.body)

    async def _stall(self, connection: ServerConnection) -> None:
        """Wait until the provider closes (then return) or the peer goes away (then abandon the handshake).

        Raises CancelledError when the peer has gone: websockets then aborts the transport quietly,
        where returning any response would make it log a failed send on a dead connection.
        """
        peer_gone = asyncio.ensure_future(connection.wait_closed())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([peer_gone, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            peer_gone.cancel()
            stopping.cancel()
        if connection.protocol.state is State.CLOSED:
            raise asyncio.CancelledError

    async def _handle(self, connection: ServerConnection) -> None:
        """Serve one upgraded connection until it ends; never raises on client misbehaviour."""
        handshake = self._accepted.pop(connection)
        conversation = self._conversation(handshake)
        record = conversation.record
        self._live[connection] = record
        self._conversations[connection] = conversation
        self.sessions.append(record)
        await self._notify()
        try:
            await self._send(connection, conversation.opening(now=self._clock()))
            await self._serve(connection, conversation)
        except ConnectionClosed:
            pass
        finally:
            del self._live[connection]
            del self._conversations[connection]
            rcvd = connection.protocol.close_rcvd
            record.close_code = rcvd.code if rcvd is not None else None
            record.closed.set()

    def _conversation(self, handshake: Handshake) -> Conversation:
        """The protocol state machine for the path the handshake was accepted on."""
        api_key, host_port, transcript = self.api_key, self.host_port, self._transcript
        if handshake.path in _LIVE_PATHS:
            record = FakeSession(handshake=handshake)
            return LiveConversation(record, api_key=api_key, host_port=host_port, transcript=transcript)
        if handshake.path in _TRANSLATION_PATHS:
            return TranslationConversation(
                FakeSession(handshake=handshake),
                api_key=api_key,
                host_port=host_port,
                transcript=transcript,
                translation=self._translation,
            )
        record = FakeSession(handshake=handshake, session=_initial_session(handshake))
        azure = self.azure if self._ephemeral(handshake) else None
        return _Conversation(
            record, api_key=api_key, host_port=host_port, transcript=transcript, azure=azure, xai=self.xai
        )

    async def _serve(self, connection: ServerConnection, conversation: Conversation) -> None:
        """Receive, reply and apply fault actions until the connection closes."""
        while True:
            if not self._reading.is_set():
                await self._reading.wait()
            if self.faults.read_delay_s > 0:
                await asyncio.sleep(self.faults.read_delay_s)
            message = await connection.recv()
            reply = conversation.receive(message, self.faults, now=self._clock())
            await self._send(connection, reply.events)
            if reply.drop:
                connection.transport.abort()
                await connection.wait_closed()
                return
            if reply.close is not None:
                await connection.close(*reply.close)
                return

    @staticmethod
    async def _send(connection: ServerConnection, events: Sequence[Event]) -> None:
        for event in events:
            await connection.send(orjson.dumps(event).decode())


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sidecar.testing.fake_provider", description="Run the fake realtime provider."
    )
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on start)")
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with FakeProvider(api_key=args.api_key, host=args.host, port=args.port) as provider:
        print(provider.url, flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """Run the fake provider until SIGINT/SIGTERM, printing its `ws://host:port` URL on stdout first."""
    asyncio.run(_run(_parse_args(argv)))


if __name__ == "__main__":
    main()
