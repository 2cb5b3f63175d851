"""Realtime translation (`/v1/realtime/translations?model=...`) as a pure session core.

The protocol, as the `openai` SDK's `types/realtime/realtime_translation_*` defines it: the model is in the
URL query; the client sends only `session.update` (the session `type` and `model` are fixed at creation:
RealtimeTranslationSessionUpdateRequest has neither), `session.input_audio_buffer.append` (`audio`: base64
24 kHz PCM16 mono; "Unsupported websocket audio formats return a validation error") and `session.close`.
The server sends `session.created`, `session.updated`, `session.input_transcript.delta`,
`session.output_transcript.delta`, `session.output_audio.delta`, `session.closed` and `error`
(RealtimeErrorEvent: the Realtime API's error shape, `protocol.error_event`).

Billing (issue 15): per second of input audio, counted from the appended bytes at 24 kHz PCM16 (48000 bytes
a second) by the same meter as /v1/realtime (metering.SessionMeter), to the microsecond.

The sidecar forwards only what the API defines: any other client event is answered `unknown_event` and not
sent upstream; a session update may not name another model (`model_mismatch`) nor an input format other
than audio/pcm at 24000 Hz (`invalid_audio_format`), so the meter's byte rate is the provider's.

Pure: no I/O, no clock; each client frame is parsed once, upstream frames only when they may be
`session.closed` (the rest, audio and transcript deltas, are only scrubbed).
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final

from sidecar import audio_formats, protocol
from sidecar.catalog import TRANSLATION_ENDPOINT, Route
from sidecar.metering import Figures, Rounding, SessionMeter
from sidecar.pricing import Price
from sidecar.surfaces.core import PaidAsItGoes, Reply, unchanged

UPDATE: Final = "session.update"
APPEND: Final = "session.input_audio_buffer.append"
CLOSE: Final = "session.close"
CLOSED: Final = "session.closed"
#: Every client event the translation API defines (RealtimeTranslationClientEvent).
CLIENT_EVENTS: Final = frozenset({UPDATE, APPEND, CLOSE})
#: The refusal of source-language transcription (`session.audio.input.transcription`, a transcription model run
#: beside the translation): the provider reports no usage for it (only `session.input_transcript.delta`), so it
#: cannot be priced at its model's price (a token-priced transcriber has no tokens to count) nor its model
#: authorized as billed: refused, never relayed unbilled (`transcription: null` is fine).
NO_TRANSCRIPTION: Final = "transcription_not_supported"
NO_TRANSCRIPTION_MESSAGE: Final = (
    "This gateway does not support source-language transcription on realtime translation: the provider reports "
    "no usage for it, so it cannot be billed. Leave session.audio.input.transcription unset."
)
_CLOSED_TYPE: Final = f'"{CLOSED}"'  # the only upstream event parsed (after this cheap check)


class TranslationSession(PaidAsItGoes):
    """The sidecar's view of one realtime translation session (implements core.SurfaceCore)."""

    __slots__ = ("_client_closing", "_closed", "_ended_at", "_public", "_scrub", "_upstream_model", "meter")

    def __init__(
        self,
        *,
        public_model: str,
        upstream_model: str,
        price: Price,
        scrub: Callable[[str], str] = unchanged,
        rounding: Rounding = "exact",
        increment: Decimal = Decimal(1),
    ) -> None:
        """A session of `public_model` relayed to a deployment named `upstream_model` (in the upstream URL's
        query), billed at the time `price`. `scrub` is the deployment's scrubber (scrub.Scrubber.text).
        Raises ValueError for a bad rounding or increment (metering.SessionMeter)."""
        self._public = public_model
        self._upstream_model = upstream_model
        self._scrub = scrub
        self._ended_at: int | None = None
        self._closed = False
        self._client_closing = False
        self.meter = SessionMeter(price, rounding=rounding, increment=increment)

    @property
    def route(self) -> Route:
        return TRANSLATION_ENDPOINT

    @property
    def client_closing(self) -> bool:
        """True once the client sent `session.close` (core.SurfaceCore.client_closing)."""
        return self._client_closing

    @property
    def closed_by_provider(self) -> bool:
        """Whether the provider has sent `session.closed`."""
        return self._closed

    def error(self, code: str, message: str, *, error_type: str = "invalid_request_error") -> str:
        """A translation `error` event (the Realtime API's shape)."""
        return protocol.error_event(code, message, error_type=error_type)

    def opening(self) -> tuple[str, ...]:
        """Nothing: the model travels in the upstream URL's query."""
        return ()

    # ---- client -> upstream -------------------------------------------------------------------

    def on_client_text(self, text: str, *, now: int) -> Reply:
        """Decide what one client text frame becomes. Never raises."""
        try:
            event = protocol.loads(text)
        except protocol.JSONDecodeError:
            return Reply(None, protocol.error_event("invalid_json", "The event is not valid JSON."))
        if not isinstance(event, dict):
            return Reply(None, protocol.error_event("invalid_event", "An event must be a JSON object."))
        kind = event.get("type")
        if kind == APPEND:
            audio = event.get("audio")
            if isinstance(audio, str) and self.meter.on_append(audio):
                return Reply(text, None)
            message = f"{APPEND} audio is not valid base64."
            return Reply(None, protocol.error_event("invalid_base64", message, ref=event.get("event_id")))
        if kind == UPDATE:
            return self._on_update(event)
        if kind == CLOSE:
            self._client_closing = True
            return Reply(text, None)
        name = (kind if isinstance(kind, str) else repr(kind))[:64]  # the client's own text, bounded
        message = (
            f"The realtime translation API has no client event {name!r}; it takes {', '.join(sorted(CLIENT_EVENTS))}."
        )
        return Reply(None, protocol.error_event("unknown_event", message, ref=event.get("event_id")))

    def _on_update(self, event: dict[str, Any]) -> Reply:
        ref = event.get("event_id")
        session = event.get("session")
        if not isinstance(session, dict):
            return Reply(protocol.dumps(event), None)  # the provider answers a malformed update itself
        refusal = self._refusal(session)
        if refusal is not None:
            return Reply(None, protocol.error_event(*refusal, ref=ref))
        if "model" in session:
            session["model"] = self._upstream_model
        return Reply(protocol.dumps(event), None)

    def _refusal(self, session: dict[str, Any]) -> tuple[str, str] | None:
        """(error code, message) when this session update may not be forwarded, else None."""
        if "model" in session and session["model"] != self._public:
            return (
                "model_mismatch",
                f"This session is for model {self._public}; a session.update may not name another model.",
            )
        try:
            rate = audio_formats.requested(session)
        except audio_formats.FormatRefused as exc:
            return "invalid_audio_format", str(exc)
        if rate is not None and rate != audio_formats.PCM_BYTES_PER_SECOND:
            return "invalid_audio_format", "Realtime translation input audio is audio/pcm at 24000 Hz."
        if protocol.dig(session, "audio", "input", "transcription") is not None:
            return NO_TRANSCRIPTION, NO_TRANSCRIPTION_MESSAGE
        return None

    # ---- upstream -> client -------------------------------------------------------------------

    def on_upstream_text(self, text: str, *, now: int) -> str:
        """The text to relay for one upstream frame, scrubbed (the deployment name shown as the public one)."""
        if not self._closed and _CLOSED_TYPE in text:
            try:
                event = protocol.loads(text)
            except protocol.JSONDecodeError:
                event = None
            if isinstance(event, dict) and event.get("type") == CLOSED:
                self._closed = True
                self.on_end(now=now)
        return self._scrub(text)

    # ---- the end and the figures --------------------------------------------------------------

    def on_end(self, *, now: int) -> None:
        """The session ended (metering by audio needs no time; recorded for the driver)."""
        if self._ended_at is None:
            self._ended_at = now

    def figures(self, *, now: int) -> Figures:
        """The cumulative figures: input audio seconds from the appended bytes, priced per second/minute."""
        return self.meter.snapshot()


if TYPE_CHECKING:
    from sidecar.surfaces.core import SurfaceCore

    def _implements(core: TranslationSession) -> SurfaceCore:  # mypy checks TranslationSession against the interface
        return core
