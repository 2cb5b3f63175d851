"""A property: whatever a client sends, in any order, the sidecar never bills fewer seconds than a strict
provider decodes (issue 12). The session core runs against a model of such a provider, pure, with the
provider's answers arriving at arbitrary points between the client's events."""

from __future__ import annotations

import base64
from collections import deque
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.auth import Principal
from sidecar.catalog import Deployment, RealtimeModel
from sidecar.metering import SessionMeter
from sidecar.pricing import Price
from sidecar.session import Session

PRICE = Price(unit="second", per_unit=Decimal("0.000283333333333"))
DEPLOYMENT = Deployment(provider="openai", model="gpt-realtime-whisper", api_base="ws://127.0.0.1:1", api_key="sk-x")
PCM, G711 = 48000, 8000

# Formats a client may try: valid ones, other rates, unknown types, the format named both ways.
FORMATS: list[dict[str, Any]] = [
    {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}}}},
    {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 48000}}}},
    {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 1e300}}}},
    {"audio": {"input": {"format": {"type": "audio/pcmu"}}}},
    {"audio": {"input": {"format": {"type": "audio/pcma", "rate": 24000}}}},
    {"audio": {"input": {"format": {"type": "audio/opus"}}}},
    {"input_audio_format": "g711_ulaw"},
    {"input_audio_format": "pcm16"},
    {"input_audio_format": "pcm48"},
    {"input_audio_format": "g711_alaw", "audio": {"input": {"format": {"type": "audio/pcm"}}}},
    {"audio": {"input": {"noise_reduction": None}}},
]


class StrictProvider:
    """Decodes every append at the format in force when it arrives (PCM at 24 kHz whatever the rate; an
    unknown format refused with an error naming the update), and answers each update in order."""

    def __init__(self) -> None:
        self.bps = PCM
        self.decoded = Fraction(0)
        self.answers: deque[str] = deque()

    def receive(self, text: str) -> None:
        event = orjson.loads(text)
        if event["type"] == "input_audio_buffer.append":
            self.decoded += Fraction(len(base64.b64decode(event["audio"])), self.bps)
            return
        session = event["session"]
        beta = session.get("input_audio_format")
        ga = session.get("audio", {}).get("input", {}).get("format")
        name = beta if beta is not None else (ga or {}).get("type") if ga is not None else None
        known = {
            "pcm16": PCM,
            "audio/pcm": PCM,
            "g711_ulaw": G711,
            "g711_alaw": G711,
            "audio/pcmu": G711,
            "audio/pcma": G711,
        }
        if name is not None and name not in known:
            error = {"type": "invalid_request_error", "code": "invalid_value", "event_id": event["event_id"]}
            self.answers.append(orjson.dumps({"type": "error", "error": error}).decode())
            return
        if name is not None:
            self.bps = known[name]
        fmt = {"type": "audio/pcm", "rate": 24000} if self.bps == PCM else {"type": "audio/pcmu"}
        self.answers.append(
            orjson.dumps({"type": "session.updated", "session": {"audio": {"input": {"format": fmt}}}}).decode()
        )


def new_session() -> Session:
    model = RealtimeModel("gpt-realtime-whisper", "realtime-transcription", PRICE, "k", (DEPLOYMENT,))
    return Session(
        session_id="rs_p",
        model=model,
        deployment=DEPLOYMENT,
        principal=Principal(key_hash="h" * 64),
        meter=SessionMeter(PRICE),
        started_at=datetime(2026, 1, 1, tzinfo=UTC),
        transcription=True,
    )


actions = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(min_value=0, max_value=9600)),
        st.tuples(st.just("update"), st.integers(min_value=0, max_value=len(FORMATS) - 1)),
        st.tuples(st.just("answer"), st.integers(min_value=0, max_value=3)),
    ),
    max_size=40,
)


@settings(deadline=None, database=None, max_examples=300)
@given(actions=actions, deliver_all=st.booleans())
def test_billed_seconds_never_fall_below_what_a_strict_provider_decodes(
    actions: list[tuple[str, int]], deliver_all: bool
) -> None:
    """Random appends, format updates and answer timings: billed >= decoded; with every answer in, billed == decoded."""
    session, provider = new_session(), StrictProvider()
    for kind, value in actions:
        if kind == "append":
            text = orjson.dumps(
                {"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x01" * value).decode()}
            ).decode()
        elif kind == "update":
            text = orjson.dumps({"type": "session.update", "session": FORMATS[value]}).decode()
        else:
            for _ in range(min(value, len(provider.answers))):
                session.on_upstream_text(provider.answers.popleft())
            continue
        reply = session.on_client_text(text)
        if reply.upstream is not None:
            provider.receive(reply.upstream)
    if deliver_all:
        while provider.answers:
            session.on_upstream_text(provider.answers.popleft())
    billed = Fraction(session.meter.snapshot().quantity)
    half_microsecond = Fraction(1, 2_000_000)  # the figures are rounded half-even to microseconds
    assert billed >= provider.decoded - half_microsecond
    if deliver_all:
        assert abs(billed - provider.decoded) <= half_microsecond
