"""The fake provider's realtime translation (`/v1/realtime/translations?model=...`): a sans-I/O state machine,
served by FakeProvider.

The protocol as the `openai` SDK's `types/realtime/realtime_translation_*` defines it. The model is in the
URL's query (required: refused before the upgrade without it); the server opens with `session.created`
(`type: translation`, the model, output language `es`). Then:

    session.update                     -> session.updated (merged); naming `model` or `type` is refused
    session.input_audio_buffer.append  decoded (base64) and counted as 24 kHz PCM16 (48000 bytes a second);
                                       each complete 200 ms engine frame (9600 bytes) is answered with
                                       session.input_transcript.delta (only when audio.input.transcription
                                       is configured), session.output_transcript.delta and
                                       session.output_audio.delta, with `elapsed_ms`
    session.close                      -> session.closed, then close 1000
    anything else                      -> `unknown_event`

Errors are the Realtime API's (`error.event_id`). The refusal of a `session.update` naming the model
DELIBERATELY names the provider's key, host:port and deployment (scrub bait, as fake_live.py's).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from fractions import Fraction
from typing import Any, Final

import orjson

from sidecar.testing.fake_wire import (
    PCM16_BYTES_PER_SECOND,
    Event,
    FakeSession,
    Faults,
    Reply,
    append_faults,
    appended_bytes,
    deep_merge,
    error,
    event,
    new_id,
)

#: The engine's frame: 200 ms of 24 kHz PCM16.
FRAME_BYTES: Final = PCM16_BYTES_PER_SECOND // 5
FRAME_MS: Final = 200
#: The translated transcript the fake speaks, one word per engine frame (cycling).
DEFAULT_TRANSLATION: Final = "El rápido zorro marrón salta sobre el perro perezoso."
DEFAULT_LANGUAGE: Final = "es"
SESSION_TTL_S: Final = 3600


def translation_session(model: str | None, *, now: float) -> dict[str, Any]:
    """The session `session.created` announces (RealtimeTranslationSession)."""
    return {
        "id": new_id("sess"),
        "object": "realtime.translation_session",
        "type": "translation",
        "model": model,
        "expires_at": int(now) + SESSION_TTL_S,
        "audio": {
            "input": {"transcription": None, "noise_reduction": None},
            "output": {"language": DEFAULT_LANGUAGE},
        },
    }


class TranslationConversation:
    """One translation connection's protocol state. Records into its FakeSession; reads no clock."""

    def __init__(self, record: FakeSession, *, api_key: str, host_port: str, transcript: str, translation: str) -> None:
        self.record = record
        record.protocol = "translation"
        self._api_key = api_key
        self._host_port = host_port
        self._source = transcript.split(" ")
        self._target = translation.split(" ")
        self._pending = 0  # decoded bytes not yet a whole engine frame
        self._frames = 0
        self._appends = 0
        self._handlers: dict[str, Callable[[Event, Faults], Reply]] = {
            "session.update": self._update,
            "session.input_audio_buffer.append": self._append,
            "session.close": self._close,
        }

    def opening(self, *, now: float) -> list[Event]:
        """`session.created`, the first server event of every connection."""
        self.record.session = translation_session(self.record.handshake.query.get("model"), now=now)
        return [event("session.created", session=self.record.session)]

    def receive(self, message: str | bytes, faults: Faults, *, now: float) -> Reply:
        """Handle one client frame; never raises on bad input."""
        if isinstance(message, bytes):
            self.record.binary_frames += 1
            return Reply([error("binary_not_supported", "Binary frames are not supported; send JSON text.")])
        try:
            parsed = orjson.loads(message)
        except orjson.JSONDecodeError:
            return Reply([error("invalid_json", "The event is not valid JSON.")])
        if not isinstance(parsed, dict):
            return Reply([error("invalid_json", "The event must be a JSON object.")])
        if faults.record_events:
            self.record.events.append(parsed)
        handler = self._handlers.get(str(parsed.get("type")))
        if handler is None:
            text = f"Unknown event type: {parsed.get('type')!r}."
            return Reply([error("unknown_event", text, client_event_id=parsed.get("event_id"))])
        return handler(parsed, faults)

    def _update(self, parsed: Event, faults: Faults) -> Reply:
        """Merge the update; `model` and `type` are fixed at creation (the model refusal is leaky)."""
        ref = parsed.get("event_id")
        update = parsed.get("session")
        if not isinstance(update, dict):
            return Reply([error("invalid_value", "`session` must be an object.", client_event_id=ref)])
        if "model" in update:
            text = (
                f"Unknown parameter 'session.model' ({update['model']!r}) for deployment "
                f"{self.record.session.get('model')} at {self._host_port} (key {self._api_key})."
            )
            return Reply([error("unknown_parameter", text, client_event_id=ref)])
        if "type" in update:
            return Reply([error("unknown_parameter", "Unknown parameter 'session.type'.", client_event_id=ref)])
        deep_merge(self.record.session, update)
        return Reply([event("session.updated", session=self.record.session)])

    def _append(self, parsed: Event, faults: Faults) -> Reply:
        """Count decoded audio; answer each complete engine frame (or, benchmark mode, each append)."""
        index = self._appends
        self._appends += 1
        size = appended_bytes(parsed.get("audio"))
        if size is None:
            ref = parsed.get("event_id")
            events = [error("invalid_base64", "Invalid 'audio': not valid base64.", client_event_id=ref)]
            return append_faults(events, faults, self._appends)
        self.record.audio_bytes += size
        self.record.audio_seconds += Fraction(size, PCM16_BYTES_PER_SECOND)
        if faults.reply_each_append:
            events = [event("session.input_transcript.delta", delta=str(parsed.get("event_id", index)))]
        else:
            events = self._frames_done(size)
        return append_faults(events, faults, self._appends)

    def _frames_done(self, size: int) -> list[Event]:
        """The deltas of every engine frame `size` more bytes complete."""
        self._pending += size
        events: list[Event] = []
        while self._pending >= FRAME_BYTES:
            self._pending -= FRAME_BYTES
            events += self._frame_events()
        return events

    def _frame_events(self) -> list[Event]:
        index, self._frames = self._frames, self._frames + 1
        elapsed = index * FRAME_MS
        events: list[Event] = []
        if self._transcribing():
            word = self._source[index % len(self._source)]
            events.append(event("session.input_transcript.delta", delta=f"{word} ", elapsed_ms=elapsed))
        word = self._target[index % len(self._target)]
        events.append(event("session.output_transcript.delta", delta=f"{word} ", elapsed_ms=elapsed))
        audio = base64.b64encode(b"\x00" * FRAME_BYTES).decode()
        events.append(
            event(
                "session.output_audio.delta",
                delta=audio,
                elapsed_ms=elapsed,
                format="pcm16",
                sample_rate=24000,
                channels=1,
            )
        )
        return events

    def _transcribing(self) -> bool:
        """Whether the session asks for source transcript deltas (`audio.input.transcription`)."""
        audio = self.record.session.get("audio")
        audio_input = audio.get("input") if isinstance(audio, dict) else None
        return isinstance(audio_input, dict) and isinstance(audio_input.get("transcription"), dict)

    def _close(self, parsed: Event, faults: Faults) -> Reply:
        """`session.closed`, then the connection closes normally."""
        return Reply([event("session.closed")], close=(1000, ""))
