"""xAI's Voice Agent API (`xai/grok-voice-*` on /v1/realtime) as a pure session core: the Realtime API core
(session.Session: model pinning, session updates, scrubbing, audio metering) billed as xAI bills it.

The protocol is OpenAI's Realtime API (LiteLLM's XAIRealtime subclasses its OpenAI handler) at
`wss://api.x.ai/v1/realtime?model=<model>` with `Authorization: Bearer <key>` and no OpenAI-Beta header
(upstream.py). xAI's first server event is `conversation.created` (docs.x.ai, Voice Agent API, server events).

Billing (docs.x.ai/developers/models/realtime-api, "Pricing"; LiteLLM's price map `xai/grok-voice-*`:
`input_cost_per_second`, `input_cost_per_text_message`):
- session time, by the sidecar's clock (surfaces.core.SessionClock, as GPT-Live), from the provider's first
  event to the end of the session, at the model's per-second (or per-minute) price: unit `session_second`;
  never less than the seconds of audio the client appended (xAI: "If you send 1 hour of audio data to the
  API, it will be billed as 1 hour of usage, even if the WebSocket connection time is less than 1 hour"), so
  audio sent faster than real time is not billed as the shorter session;
- plus one text message per client `conversation.item.create` forwarded upstream, except an item of type
  `function_call_output` (a tool result the server asked for) and an item with an `input_audio` or `audio`
  content part (billed as audio): "Every conversation.item.create event you send from the client is billed
  ... with two exceptions". `response.create` and `session.update` are not messages. The same rule as
  LiteLLM's XAIRealtimeUsageMeter (`_is_billable_text_item`).
Tokens xAI reports in `response.done` and the appended audio are recorded, never billed.

Pure: no I/O, no clock. Only `conversation.item.create` client frames are parsed a second time (to count
them); the per-frame path of OpenAI and Azure sessions does not run this code at all.
"""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Final

from sidecar import protocol
from sidecar.metering import Figures, bill_time
from sidecar.session import Session
from sidecar.surfaces.core import Reply, SessionClock, WalkoutOutcome
from sidecar.surfaces.live import UNITS

ITEM_CREATE: Final = "conversation.item.create"
_ITEM_CREATE_TEXT: Final = f'"{ITEM_CREATE}"'
#: Content parts billed by the audio meter, not as a text message (xAI's pricing page).
_AUDIO_PARTS: Final = frozenset({"input_audio", "audio"})
_COST_QUANTUM: Final = Decimal("1e-10")


def is_text_message(event: Any) -> bool:
    """True when a client event is a billable xAI text message (module docstring). Never raises."""
    if not isinstance(event, dict) or event.get("type") != ITEM_CREATE:
        return False
    item = event.get("item")
    if not isinstance(item, dict) or item.get("type") == "function_call_output":
        return False
    content = item.get("content")
    parts = content if isinstance(content, list) else []
    return not any(isinstance(part, dict) and part.get("type") in _AUDIO_PARTS for part in parts)


class XaiSession(Session):
    """One relayed xAI session: a Session whose figures are session seconds plus text messages."""

    def __init__(self, **session: Any) -> None:
        """Session's arguments; the meter's rounding policy applies to the session seconds."""
        super().__init__(**session)
        self._clock = SessionClock()
        self.text_messages = 0

    # ---- counting ---------------------------------------------------------------------------------

    def on_client_text(self, text: str, *, now: int = 0) -> Reply:
        """As Session; a billable `conversation.item.create` forwarded upstream counts one text message."""
        reply = super().on_client_text(text, now=now)
        if reply.upstream is not None and _ITEM_CREATE_TEXT in text:
            try:
                event = protocol.loads(reply.upstream)
            except protocol.JSONDecodeError:
                event = None
            if is_text_message(event):
                self.text_messages += 1
        return reply

    def on_upstream_text(self, text: str, *, now: int = 0) -> str:
        """As Session; the provider's first event starts the session clock."""
        if self._clock.started_at is None:
            self._clock.start(now)
        return super().on_upstream_text(text, now=now)

    def on_end(self, *, now: int = 0) -> None:
        """The session clock stops at the first end."""
        self._clock.stop(now)

    # ---- walk-outs: nothing is billed at a response's end ---------------------------------------------

    @property
    def awaiting(self) -> bool:
        """Never: xAI bills time and messages as they go, not a response's usage."""
        return False

    def walkout(self) -> tuple[str, ...]:
        return ()

    def on_walkout_end(self, outcome: WalkoutOutcome) -> None:
        """Never called (`awaiting` is never True)."""

    # ---- figures ----------------------------------------------------------------------------------

    def figures(self, *, now: int = 0) -> Figures:
        """Session seconds (unit session_second / session_minute; at least the appended audio's seconds) and
        text messages; the cost is their sum. Audio and tokens as the meter recorded them; `upstream_usage` adds
        `text_messages` and `text_message_cost_usd`."""
        price = self.model.price
        recorded = self.meter.snapshot()
        seconds = max(self._clock.seconds(now=now), Fraction(recorded.audio_seconds))
        quantity, time_cost = bill_time(seconds, price, rounding=self.meter.rounding, increment=self.meter.increment)
        messages_cost = Decimal(self.text_messages) * (price.per_text_message or Decimal(0))
        record = protocol.loads(recorded.upstream_usage) if recorded.upstream_usage else {}
        record.pop("transcription_cost_usd", None)  # xAI bills input transcription as session time
        record["text_messages"] = self.text_messages
        record["text_message_cost_usd"] = format(messages_cost.quantize(_COST_QUANTUM), "f")
        return replace(
            recorded,
            unit=UNITS[price.unit],
            quantity=quantity,
            cost_usd=(time_cost + messages_cost).quantize(_COST_QUANTUM),
            upstream_usage=protocol.dumps(record),
        )


if TYPE_CHECKING:
    from sidecar.surfaces.core import SurfaceCore

    def _implements(core: XaiSession) -> SurfaceCore:  # mypy checks XaiSession against the interface
        return core
