"""The fake provider's GPT-Live (`/v1/live/sessions`): a sans-I/O state machine, served by FakeProvider.

The protocol as the `openai` SDK's `types/live` defines it. No query on the URL; the client's first message
must be `session.start` with a non-empty `session.model` (anything else is answered with an
`invalid_session_start` error and the connection is closed with 1008, as LiteLLM's proxy does); the server
answers `session.started` with the session (`id`, `model`, `status: active`, `expires_at`) before anything
else. Then:

    session.input_audio.append    decoded (base64) and counted at the startup format (PCM16 24 kHz unless
                                  `session.audio.format` says otherwise); invalid base64 -> `invalid_base64`
    session.input_audio.mute      -> session.input_audio.muted (audio still counted: the provider hears
    session.input_audio.unmute    -> session.input_audio.unmuted   silence, the session is still billed)
    session.update                -> session.updated (merged); naming `model` is refused (immutable)
    response.create               -> session.output_transcript.delta and session.output_audio.delta pairs
    response.item.create          accepted silently
    session.close                 -> session.closed (reason `close_requested`, final usage), then close 1000
    session.start (again)         -> `session_already_started`
    anything else                 -> `unknown_event`

`session.usage.updated` carries the cumulative billable seconds on the provider's clock (whole seconds,
each started second counted, from `session.started`): after every Nth append with
`Faults.usage_every_appends`, or on demand (`FakeProvider.report_usage`). Errors are in the Live shape:
`error.client_event_id` (not `event_id`), and `client_event_id` on the event too.

The refusal of a `session.update` naming the model DELIBERATELY names the provider's key, host:port and
deployment, so that relay tests can prove the sidecar scrubs them (a sidecar forwards such an update when
it names the session's own model, rewritten to the deployment's name).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any, Final

import orjson

from sidecar.testing.fake_wire import (
    G711_BYTES_PER_SECOND,
    PCM16_BYTES_PER_SECOND,
    Event,
    FakeSession,
    Faults,
    Reply,
    append_faults,
    appended_bytes,
    deep_merge,
    event,
    new_id,
    word_chunks,
)

#: How long a session may last (`expires_at` = start + this; the fake never expires one).
SESSION_TTL_S: Final = 3600
#: Silent PCM16 24 kHz per `session.output_audio.delta` (100 ms).
OUTPUT_AUDIO_CHUNK: Final = b"\x00" * 4800
INVALID_START: Final = "invalid_session_start"
_G711: Final = frozenset({"audio/pcmu", "audio/pcma"})


def live_error(code: str, message: str, *, client_event_id: Any = None, param: str | None = None) -> Event:
    """A GPT-Live `error` event (types/live/error_event.py)."""
    ref = client_event_id if isinstance(client_event_id, str) else None
    detail = {"type": "invalid_request_error", "code": code, "message": message, "param": param}
    return event("error", error={**detail, "client_event_id": ref}, client_event_id=ref)


def _bytes_per_second(session: dict[str, Any]) -> int:
    """The startup input format's byte rate (types/live/audio_format.py): PCM16 at its rate, G.711 8000."""
    audio = session.get("audio")
    fmt = audio.get("format") if isinstance(audio, dict) else None
    if not isinstance(fmt, dict):
        return PCM16_BYTES_PER_SECOND
    rate = fmt.get("rate")
    rate = rate if isinstance(rate, int) and not isinstance(rate, bool) and rate > 0 else None
    if fmt.get("type") in _G711:
        return rate or G711_BYTES_PER_SECOND
    return 2 * rate if rate else PCM16_BYTES_PER_SECOND


class LiveConversation:
    """One GPT-Live connection's protocol state. Records into its FakeSession; reads no clock (`now` is passed)."""

    def __init__(self, record: FakeSession, *, api_key: str, host_port: str, transcript: str) -> None:
        self.record = record
        record.protocol = "live"
        self._api_key = api_key
        self._host_port = host_port
        self._transcript = transcript
        self._started_at: float | None = None
        self._appends = 0
        #: Whether the client has muted its input (`session.input_audio.mute` without a later unmute).
        self.muted = False
        self._handlers: dict[str, Callable[[Event, Faults, float], Reply]] = {
            "session.input_audio.append": self._append,
            "session.input_audio.mute": self._mute,
            "session.input_audio.unmute": self._unmute,
            "session.update": self._update,
            "response.create": self._respond,
            "response.item.create": self._accept,
            "session.close": self._close,
            "session.start": self._start_again,
        }

    @property
    def started(self) -> bool:
        """Whether `session.started` has been sent."""
        return self._started_at is not None

    def opening(self, *, now: float) -> list[Event]:
        """Nothing: GPT-Live waits for the client's `session.start`."""
        return []

    def receive(self, message: str | bytes, faults: Faults, *, now: float) -> Reply:
        """Handle one client frame; never raises on bad input."""
        if isinstance(message, bytes):
            self.record.binary_frames += 1
            return self._bad_frame("binary_not_supported", "Send JSON text events.")
        try:
            parsed = orjson.loads(message)
        except orjson.JSONDecodeError:
            return self._bad_frame("invalid_json", "The event is not valid JSON.")
        if not isinstance(parsed, dict):
            return self._bad_frame("invalid_json", "The event must be a JSON object.")
        if faults.record_events:
            self.record.events.append(parsed)
        if self._started_at is None:
            return self._start(parsed, now)
        handler = self._handlers.get(str(parsed.get("type")))
        if handler is None:
            text = f"Unknown event type: {parsed.get('type')!r}."
            return Reply([live_error("unknown_event", text, client_event_id=parsed.get("event_id"))])
        return handler(parsed, faults, now)

    # ---- usage ----------------------------------------------------------------------------------

    def billable_seconds(self, *, now: float) -> int:
        """Cumulative billable seconds: whole seconds from `session.started`, each started second counted."""
        if self._started_at is None:
            return 0
        return max(0, math.ceil(now - self._started_at))

    def usage_event(self, *, now: float) -> Event:
        """A `session.usage.updated` with the cumulative seconds now (recorded in `reported_seconds`)."""
        seconds = self.billable_seconds(now=now)
        self.record.reported_seconds.append(seconds)
        return event("session.usage.updated", usage={"seconds": seconds})

    # ---- the first message ------------------------------------------------------------------------

    def _bad_frame(self, code: str, text: str) -> Reply:
        """Before `session.started` a bad frame is an invalid start; after it, an error event."""
        if self._started_at is None:
            return _invalid_start(None)
        return Reply([live_error(code, text)])

    def _start(self, parsed: Event, now: float) -> Reply:
        session = parsed.get("session")
        model = session.get("model") if isinstance(session, dict) else None
        if parsed.get("type") != "session.start" or not isinstance(model, str) or not model.strip():
            return _invalid_start(parsed.get("event_id"))
        assert isinstance(session, dict)  # model came from it
        self._started_at = now
        self.record.session = {
            **session,
            "id": new_id("sess"),
            "object": "live.session",
            "model": model,
            "status": "active",
            "expires_at": int(now) + SESSION_TTL_S,
        }
        started = event("session.started", session=self.record.session, client_event_id=parsed.get("event_id"))
        return Reply([started])

    def _start_again(self, parsed: Event, faults: Faults, now: float) -> Reply:
        text = "The session has already started."
        return Reply([live_error("session_already_started", text, client_event_id=parsed.get("event_id"))])

    # ---- after the start ----------------------------------------------------------------------------

    def _append(self, parsed: Event, faults: Faults, now: float) -> Reply:
        """Count decoded audio (invalid base64 answered and not counted), then usage and faults."""
        index = self._appends
        self._appends += 1
        size = appended_bytes(parsed.get("audio"))
        if size is None:
            ref = parsed.get("event_id")
            events = [live_error("invalid_base64", "Invalid 'audio': not valid base64.", client_event_id=ref)]
        else:
            self.record.audio_bytes += size
            self.record.audio_seconds += Fraction(size, _bytes_per_second(self.record.session))
            events = [self._echo(parsed, index, now)] if faults.reply_each_append else []
        every = faults.usage_every_appends
        if every is not None and every > 0 and self._appends % every == 0:
            events.append(self.usage_event(now=now))
        return append_faults(events, faults, self._appends)

    def _echo(self, parsed: Event, index: int, now: float) -> Event:
        """Benchmark mode: an input transcript delta carrying the append's event_id (or index)."""
        ms = self._ms(now)
        delta = str(parsed.get("event_id", index))
        return event("session.input_transcript.delta", delta=delta, start_ms=ms, end_ms=ms)

    def _ms(self, now: float) -> int:
        return int((now - (self._started_at or now)) * 1000)

    def _accept(self, parsed: Event, faults: Faults, now: float) -> Reply:
        """Recorded, unanswered (a real server answers on the delegated Responses backend)."""
        return Reply([])

    def _mute(self, parsed: Event, faults: Faults, now: float) -> Reply:
        self.muted = True
        return Reply([event("session.input_audio.muted", client_event_id=parsed.get("event_id"))])

    def _unmute(self, parsed: Event, faults: Faults, now: float) -> Reply:
        self.muted = False
        return Reply([event("session.input_audio.unmuted", client_event_id=parsed.get("event_id"))])

    def _update(self, parsed: Event, faults: Faults, now: float) -> Reply:
        """Merge the update; `session.model` is immutable (refused with the leaky message)."""
        ref = parsed.get("event_id")
        update = parsed.get("session")
        if not isinstance(update, dict):
            return Reply([live_error("invalid_value", "`session` must be an object.", client_event_id=ref)])
        if "model" in update:
            text = (
                f"session.model is immutable after startup: {update['model']!r} was sent to deployment "
                f"{self.record.session.get('model')} at {self._host_port} (key {self._api_key})."
            )
            return Reply([live_error("immutable_parameter", text, client_event_id=ref, param="session.model")])
        deep_merge(self.record.session, update)
        return Reply([event("session.updated", session=self.record.session, client_event_id=ref)])

    def _respond(self, parsed: Event, faults: Faults, now: float) -> Reply:
        """The transcript in chunks, each with a chunk of (silent) output audio."""
        ms = self._ms(now)
        audio = base64.b64encode(OUTPUT_AUDIO_CHUNK).decode()
        events: list[Event] = []
        for chunk in word_chunks(self._transcript):
            events.append(event("session.output_transcript.delta", delta=chunk, start_ms=ms, end_ms=ms + 100))
            events.append(event("session.output_audio.delta", delta=audio))
            ms += 100
        return Reply(events)

    def _close(self, parsed: Event, faults: Faults, now: float) -> Reply:
        """`session.closed` with the final usage, then the connection closes normally."""
        seconds = self.billable_seconds(now=now)
        self.record.reported_seconds.append(seconds)
        closed = event(
            "session.closed",
            reason="close_requested",
            session=self.record.session,
            usage={"seconds": seconds},
            client_event_id=parsed.get("event_id"),
        )
        return Reply([closed], close=(1000, ""))


def _invalid_start(ref: Any) -> Reply:
    """The refusal of a first message that is not a usable `session.start`: an error, then close 1008."""
    text = "The first message must be session.start with a non-empty session.model."
    return Reply([live_error(INVALID_START, text, client_event_id=ref)], close=(1008, "invalid session.start"))
