"""The fake provider's WebRTC calls, sans-I/O: the create requests and each call's sideband protocol.

fake_calls.py serves these over HTTP and WebSockets; nothing here does I/O or reads a clock.

Create requests (`parse_realtime_create`, `parse_live_create`) raise `BadRequest` (the provider's 4xx with an
OpenAI-shaped body, `error_body`). A realtime call's model is the `session` part's `model`, else the query's
`?model=`, else (a transcription call) `session.audio.input.transcription.model`, else None (Azure names its
deployment there: the fake does not insist).

One protocol object per call (every sideband of the call shares it, as the provider's call state is one):

    RealtimeCallProtocol (attach: session.created)
        session.update               -> session.updated (merged)             to every sideband + data channel
        response.create              -> response.created, response.done (usage: fake_provider.response_usage())
        response.cancel              accepted silently (nothing is in progress)
        conversation.item.create     -> conversation.item.added, conversation.item.done
        output_audio_buffer.clear    -> output_audio_buffer.cleared (WebRTC only)
        anything else                -> error `unknown_event`, to the sender only
    LiveCallProtocol (attach: session.started, the call's session)
        session.update               -> session.updated; naming `model` -> error `immutable_parameter`
        session.input_audio.mute / unmute -> session.input_audio.muted / unmuted
        response.create              -> session.output_transcript.delta events (the audio is on the media)
        response.item.create         accepted silently
        session.close                -> session.closed (reason close_requested, the last usage), the call ends
        anything else                -> error `unknown_event`, to the sender only (Live error shape)

Malformed JSON and binary frames are answered with an `error` event to the sender; nothing raises.
"""

from __future__ import annotations

import copy
import email.policy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any, Final, Protocol

import orjson

from sidecar.testing.fake_live import SESSION_TTL_S, live_error
from sidecar.testing.fake_provider import ga_session, response_usage, transcription_usage
from sidecar.testing.fake_wire import Event, deep_merge, error, event, new_id, word_chunks

DEFAULT_TRANSCRIPT: Final = "Hello from the fake WebRTC call."


@dataclass(frozen=True)
class BadRequest(Exception):
    """A create request the provider refuses with a 4xx (`status`) and an OpenAI-shaped error body."""

    status: int
    code: str
    message: str
    param: str | None = None

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, param=self.param)


def error_body(code: str, message: str, *, type_: str = "invalid_request_error", param: str | None = None) -> Event:
    """OpenAI's HTTP error body: `{"error": {"message", "type", "code", "param"}}`."""
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


@dataclass(frozen=True)
class CreateRequest:
    """A create request as the provider understood it."""

    sdp: str
    #: The session configuration received (the `session` part or field; {} when none was sent).
    session: dict[str, Any]
    model: str | None


def _realtime_model(session: dict[str, Any], query_model: str | None) -> str | None:
    named = session.get("model")
    if isinstance(named, str) and named:
        return named
    if query_model:
        return query_model
    audio = session.get("audio")
    source = audio.get("input") if isinstance(audio, dict) else None
    transcription = source.get("transcription") if isinstance(source, dict) else None
    model = transcription.get("model") if isinstance(transcription, dict) else None
    return model if isinstance(model, str) and model else None


def _form_parts(content_type: str, body: bytes) -> dict[str, tuple[str, bytes]]:
    """multipart/form-data parts by name: (content type, payload). Raises BadRequest when unreadable."""
    head = b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n"
    message = BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not isinstance(message, EmailMessage) or not message.is_multipart():
        raise BadRequest(400, "invalid_multipart", "The multipart body could not be read.")
    parts: dict[str, tuple[str, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            parts[name] = (part.get_content_type(), payload)
    return parts


def _text(payload: bytes, what: str) -> str:
    try:
        return payload.decode()
    except UnicodeDecodeError as exc:
        raise BadRequest(400, "invalid_value", f"The {what} is not UTF-8 text.", what) from exc


def parse_realtime_create(content_type: str, body: bytes, *, query_model: str | None) -> CreateRequest:
    """`POST /v1/realtime/calls`: an `application/sdp` body or multipart `sdp` + `session`. Raises BadRequest."""
    kind = content_type.split(";", 1)[0].strip().lower()
    session: dict[str, Any] = {}
    if kind == "application/sdp":
        sdp = _text(body, "sdp")
    elif kind == "multipart/form-data":
        parts = _form_parts(content_type, body)
        if "sdp" not in parts:
            raise BadRequest(400, "missing_required_parameter", "Missing required parameter: 'sdp'.", "sdp")
        sdp = _text(parts["sdp"][1], "sdp")
        if "session" in parts:
            session = _json_object(parts["session"][1], "session")
    else:
        text = "Send the SDP offer as application/sdp or multipart/form-data (parts sdp and session)."
        raise BadRequest(400, "unsupported_content_type", text)
    if not sdp.strip():
        raise BadRequest(400, "missing_required_parameter", "Missing required parameter: 'sdp'.", "sdp")
    return CreateRequest(sdp=sdp, session=session, model=_realtime_model(session, query_model))


def _json_object(payload: bytes, what: str) -> dict[str, Any]:
    try:
        parsed = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(400, "invalid_json", f"The {what} is not valid JSON.", what) from exc
    if not isinstance(parsed, dict):
        raise BadRequest(400, "invalid_type", f"The {what} must be a JSON object.", what)
    return parsed


def parse_live_create(body: bytes) -> CreateRequest:
    """`POST /v1/live/sessions`: `{"session": {..., "model"}, "transport": {"type": "webrtc", "sdp"}}`.
    Raises BadRequest."""
    request = _json_object(body, "body")
    session = request.get("session")
    if not isinstance(session, dict):
        raise BadRequest(400, "missing_required_parameter", "Missing required parameter: 'session'.", "session")
    model = session.get("model")
    if not isinstance(model, str) or not model.strip():
        text = "Missing required parameter: 'session.model'."
        raise BadRequest(400, "missing_required_parameter", text, "session.model")
    transport = request.get("transport")
    if not isinstance(transport, dict) or transport.get("type") != "webrtc":
        text = "transport.type must be 'webrtc' (the WebSocket transport is GET /v1/live/sessions)."
        raise BadRequest(400, "invalid_value", text, "transport.type")
    sdp = transport.get("sdp")
    if not isinstance(sdp, str) or not sdp.strip():
        raise BadRequest(400, "missing_required_parameter", "Missing required parameter: 'transport.sdp'.", "sdp")
    return CreateRequest(sdp=sdp, session=session, model=model)


# ---- the sideband protocols -------------------------------------------------------------------------


@dataclass(frozen=True)
class CallReply:
    """What one client event produces: events for every sideband of the call (and the data channel), events
    for the sender only, and whether the call ends (after sending them)."""

    broadcast: list[Event] = field(default_factory=list)
    direct: list[Event] = field(default_factory=list)
    end: bool = False
    #: The client event as parsed (None when it was not a JSON object).
    received: Event | None = None


class CallProtocol(Protocol):
    """One call's sideband protocol state (sans-I/O)."""

    session: dict[str, Any]

    def opening(self) -> list[Event]:
        """The events a sideband gets as soon as it is attached."""
        ...

    def receive(self, message: str | bytes) -> CallReply:
        """Handle one client event from a sideband or the data channel; never raises."""
        ...


def _parse(message: str | bytes) -> dict[str, Any] | str:
    """The client event as a JSON object, or why not."""
    if isinstance(message, bytes):
        return "Binary frames are not supported; send JSON text."
    try:
        parsed = orjson.loads(message)
    except orjson.JSONDecodeError:
        return "The event is not valid JSON."
    return parsed if isinstance(parsed, dict) else "The event must be a JSON object."


class RealtimeCallProtocol:
    """A Realtime API call (`rtc_...`): the GA session it announces and the client events it relays."""

    def __init__(self, *, model: str | None, session: dict[str, Any]) -> None:
        transcription = session.get("type") == "transcription"
        self.model = model
        self.session = ga_session(model if not transcription else None, transcription=transcription)
        deep_merge(self.session, copy.deepcopy(session))  # updates must not change the session received
        #: Every client event received (parsed), from every sideband and the data channel.
        self.events: list[Event] = []
        self._handlers: dict[str, Callable[[Event], CallReply]] = {
            "session.update": self._update,
            "response.create": self._respond,
            "response.cancel": lambda parsed: CallReply(),
            "conversation.item.create": self._create_item,
            "output_audio_buffer.clear": lambda parsed: CallReply([event("output_audio_buffer.cleared")]),
        }

    def opening(self) -> list[Event]:
        return [event("session.created", session=self.session)]

    def receive(self, message: str | bytes) -> CallReply:
        parsed = _parse(message)
        if isinstance(parsed, str):
            code = "binary_not_supported" if isinstance(message, bytes) else "invalid_json"
            return CallReply(direct=[error(code, parsed)])
        self.events.append(parsed)
        handler = self._handlers.get(str(parsed.get("type")))
        if handler is None:
            text = f"Unknown event type: {parsed.get('type')!r}."
            return CallReply(
                direct=[error("unknown_event", text, client_event_id=parsed.get("event_id"))], received=parsed
            )
        return replace(handler(parsed), received=parsed)

    def _update(self, parsed: Event) -> CallReply:
        update = parsed.get("session")
        if not isinstance(update, dict):
            text = "`session` must be an object."
            return CallReply(direct=[error("invalid_value", text, client_event_id=parsed.get("event_id"))])
        deep_merge(self.session, update)
        return CallReply([event("session.updated", session=self.session)])

    def _respond(self, parsed: Event) -> CallReply:
        response: dict[str, Any] = {"id": new_id("resp"), "object": "realtime.response", "output": []}
        created = event("response.created", response={**response, "status": "in_progress", "usage": None})
        return CallReply([created, self.response_done(response_usage(), response=response)])

    def _create_item(self, parsed: Event) -> CallReply:
        raw = parsed.get("item")
        item = {"id": new_id("item"), **raw} if isinstance(raw, dict) else {"id": new_id("item")}
        previous = parsed.get("previous_item_id")
        return CallReply(
            [
                event("conversation.item.added", previous_item_id=previous, item=item),
                event("conversation.item.done", previous_item_id=previous, item=item),
            ]
        )

    def response_done(self, usage: dict[str, Any], *, response: dict[str, Any] | None = None) -> Event:
        """A `response.done` (status completed) carrying `usage`."""
        body = response or {"id": new_id("resp"), "object": "realtime.response", "output": []}
        return event("response.done", response={**body, "status": "completed", "usage": usage})

    def transcription_model(self) -> str:
        """The input transcription model the session names, or ""."""
        audio = self.session.get("audio")
        source = audio.get("input") if isinstance(audio, dict) else None
        transcription = source.get("transcription") if isinstance(source, dict) else None
        model = transcription.get("model") if isinstance(transcription, dict) else None
        return model if isinstance(model, str) else ""

    def transcription_completed(self, *, seconds: float, text: str, usage: dict[str, Any] | None) -> Event:
        """`conversation.item.input_audio_transcription.completed` with `usage` (default: what OpenAI reports
        for the session's transcription model, fake_provider's rule: tokens for `*-transcribe`, else a
        duration of `seconds`)."""
        return event(
            "conversation.item.input_audio_transcription.completed",
            item_id=new_id("item"),
            content_index=0,
            transcript=text,
            usage=usage if usage is not None else transcription_usage(self.transcription_model(), seconds),
        )


class LiveCallProtocol:
    """A GPT-Live WebRTC session: `session.started` on every attach, the Live client events it relays."""

    def __init__(self, *, call_id: str, session: dict[str, Any], created_at: float, transcript: str) -> None:
        self.model = str(session.get("model"))
        self.session: dict[str, Any] = {
            **copy.deepcopy(session),  # updates must not change the session received
            "id": call_id,
            "object": "live.session",
            "status": "active",
            "expires_at": int(created_at) + SESSION_TTL_S,
        }
        self.events: list[Event] = []
        #: The last cumulative usage reported (`session.usage.updated`), repeated by `session.closed`.
        self.usage: dict[str, Any] = {"seconds": 0}
        self._transcript = transcript
        self._handlers: dict[str, Callable[[Event], CallReply]] = {
            "session.update": self._update,
            "session.input_audio.mute": lambda p: self._ack("session.input_audio.muted", p),
            "session.input_audio.unmute": lambda p: self._ack("session.input_audio.unmuted", p),
            "response.create": self._respond,
            "response.item.create": lambda parsed: CallReply(),
            "session.close": self._close,
        }

    def opening(self) -> list[Event]:
        return [event("session.started", session=self.session)]

    def receive(self, message: str | bytes) -> CallReply:
        parsed = _parse(message)
        if isinstance(parsed, str):
            code = "binary_not_supported" if isinstance(message, bytes) else "invalid_json"
            return CallReply(direct=[live_error(code, parsed)])
        self.events.append(parsed)
        handler = self._handlers.get(str(parsed.get("type")))
        if handler is None:
            text = f"Unknown event type: {parsed.get('type')!r}."
            unknown = live_error("unknown_event", text, client_event_id=parsed.get("event_id"))
            return CallReply(direct=[unknown], received=parsed)
        return replace(handler(parsed), received=parsed)

    def _ack(self, type_: str, parsed: Event) -> CallReply:
        return CallReply([event(type_, client_event_id=_ref(parsed))])

    def _update(self, parsed: Event) -> CallReply:
        ref = parsed.get("event_id")
        update = parsed.get("session")
        if not isinstance(update, dict):
            return CallReply(direct=[live_error("invalid_value", "`session` must be an object.", client_event_id=ref)])
        if "model" in update:
            text = "session.model is immutable after startup."
            error_event = live_error("immutable_parameter", text, client_event_id=ref, param="session.model")
            return CallReply(direct=[error_event])
        deep_merge(self.session, update)
        return CallReply([event("session.updated", session=self.session, client_event_id=_ref(parsed))])

    def _respond(self, parsed: Event) -> CallReply:
        events = [
            event("session.output_transcript.delta", delta=chunk, start_ms=100 * i, end_ms=100 * (i + 1))
            for i, chunk in enumerate(word_chunks(self._transcript))
        ]
        return CallReply(events)

    def _close(self, parsed: Event) -> CallReply:
        return CallReply([self.closed("close_requested", client_event_id=_ref(parsed))], end=True)

    def usage_updated(self, usage: dict[str, Any]) -> Event:
        """`session.usage.updated` with `usage` (a SessionUsage: cumulative `seconds`, optional breakdown)."""
        self.usage = usage
        return event("session.usage.updated", usage=usage)

    def closed(self, reason: str, *, client_event_id: str | None = None) -> Event:
        """`session.closed` with the final snapshot and the last usage reported."""
        return event(
            "session.closed", reason=reason, session=self.session, usage=self.usage, client_event_id=client_event_id
        )


def _ref(parsed: Event) -> str | None:
    ref = parsed.get("event_id")
    return ref if isinstance(ref, str) else None
