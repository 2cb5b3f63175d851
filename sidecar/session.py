"""One relayed session as a pure state machine (no I/O, no clock: time is passed in).

Inputs: client text frames, upstream text frames. Outputs: what to send upstream, what to send the
client, and usage events. The relay (relay.py) moves the bytes; this module decides.

Per frame (the hot path) the session parses a client frame once with orjson and, for upstream frames,
parses only the few events it must read (errors, session events, usage-bearing events); every other
upstream frame is passed on as the same string after a substring check for secrets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final

from sidecar import audio_formats, protocol
from sidecar.auth import Principal, may_use
from sidecar.catalog import REALTIME_ENDPOINT, Deployment, RealtimeModel, Route, Transcriber
from sidecar.metering import Figures, SessionMeter
from sidecar.pinning import Pin
from sidecar.pricing import Price
from sidecar.scrub import REDACTED as REDACTED
from sidecar.scrub import Scrubber
from sidecar.scrub import secrets_of as secrets_of
from sidecar.surfaces.account import usage_event
from sidecar.surfaces.core import Reply as Reply
from sidecar.surfaces.core import WalkoutOutcome
from sidecar.usage import EventType, UsageEvent

# Substrings that mark an upstream frame the session must parse (cheap `in` checks on the raw text).
# An upstream frame with none of these is relayed without being parsed (checked unrolled: no generator).
_ERROR, _SESSION, _DONE, _COMPLETED = '"error"', "session.", "response.done", "transcription.completed"
# The bulk of upstream frames by count and bytes: deltas the session never reads (tokens come with response.done,
# transcription usage with its .completed). Recognised by their head, where OpenAI and Azure put `type`, so they
# skip the substring scans below (four scans of a 5 KB audio frame cost more than a startswith of all these).
_RELAY_ONLY: Final = tuple(
    f'{{"type":"{kind}"'
    for kind in (
        "response.output_audio.delta",
        "response.output_audio_transcript.delta",
        "conversation.item.input_audio_transcription.delta",
        "response.output_text.delta",
        "response.audio.delta",  # the beta names
        "response.audio_transcript.delta",
        "response.text.delta",
    )
)
# `response.created` is looked for only in a frame's first characters, where its `type` is (OpenAI and Azure
# send `type` first, `event_id` second): a bounded search, so a large audio frame costs no extra scan.
_CREATED, _HEAD = '"response.created"', 96
_NO_TRANSCRIBERS: Final[Mapping[str, Transcriber]] = MappingProxyType({})
_UNPRICED: Final = Price(unit="second")


class Session:
    """The sidecar's view of one relayed /v1/realtime session (implements surfaces.core.SurfaceCore: it reads
    no time, so `now` is accepted and ignored)."""

    def __init__(
        self,
        *,
        session_id: str,
        model: RealtimeModel,
        deployment: Deployment,
        principal: Principal,
        meter: SessionMeter,
        started_at: datetime,
        transcription: bool,
        pinned: Pin | None = None,
        transcribers: Mapping[str, Transcriber] = _NO_TRANSCRIBERS,
        default_transcriber: str | None = None,
        budget_windows: str = "",
    ) -> None:
        self.session_id = session_id
        self.model = model
        self.deployment = deployment
        self.principal = principal
        self.meter = meter
        self.started_at = started_at
        self.transcription = transcription or model.kind == "realtime-transcription"
        self.seq = 0
        #: The usage events' `budget_windows` (control.budget_windows), fixed at the session's start.
        self.budget_windows = budget_windows
        self._public = model.name
        self._upstream_model = deployment.model
        #: Keeps the deployment's key, host and deployment name from the client (sidecar/scrub.py).
        self.scrubber = Scrubber.for_deployment(deployment, public_model=model.name)
        self._scrub = self.scrubber.text  # bound once: called for every upstream frame
        self._hide_model = deployment.model != model.name
        #: Settings bound by a client secret (pinning.py): session updates may not change them.
        self.pinned = pinned
        #: Transcription models a conversation session may name, by public name (Catalog.transcribers).
        self._transcribers = transcribers
        #: The one a conversation session's input transcription is priced at: the last it named, else the
        #: configured default transcription model (docs/billing.md).
        self.transcriber = transcribers.get(default_transcriber) if default_transcriber else None
        #: (upstream name, public name) of the transcription model named upstream, when they differ.
        self._transcriber_alias: tuple[str, str] | None = None
        #: What goes upstream before any client frame (`prepare_opening`).
        self._opening: tuple[str, ...] = ()
        #: Responses the provider announced (`response.created`) and has not finished (`response.done`): their
        #: usage is still to come (a walk-out waits for it).
        self._responding: set[str] = set()
        self._walkout: WalkoutOutcome | None = None

    @property
    def route(self) -> Route:
        return REALTIME_ENDPOINT

    def prepare_opening(self, *, inject_model: bool, bound: str | None = None) -> None:
        """Fix the frames sent upstream first: the transcription model's injection when the upstream URL
        carries no model, or instead a client secret's bound settings (`bound`, a session.update that names
        the model where one is needed), checked and rewritten like a client's."""
        first = self.model_injection() if inject_model else None
        if bound is not None:
            first = self.on_client_text(bound).upstream
        self._opening = (first,) if first is not None else ()

    def opening(self) -> tuple[str, ...]:
        """The frames prepared by `prepare_opening` (none by default)."""
        return self._opening

    def error(self, code: str, message: str, *, error_type: str = "invalid_request_error") -> str:
        """A Realtime API `error` event."""
        return protocol.error_event(code, message, error_type=error_type)

    def on_end(self, *, now: int = 0) -> None:
        """Nothing to stop: the meter counts audio and tokens, not time."""

    def figures(self, *, now: int = 0) -> Figures:
        """The meter's cumulative figures (after a walk-out, `upstream_usage` says how its wait ended)."""
        figures = self.meter.snapshot()
        if self._walkout is None:
            return figures
        record = protocol.loads(figures.upstream_usage) if figures.upstream_usage else {}
        record["walkout"] = self._walkout
        return replace(figures, upstream_usage=protocol.dumps(record))

    # ---- walk-outs: a client gone while a response is in progress ----------------------------------

    @property
    def client_closing(self) -> bool:
        """Never: the Realtime API has no client event that ends the session."""
        return False

    @property
    def awaiting(self) -> bool:
        """True while a response is in progress: its usage arrives only with its `response.done`."""
        return bool(self._responding)

    def walkout(self) -> tuple[str, ...]:
        """The frames that ask the provider to finish what is in progress when the client is gone: one
        `response.cancel` per response in progress (GA `response.cancel.response_id`)."""
        return tuple(
            protocol.dumps({"type": "response.cancel", "event_id": protocol.event_id(), "response_id": response_id})
            for response_id in sorted(self._responding)
        )

    def on_walkout_end(self, outcome: WalkoutOutcome) -> None:
        """Record how the walk-out's wait ended (in the figures' `upstream_usage.walkout`)."""
        self._walkout = outcome

    # ---- client -> upstream -------------------------------------------------------------------

    def on_client_text(self, text: str, *, now: int = 0) -> Reply:
        """Decide what one client text frame becomes. Never raises on bad input."""
        try:
            event = protocol.loads(text)
        except protocol.JSONDecodeError:
            return Reply(None, protocol.error_event("invalid_json", "The event is not valid JSON."))
        if not isinstance(event, dict):
            return Reply(None, protocol.error_event("invalid_event", "An event must be a JSON object."))
        kind = event.get("type")
        if kind == protocol.APPEND:
            audio = event.get("audio")
            if isinstance(audio, str) and self.meter.on_append(audio):
                return Reply(text, None)
            return Reply(
                None,
                protocol.error_event(
                    "invalid_base64",
                    "input_audio_buffer.append audio is not valid base64.",
                    ref=event.get("event_id"),
                ),
            )
        if kind in protocol.SESSION_UPDATES:
            return self._on_session_update(event)
        return Reply(text, None)

    def _on_session_update(self, event: dict[str, Any]) -> Reply:
        """Check one client session update, then forward it with an event id the provider's answer can be
        matched by (the meter waits for that answer before it trusts a new format: docs/billing.md)."""
        ref = event.get("event_id")
        session = event.get("session")
        refusal = self._refusal(session) if isinstance(session, dict) else None
        if refusal is not None:
            code, message = refusal
            return Reply(None, protocol.error_event(code, message, ref=ref))
        requested = None
        if isinstance(session, dict):
            requested = audio_formats.requested(session)  # checked in _refusal: does not raise here
            self._rewrite_models(session)
        if not isinstance(ref, str) or not ref:
            ref = event["event_id"] = protocol.event_id()
        self.meter.on_update(ref, requested)
        return Reply(protocol.dumps(event), None)

    def _refusal(self, session: dict[str, Any]) -> tuple[str, str] | None:
        """(error code, message) when this session update may not be forwarded, else None."""
        named = [m for m in self._named_models(session) if m is not None]
        if any(m != self._public for m in named):
            return (
                "model_mismatch",
                f"This session is for model {self._public}; a session.update may not name another model.",
            )
        changed = self.pinned.conflict(session) if self.pinned is not None else None
        if changed is not None:
            return "session_pinned", f"This session's {changed} is fixed by its client secret."
        try:
            audio_formats.requested(session)
        except audio_formats.FormatRefused as exc:
            return "invalid_audio_format", str(exc)
        if not self.transcription:
            return self._transcriber_refusal(session)
        return None

    def _transcriber_refusal(self, session: dict[str, Any]) -> tuple[str, str] | None:
        """A conversation session may name, as its input transcription model, a transcription model of the
        config that the key may use and that its provider serves (docs/billing.md)."""
        for name in _transcription_models(session):
            if not isinstance(name, str):
                continue
            transcriber = self._transcribers.get(name)
            if transcriber is None or transcriber.upstream_name(self.deployment) is None:
                return "model_not_found", f"The transcription model `{name}` is not available here."
            if not may_use(self.principal, name):
                return "model_not_allowed", f"The API key is not allowed to access model {name}."
        return None

    def _named_models(self, session: dict[str, Any]) -> list[Any]:
        names = [session.get("model")]
        if self.transcription:
            names.extend(_transcription_models(session))
        return names

    def _rewrite_models(self, session: dict[str, Any]) -> None:
        if "model" in session:
            session["model"] = self._upstream_model
        for holder in _transcription_holders(session):
            if self.transcription:
                holder["model"] = self._upstream_model
            elif isinstance(name := holder.get("model"), str):
                transcriber = self._transcribers[name]  # checked in _transcriber_refusal
                upstream = transcriber.upstream_name(self.deployment) or name
                holder["model"] = upstream
                self.transcriber = transcriber
                self._transcriber_alias = (upstream, name) if upstream != name else None
                if self._transcriber_alias is not None:  # its deployment name is hidden like the session's own
                    self.scrubber = self.scrubber.adding(upstream, name)
                    self._scrub = self.scrubber.text

    def hide(self, secret: str) -> None:
        """Scrub one more secret from every upstream frame (an Azure transcription session's minted `ek_...`)."""
        self.scrubber = self.scrubber.adding(secret, REDACTED)
        self._scrub = self.scrubber.text

    def model_injection(self) -> str:
        """The session.update that puts the transcription model into the session configuration.

        Sent first when the upstream URL carries no model (OpenAI refuses `?model=` on transcription
        sessions; Azure GA transcription sessions likewise take it from the session).
        """
        return protocol.dumps(
            {
                "type": protocol.SESSION_UPDATE,
                "event_id": protocol.event_id(),
                "session": {
                    "type": "transcription",
                    "audio": {"input": {"transcription": {"model": self._upstream_model}}},
                },
            }
        )

    # ---- upstream -> client -------------------------------------------------------------------

    def on_upstream_text(self, text: str, *, now: int = 0) -> str:
        """The text to relay for one upstream frame: metered, identifiers scrubbed. Never raises."""
        if text.startswith(_RELAY_ONLY):
            return self._scrub(text)
        if not (
            _ERROR in text
            or _SESSION in text
            or _DONE in text
            or _COMPLETED in text
            or text.find(_CREATED, 0, _HEAD) >= 0
        ):
            return self._scrub(text)
        try:
            event = protocol.loads(text)
        except protocol.JSONDecodeError:
            return self._scrub(text)
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "error":
            self.meter.on_update_refused(protocol.dig(event, "error", "event_id"))
            return self._scrub(text)
        if kind == protocol.RESPONSE_CREATED:
            response_id = protocol.dig(event, "response", "id")
            if isinstance(response_id, str):
                self._responding.add(response_id)
        elif kind == protocol.RESPONSE_DONE:
            self._responding.discard(str(protocol.dig(event, "response", "id")))
            usage = protocol.dig(event, "response", "usage")
            if isinstance(usage, dict):
                self.meter.on_response_done(usage)
        elif kind == protocol.TRANSCRIPTION_COMPLETED:
            usage = event.get("usage")
            if isinstance(usage, dict):
                self.meter.on_upstream_usage(usage)
                if not self.transcription:
                    price = self.transcriber.price if self.transcriber is not None else _UNPRICED
                    self.meter.on_transcription_usage(usage, price)
        elif kind in protocol.SERVER_SESSION_EVENTS:
            session = event.get("session")
            self.meter.on_updated(audio_formats.confirmed(session) if isinstance(session, dict) else None)
            if self._hide_model:
                text = text.replace(f'"{self._upstream_model}"', f'"{self._public}"')
            if self._transcriber_alias is not None:
                upstream, public = self._transcriber_alias
                text = text.replace(f'"{upstream}"', f'"{public}"')
        return self._scrub(text)

    def scrub_bytes(self, data: bytes) -> bytes:
        """Scrub a binary upstream frame the same way (rare: providers send text)."""
        return self.scrubber.data(data)

    # ---- usage ----------------------------------------------------------------------------------

    def usage_event(self, kind: EventType, *, now: datetime, close_reason: str = "") -> UsageEvent:
        """The next cumulative usage event (seq 1, 2, ...), built as the relay's Account builds it
        (surfaces.account.usage_event), from `figures()` (a subclass's own figures too). A final carries ended_at
        and close_reason."""
        self.seq += 1
        return usage_event(
            kind,
            self.figures(),
            seq=self.seq,
            session_id=self.session_id,
            principal=self.principal,
            model=self.model,
            deployment=self.deployment,
            started_at=self.started_at,
            now=now,
            close_reason=close_reason,
            budget_windows=self.budget_windows,
        )


def _transcription_holders(session: dict[str, Any]) -> list[dict[str, Any]]:
    """The objects of a session update that hold its input transcription model (GA, then beta)."""
    found = [protocol.dig(session, "audio", "input", "transcription"), session.get("input_audio_transcription")]
    return [holder for holder in found if isinstance(holder, dict)]


def _transcription_models(session: dict[str, Any]) -> list[Any]:
    """The input transcription models a session update names (GA and beta), as given."""
    return [holder.get("model") for holder in _transcription_holders(session) if holder.get("model") is not None]
