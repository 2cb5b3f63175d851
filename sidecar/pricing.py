"""Price data for one realtime model, as the catalog derives it from LiteLLM's price map.

Pure data: the catalog builds it, metering computes with it. All prices are exact Decimals made from
the price map's JSON numbers via their shortest repr (`Decimal(repr(x))`), so no float drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

#: realtime-* are /v1/realtime sessions; live-session (GPT-Live, /v1/live/sessions: billed per second of
#: session time) and realtime-translation (/v1/realtime/translations: per second of input audio) are the
#: catalog's kinds for the routes issue 15 adds. realtime-session is a /v1/realtime conversation billed by session
#: time plus text messages (xAI's Voice Agent API, sidecar/surfaces/xai.py), never by tokens.
Kind = Literal[
    "realtime-transcription", "realtime-conversation", "live-session", "realtime-translation", "realtime-session"
]
Unit = Literal["second", "minute", "token"]


def to_decimal(value: object) -> Decimal | None:
    """A price-map number as an exact Decimal (None stays None). Raises ValueError on non-numbers."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ValueError(f"not a price: {value!r}")
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


@dataclass(frozen=True, slots=True)
class Price:
    """How one model is billed.

    Transcription models bill audio time: `unit` is "second" (price `per_unit` = input_cost_per_second)
    or "minute" (price `per_unit` = input_cost_per_minute). Conversation models bill tokens (`unit`
    "token") at the text/audio/cached token prices. A transcription model used by a conversation session
    (`Catalog.transcribers`) has a time unit and may have token prices too: the provider reports its usage
    either as a duration or as tokens. A realtime-session model (xAI) has a time unit for its session time and
    `per_text_message` (input_cost_per_text_message) for each billable text message.
    """

    unit: Unit
    per_unit: Decimal | None = None
    input_token: Decimal | None = None
    output_token: Decimal | None = None
    input_audio_token: Decimal | None = None
    output_audio_token: Decimal | None = None
    cached_input_token: Decimal | None = None
    cached_input_audio_token: Decimal | None = None
    per_text_message: Decimal | None = None
