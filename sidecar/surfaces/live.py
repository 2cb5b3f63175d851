"""GPT-Live (`/v1/live/sessions`) as a pure session core: its first message, model pinning, and metering by
session time on the sidecar's clock.

The protocol, as the `openai` SDK's `types/live` defines it: no query; the client's first message is
`session.start` with `session.model` and the startup configuration (SessionStartEvent); the server answers
`session.started` with the session id before anything else (SessionStartedEvent). Client events include
`session.input_audio.append` (`audio`: base64 raw audio in the startup format, PCM16 24 kHz by default),
`session.input_audio.mute` / `unmute`, `session.update` (the model is immutable: SessionUpdateConfig has no
`model`), `response.create`, `response.item.create` and `session.close`. The server sends
`session.usage.updated` (cumulative billable seconds: "Do not sum values across usage events"),
`session.closed` (reason, final usage) and `error` (ErrorEvent: `error.client_event_id`, not `event_id`).

Billing (issue 15): per second of session time, muted and silent time included, counted by the sidecar's
clock from the provider's `session.started` to the end of the session (the first of the provider's
`session.closed` and `on_end`). The provider's `session.usage.updated` seconds are recorded beside it for
reconciliation (the latest, never summed) and never billed. Audio bytes appended and the time muted (from
the client's mute to its unmute, or the end) are recorded too.

Pure: no I/O, no clock (`now` is the driver's monotonic nanoseconds); each client frame is parsed once,
upstream frames only when they can be a session event the meter reads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from math import isfinite
from typing import TYPE_CHECKING, Any, Final

import orjson

from sidecar import protocol
from sidecar.catalog import LIVE_ENDPOINT, Route
from sidecar.metering import Figures, Rounding, bill_time, decoded_length
from sidecar.pricing import Price
from sidecar.surfaces.core import NS_PER_SECOND, PaidAsItGoes, Reply, SessionClock, unchanged

START: Final = "session.start"
STARTED: Final = "session.started"
UPDATE: Final = "session.update"
APPEND: Final = "session.input_audio.append"
MUTE: Final = "session.input_audio.mute"
UNMUTE: Final = "session.input_audio.unmute"
USAGE: Final = "session.usage.updated"
CLOSE: Final = "session.close"
CLOSED: Final = "session.closed"
#: The refusal of a first message that is not a usable `session.start`: LiteLLM's own code for it
#: (litellm/proxy/proxy_server.py `_reject_invalid_live_session_start`, close 1008).
INVALID_START: Final = "invalid_session_start"
START_MESSAGE: Final = "The first message must be a session.start JSON object with a non-empty session.model."
#: The refusal of a configuration that would run models the sidecar cannot authorize and meter exactly: a
#: Responses or Decisions delegation (`session.delegation`, types/live/session_config.py) or Decision triggers
#: (`session.triggers`). Their usage arrives as token usage of another model inside `response.event` /
#: `decision.event`, and tool calls (web search, file search, code interpreter containers, image generation)
#: are billed per call, not in tokens: not metered, so refused, never relayed unbilled.
NO_DELEGATION: Final = "delegation_not_supported"
NO_DELEGATION_MESSAGE: Final = (
    "This gateway does not support GPT-Live delegation to a Responses or Decisions backend, nor transcript "
    "triggers: their models and tool calls cannot be authorized and billed here. Use client delegation "
    '(session.delegation.type "client") and run tools in your application.'
)

# Upstream frames that may be an event the meter reads; any other is scrubbed and relayed unparsed.
_UPSTREAM_READS: Final = (f'"{STARTED}"', f'"{USAGE}"', f'"{CLOSED}"')
# Bytes per second of each startup input format (types/live/audio_format.py): PCM16 is 2 bytes a sample,
# G.711 one. The Live default is PCM16 at 24 kHz.
_DEFAULT_BPS: Final = 48000
_SECONDS_PLACES: Final = 6
#: The usage event's unit for session time, by the price's unit: never plain `second`, which is audio time
#: (docs/api.md, "Metering and billing").
UNITS: Final = {"second": "session_second", "minute": "session_minute", "token": "token"}


def error_event(code: str, message: str, *, ref: object = None, error_type: str = "invalid_request_error") -> str:
    """A GPT-Live `error` server event (types/live/error_event.py), serialised. `ref` is the client event_id
    it answers, carried as `client_event_id` (GPT-Live's name for it) in the event and in its error."""
    client_ref = ref if isinstance(ref, str) else None
    return protocol.dumps(
        {
            "type": "error",
            "event_id": protocol.event_id(),
            "error": {
                "type": error_type,
                "code": code,
                "message": message,
                "param": None,
                "client_event_id": client_ref,
            },
            "client_event_id": client_ref,
        }
    )


@dataclass(frozen=True, slots=True)
class LiveStart:
    """A client's valid first message: the public model it names and the parsed `session.start` event."""

    model: str
    event: Mapping[str, Any]


def parse_start(text: str | bytes) -> LiveStart | Reply:
    """The client's first message as a LiveStart, or the Reply that refuses it: an `invalid_session_start`
    error event for the client, nothing upstream, and `ending` set (the session ends, as LiteLLM ends it).

    The driver resolves and authorizes `LiveStart.model` (catalog route /v1/live/sessions) before it
    connects the upstream. Never raises.
    """
    try:
        event = protocol.loads(text)
    except protocol.JSONDecodeError:
        event = None
    session = event.get("session") if isinstance(event, dict) and event.get("type") == START else None
    model = session.get("model") if isinstance(session, dict) else None
    if not isinstance(model, str) or not model.strip() or not isinstance(event, dict):
        ref = event.get("event_id") if isinstance(event, dict) else None
        return Reply(None, error_event(INVALID_START, START_MESSAGE, ref=ref), ending=INVALID_START)
    if isinstance(session, dict) and delegates(session):
        return Reply(
            None, error_event(NO_DELEGATION, NO_DELEGATION_MESSAGE, ref=event.get("event_id")), ending=NO_DELEGATION
        )
    return LiveStart(model=model, event=event)


def delegates(session: Mapping[str, Any]) -> bool:
    """True when a session.start / session.update configuration hands work to models the sidecar cannot
    authorize and meter: a delegation other than `client` (Responses, Decisions), or any transcript trigger.
    `delegation: null` and `triggers: []` (none) are fine."""
    delegation = session.get("delegation")
    if delegation is not None and not (isinstance(delegation, dict) and delegation.get("type") == "client"):
        return True
    triggers = session.get("triggers")
    return triggers is not None and triggers != []


def input_bytes_per_second(start: LiveStart) -> int:
    """The byte rate of the startup input audio format (`session.audio.format`), PCM16 24 kHz by default."""
    audio_format = protocol.dig(start.event, "session", "audio", "format")
    if not isinstance(audio_format, dict):
        return _DEFAULT_BPS
    rate = audio_format.get("rate")
    rate = rate if isinstance(rate, int) and not isinstance(rate, bool) and rate > 0 else None
    if audio_format.get("type") == "audio/pcm":
        return 2 * (rate or 24000)
    if audio_format.get("type") in ("audio/pcmu", "audio/pcma"):
        return rate or 8000
    return _DEFAULT_BPS


class LiveSession(PaidAsItGoes):
    """The sidecar's view of one GPT-Live session (implements core.SurfaceCore)."""

    __slots__ = (
        "_audio_bytes",
        "_bps",
        "_breakdown",
        "_client_closing",
        "_clock",
        "_closed_reason",
        "_increment",
        "_muted_ns",
        "_muted_since",
        "_price",
        "_provider_seconds",
        "_public",
        "_rounding",
        "_scrub",
        "_session_id",
        "_start",
        "_upstream_model",
        "_usage_events",
    )

    def __init__(
        self,
        start: LiveStart,
        *,
        upstream_model: str,
        price: Price,
        scrub: Callable[[str], str] = unchanged,
        rounding: Rounding = "exact",
        increment: Decimal = Decimal(1),
    ) -> None:
        """A session opened by `start` (its model already resolved to a deployment named `upstream_model`),
        billed at the time `price` with the rounding policy of metering.bill_time. `scrub` is the
        deployment's scrubber (scrub.Scrubber.text)."""
        self._start = start
        self._public = start.model
        self._upstream_model = upstream_model
        self._price = price
        self._rounding: Rounding = rounding
        self._increment = increment
        self._scrub = scrub
        self._bps = input_bytes_per_second(start)
        self._audio_bytes = 0
        self._clock = SessionClock()
        self._muted_since: int | None = None
        self._muted_ns = 0
        self._session_id: str | None = None
        self._provider_seconds: Decimal | None = None
        self._usage_events = 0
        #: The provider's latest active / paused breakdown of its seconds (SessionUsage, when it sends one).
        self._breakdown: dict[str, int] = {}
        self._closed_reason: str | None = None
        self._client_closing = False

    @property
    def route(self) -> Route:
        return LIVE_ENDPOINT

    @property
    def provider_session_id(self) -> str | None:
        """The session id of the provider's `session.started` (None before it)."""
        return self._session_id

    @property
    def provider_seconds(self) -> Decimal | None:
        """The provider's latest cumulative billable seconds (`session.usage.updated` / `session.closed`):
        recorded for reconciliation, never billed. None until it reports any."""
        return self._provider_seconds

    @property
    def client_closing(self) -> bool:
        """True once the client sent `session.close` (core.SurfaceCore.client_closing)."""
        return self._client_closing

    @property
    def closed_reason(self) -> str | None:
        """The reason of the provider's `session.closed`, None before it."""
        return self._closed_reason

    def answered(self, now: int) -> None:
        """A WebRTC call's session time starts at the provider's answer (`now`), not at a sideband's
        `session.started` (sidecar/calls/watch.py): the first start wins."""
        self._clock.start(now)

    def error(self, code: str, message: str, *, error_type: str = "invalid_request_error") -> str:
        """A GPT-Live `error` event (no client event to refer to)."""
        return error_event(code, message, error_type=error_type)

    def opening(self) -> tuple[str, ...]:
        """The client's `session.start`, its model rewritten to the deployment's name: sent upstream first."""
        event = dict(self._start.event)
        event["session"] = {**event["session"], "model": self._upstream_model}
        return (protocol.dumps(event),)

    # ---- client -> upstream -------------------------------------------------------------------

    def on_client_text(self, text: str, *, now: int) -> Reply:
        """Decide what one client text frame (after the first) becomes. Never raises."""
        try:
            event = protocol.loads(text)
        except protocol.JSONDecodeError:
            return Reply(None, error_event("invalid_json", "The event is not valid JSON."))
        if not isinstance(event, dict):
            return Reply(None, error_event("invalid_event", "An event must be a JSON object."))
        kind = event.get("type")
        if kind == APPEND:
            return self._on_append(text, event)
        if kind == MUTE:
            if self._muted_since is None:
                self._muted_since = now
        elif kind == UNMUTE:
            self._unmute(now)
        elif kind == UPDATE:
            return self._on_update(event)
        elif kind == CLOSE:
            self._client_closing = True
        elif kind == START:
            message = "This session has started; session.start is sent once, first."
            return Reply(None, error_event("session_already_started", message, ref=event.get("event_id")))
        return Reply(text, None)

    def _on_append(self, text: str, event: dict[str, Any]) -> Reply:
        audio = event.get("audio")
        count = decoded_length(audio) if isinstance(audio, str) else None
        if count is None:
            message = "session.input_audio.append audio is not valid base64."
            return Reply(None, error_event("invalid_base64", message, ref=event.get("event_id")))
        self._audio_bytes += count
        return Reply(text, None)

    def _on_update(self, event: dict[str, Any]) -> Reply:
        """The model is fixed at session.start: an update may name this session's public model (rewritten
        to the deployment's name) or none; naming another is refused and not forwarded."""
        session = event.get("session")
        if isinstance(session, dict) and delegates(session):
            return Reply(None, error_event(NO_DELEGATION, NO_DELEGATION_MESSAGE, ref=event.get("event_id")))
        if not isinstance(session, dict) or "model" not in session:
            return Reply(protocol.dumps(event), None)
        if session["model"] != self._public:
            message = f"This session is for model {self._public}; a session.update may not name another model."
            return Reply(None, error_event("model_mismatch", message, ref=event.get("event_id")))
        session["model"] = self._upstream_model
        return Reply(protocol.dumps(event), None)

    def _unmute(self, now: int) -> None:
        if self._muted_since is not None:
            self._muted_ns += max(0, now - self._muted_since)
            self._muted_since = None

    # ---- upstream -> client -------------------------------------------------------------------

    def on_upstream_text(self, text: str, *, now: int) -> str:
        """The text to relay for one upstream frame: session start, usage and close recorded, scrubbed."""
        reads = _UPSTREAM_READS
        if not (reads[0] in text or reads[1] in text or reads[2] in text):
            return self._scrub(text)
        try:
            event = protocol.loads(text)
        except protocol.JSONDecodeError:
            return self._scrub(text)
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == STARTED and self._clock.started_at is None:
            self._clock.start(now)
            session_id = protocol.dig(event, "session", "id")
            self._session_id = session_id if isinstance(session_id, str) else None
        elif kind == USAGE:
            self._record_usage(event.get("usage"))
        elif kind == CLOSED:
            self._record_usage(event.get("usage"))
            reason = event.get("reason")
            self._closed_reason = reason if isinstance(reason, str) else ""
            self.on_end(now=now)
        return self._scrub(text)

    def _record_usage(self, usage: object) -> None:
        """Keep the provider's latest cumulative seconds (a finite number >= 0; anything else is ignored) and
        its active / paused breakdown (SessionUsage.active_seconds / paused_seconds, whole seconds)."""
        if not isinstance(usage, dict):
            return
        seconds = usage.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            return
        if not isfinite(seconds) or seconds < 0:
            return
        self._provider_seconds = Decimal(repr(seconds)) if isinstance(seconds, float) else Decimal(seconds)
        self._usage_events += 1
        for name in ("active_seconds", "paused_seconds"):
            part = usage.get(name)
            if isinstance(part, int) and not isinstance(part, bool) and part >= 0:
                self._breakdown[name] = part

    # ---- the end and the figures --------------------------------------------------------------

    def on_end(self, *, now: int) -> None:
        """Metering stops at the first end (the provider's session.closed, or the driver's end)."""
        if self._clock.stop(now):
            self._unmute(now)

    def session_seconds(self, *, now: int) -> Fraction:
        """Session time on the sidecar's clock: from session.started to the end (or `now` while live)."""
        return self._clock.seconds(now=now)

    def muted_seconds(self, *, now: int) -> Fraction:
        """Time muted by the client (billed like any session time; recorded)."""
        muted = self._muted_ns
        if self._muted_since is not None:
            muted += max(0, now - self._muted_since)
        return Fraction(muted, NS_PER_SECOND)

    def figures(self, *, now: int) -> Figures:
        """The cumulative figures: quantity and cost from the session seconds; audio from the appends."""
        quantity, cost = bill_time(
            self.session_seconds(now=now), self._price, rounding=self._rounding, increment=self._increment
        )
        audio_seconds = Fraction(self._audio_bytes, self._bps)
        return Figures(
            unit=UNITS[self._price.unit],
            quantity=quantity,
            audio_seconds=Decimal(round(audio_seconds * 10**_SECONDS_PLACES)).scaleb(-_SECONDS_PLACES),
            audio_bytes=self._audio_bytes,
            input_tokens=0,
            output_tokens=0,
            cost_usd=cost,
            upstream_usage=self._upstream_json(),
        )

    def _upstream_json(self) -> str:
        """The provider's own figure, for reconciliation (metering.Figures.upstream_usage's keys)."""
        if not self._usage_events or self._provider_seconds is None:
            return ""
        seconds = self._provider_seconds
        shown = int(seconds) if seconds == seconds.to_integral_value() else float(seconds)
        return orjson.dumps({"duration_seconds": shown, "events": self._usage_events, **self._breakdown}).decode()


if TYPE_CHECKING:
    from sidecar.surfaces.core import SurfaceCore

    def _implements(core: LiveSession) -> SurfaceCore:  # mypy checks LiveSession against the interface
        return core
