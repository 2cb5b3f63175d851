"""The GPT-Live session core (sidecar/surfaces/live.py), driven with events built from the `openai` SDK's own
types (`openai.types.live`), so the shapes are the SDK's."""

from __future__ import annotations

import base64
from decimal import Decimal
from fractions import Fraction
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.live import (
    ErrorEvent,
    InputAudioAppendEvent,
    InputAudioMuteEvent,
    InputAudioUnmuteEvent,
    ResponseCreateEvent,
    SessionClosedEvent,
    SessionCloseEvent,
    SessionConfig,
    SessionResource,
    SessionStartedEvent,
    SessionStartEvent,
    SessionUsage,
    SessionUsageUpdatedEvent,
)
from openai.types.live.audio_format import AudioPCM, AudioPCMU
from openai.types.live.session_config import Audio
from pydantic import BaseModel

from sidecar.catalog import LIVE_ENDPOINT
from sidecar.metering import SessionMeter, bill_time
from sidecar.pricing import Price
from sidecar.surfaces.core import NS_PER_SECOND, Reply
from sidecar.surfaces.live import INVALID_START, LiveSession, LiveStart, input_bytes_per_second, parse_start

PRICE = Price(unit="second", per_unit=Decimal("0.000833333333333"))  # gpt-live-1 in LiteLLM's price map
PROPERTY = settings(deadline=None, database=None, max_examples=200)
T0 = 5 * NS_PER_SECOND  # an arbitrary monotonic origin


def wire(event: BaseModel) -> str:
    """An SDK event as the SDK sends it (fields not given left out)."""
    return orjson.dumps(event.model_dump(exclude_none=True)).decode()


def start_text(model: str = "gpt-live-1", *, audio: Audio | None = None, event_id: str | None = None) -> str:
    return wire(
        SessionStartEvent(type="session.start", session=SessionConfig(model=model, audio=audio), event_id=event_id)
    )


def resource(model: str = "dep-live") -> SessionResource:
    return SessionResource(id="sess_123", expires_at=1_900_000_000, model=model, status="active")


def started(model: str = "dep-live") -> str:
    return wire(SessionStartedEvent(type="session.started", event_id="ev_1", session=resource(model)))


def usage(seconds: float) -> str:
    return wire(
        SessionUsageUpdatedEvent(type="session.usage.updated", event_id="ev_2", usage=SessionUsage(seconds=seconds))
    )


def closed(seconds: float) -> str:
    event = SessionClosedEvent(
        type="session.closed",
        event_id="ev_3",
        reason="close_requested",
        session=resource(),
        usage=SessionUsage(seconds=seconds),
    )
    return wire(event)


def append(data: bytes) -> str:
    return wire(InputAudioAppendEvent(type="session.input_audio.append", audio=base64.b64encode(data).decode()))


def opened(start: str | None = None, **kwargs: Any) -> LiveSession:
    """A session core after a valid session.start."""
    parsed = parse_start(start or start_text())
    assert isinstance(parsed, LiveStart)
    return LiveSession(parsed, upstream_model="dep-live", price=PRICE, **kwargs)


def error_of(reply: Reply) -> ErrorEvent:
    """The reply's client text as the SDK's Live ErrorEvent (validated: the shape is the SDK's)."""
    assert reply.upstream is None and reply.client is not None
    return ErrorEvent.model_validate(orjson.loads(reply.client))


# --- the first message ---------------------------------------------------------------------------


def test_start_names_the_model() -> None:
    """A session.start with session.model gives the public model; the core speaks /v1/live/sessions."""
    parsed = parse_start(start_text("my-live"))
    assert isinstance(parsed, LiveStart) and parsed.model == "my-live"
    assert opened().route == LIVE_ENDPOINT


@pytest.mark.parametrize(
    "first",
    [
        "not json",
        "[1]",
        wire(ResponseCreateEvent(type="response.create")),
        orjson.dumps({"type": "session.start"}).decode(),
        orjson.dumps({"type": "session.start", "session": {"model": ""}}).decode(),
        orjson.dumps({"type": "session.start", "session": {"model": 7}, "event_id": "c1"}).decode(),
        orjson.dumps({"type": "session.start", "session": "gpt-live-1"}).decode(),
    ],
)
def test_a_first_message_that_is_not_a_usable_start_is_refused(first: str) -> None:
    """Anything but a session.start with a non-empty session.model ends the session: invalid_session_start."""
    reply = parse_start(first)
    assert isinstance(reply, Reply) and reply.ending == INVALID_START
    error = error_of(reply)
    assert (error.error.code, error.error.type) == (INVALID_START, "invalid_request_error")


def test_refusal_carries_the_client_event_id() -> None:
    """The error names the refused command by client_event_id, GPT-Live's field for it."""
    reply = parse_start(orjson.dumps({"type": "session.start", "session": {}, "event_id": "c9"}).decode())
    assert isinstance(reply, Reply)
    error = error_of(reply)
    assert error.client_event_id == "c9" and error.error.client_event_id == "c9"


def test_opening_sends_the_start_with_the_deployment_model() -> None:
    """The start goes upstream first, its model rewritten to the deployment's name, the rest unchanged."""
    audio = Audio(format=AudioPCM(type="audio/pcm", rate=24000))
    (frame,) = opened(start_text("gpt-live-1", audio=audio, event_id="c1")).opening()
    event = SessionStartEvent.model_validate(orjson.loads(frame))
    assert (event.session.model, event.event_id, event.session.audio) == ("dep-live", "c1", audio)


def test_a_second_start_is_refused() -> None:
    """session.start is sent once: a later one (it could switch the model) is refused and not forwarded."""
    error = error_of(opened().on_client_text(start_text("other"), now=T0))
    assert error.error.code == "session_already_started"


# --- model pinning ---------------------------------------------------------------------------------


def test_update_may_not_name_another_model() -> None:
    """A session.update naming another model is refused (model_mismatch); naming this one is rewritten."""
    core = opened()
    update = {"type": "session.update", "event_id": "u1", "session": {"model": "gpt-live-1.1"}}
    error = error_of(core.on_client_text(orjson.dumps(update).decode(), now=T0))
    assert (error.error.code, error.client_event_id) == ("model_mismatch", "u1")
    same = {"type": "session.update", "session": {"model": "gpt-live-1", "triggers": []}}
    reply = core.on_client_text(orjson.dumps(same).decode(), now=T0)
    assert reply.client is None and reply.upstream is not None
    assert orjson.loads(reply.upstream)["session"] == {"model": "dep-live", "triggers": []}


def test_update_without_a_model_and_other_commands_pass_through() -> None:
    """Updates that name no model, and every other command, go upstream as sent."""
    core = opened()
    for event in (
        {"type": "session.update", "session": {"triggers": []}},
        ResponseCreateEvent(type="response.create").model_dump(exclude_none=True),
        SessionCloseEvent(type="session.close").model_dump(exclude_none=True),
        {"type": "a.future.event"},
    ):
        text = orjson.dumps(event).decode()
        reply = core.on_client_text(text, now=T0)
        assert reply.client is None and orjson.loads(reply.upstream or "") == event


@pytest.mark.parametrize(("text", "code"), [("{", "invalid_json"), ('"x"', "invalid_event")])
def test_bad_frames_answered_in_live_shape(text: str, code: str) -> None:
    """Malformed client frames get a Live error event and are not forwarded; the session goes on."""
    reply = opened().on_client_text(text, now=T0)
    assert error_of(reply).error.code == code and reply.ending is None


# --- metering --------------------------------------------------------------------------------------


def test_billed_by_session_seconds_from_started_to_closed() -> None:
    """Session time on the sidecar's clock, from session.started to session.closed, is the bill; the
    provider's seconds are recorded (the latest, not summed) and never billed."""
    core = opened()
    assert core.figures(now=T0).quantity == 0  # nothing before session.started
    core.on_upstream_text(started(), now=T0)
    core.on_upstream_text(usage(1), now=T0 + NS_PER_SECOND)
    core.on_upstream_text(usage(2), now=T0 + 2 * NS_PER_SECOND)
    mid = core.figures(now=T0 + 2_500_000_000)
    assert (mid.quantity, mid.cost_usd) == bill_time(Fraction(5, 2), PRICE)
    core.on_upstream_text(closed(900), now=T0 + 61_250_000_000)  # the provider's figure is not the bill
    final = core.figures(now=T0 + 999 * NS_PER_SECOND)  # later calls see the end, not `now`
    assert (final.unit, final.quantity) == ("session_second", Decimal("61.250000"))
    assert final.cost_usd == (Decimal("61.25") * PRICE.per_unit).quantize(Decimal("1e-10"))
    assert orjson.loads(final.upstream_usage) == {"duration_seconds": 900, "events": 3}
    assert (core.provider_session_id, core.provider_seconds, core.closed_reason) == (
        "sess_123",
        Decimal(900),
        "close_requested",
    )


def test_the_drivers_end_stops_the_clock() -> None:
    """Without session.closed (client gone, upstream dropped), the driver's on_end is the end; the first end wins."""
    core = opened()
    core.on_upstream_text(started(), now=T0)
    core.on_end(now=T0 + 3 * NS_PER_SECOND)
    core.on_end(now=T0 + 9 * NS_PER_SECOND)
    core.on_upstream_text(closed(9), now=T0 + 9 * NS_PER_SECOND)
    assert core.figures(now=T0 + 20 * NS_PER_SECOND).quantity == Decimal("3.000000")


def test_muted_time_is_billed_and_recorded() -> None:
    """Muted time counts as session time; the muted seconds are recorded beside it."""
    core = opened()
    core.on_upstream_text(started(), now=T0)
    mute = wire(InputAudioMuteEvent(type="session.input_audio.mute"))
    unmute = wire(InputAudioUnmuteEvent(type="session.input_audio.unmute"))
    assert core.on_client_text(mute, now=T0 + NS_PER_SECOND).upstream == mute
    assert core.on_client_text(unmute, now=T0 + 4 * NS_PER_SECOND).upstream == unmute
    core.on_client_text(mute, now=T0 + 6 * NS_PER_SECOND)
    core.on_end(now=T0 + 10 * NS_PER_SECOND)
    assert core.muted_seconds(now=T0 + 99 * NS_PER_SECOND) == 7
    assert core.figures(now=T0 + 99 * NS_PER_SECOND).quantity == Decimal("10.000000")


def test_audio_appends_are_counted_not_billed() -> None:
    """Appended audio is validated and counted at the startup format; invalid base64 is refused unbilled."""
    core = opened()
    core.on_upstream_text(started(), now=T0)
    assert core.on_client_text(append(bytes(48000)), now=T0).upstream is not None
    bad = orjson.dumps({"type": "session.input_audio.append", "audio": "a!==", "event_id": "a1"}).decode()
    error = error_of(core.on_client_text(bad, now=T0))
    assert (error.error.code, error.client_event_id) == ("invalid_base64", "a1")
    figures = core.figures(now=T0)
    assert (figures.audio_bytes, figures.audio_seconds, figures.quantity) == (48000, Decimal("1.000000"), 0)


@pytest.mark.parametrize(
    ("audio", "bps"),
    [
        (None, 48000),
        (Audio(format=AudioPCM(type="audio/pcm", rate=16000)), 32000),
        (Audio(format=AudioPCMU(type="audio/pcmu", rate=8000)), 8000),
    ],
)
def test_audio_rate_from_the_startup_format(audio: Audio | None, bps: int) -> None:
    """Audio seconds use the startup format: PCM16 24 kHz by default."""
    parsed = parse_start(start_text(audio=audio))
    assert isinstance(parsed, LiveStart) and input_bytes_per_second(parsed) == bps


def test_upstream_frames_are_scrubbed_and_relayed() -> None:
    """Every upstream frame goes through the injected scrubber (the deployment name shown as the public one)."""
    core = opened(scrub=lambda text: text.replace("dep-live", "gpt-live-1"))
    shown = SessionStartedEvent.model_validate(orjson.loads(core.on_upstream_text(started(), now=T0)))
    assert shown.session.model == "gpt-live-1"
    delta = orjson.dumps({"type": "session.output_audio.delta", "delta": "AAAA", "event_id": "e"}).decode()
    assert core.on_upstream_text(delta, now=T0) == delta


@PROPERTY
@given(
    start=st.integers(0, 10**12),
    steps=st.lists(st.integers(0, 10**10), max_size=20),
    reports=st.lists(st.floats(0, 10**6, allow_nan=False), max_size=20),
)
def test_bill_is_the_sidecar_clock_whatever_the_provider_reports(
    start: int, steps: list[int], reports: list[float]
) -> None:
    """For any timeline and any provider usage reports, the billed seconds are end - session.started on the
    sidecar's clock, and the recorded provider seconds are the last report."""
    core = opened()
    core.on_upstream_text(started(), now=start)
    now = start
    for step, seconds in zip(steps, reports, strict=False):
        now += step
        core.on_upstream_text(usage(seconds), now=now)
    now += steps[-1] if steps else 0
    core.on_end(now=now)
    expected = bill_time(Fraction(now - start, NS_PER_SECOND), PRICE)
    assert (core.figures(now=now + 10**9).quantity, core.figures(now=now).cost_usd) == expected
    pairs = list(zip(steps, reports, strict=False))
    assert core.provider_seconds == (Decimal(repr(pairs[-1][1])) if pairs else None)


@PROPERTY
@given(
    count=st.integers(0, 10**9),
    unit=st.sampled_from(["second", "minute"]),
    per_unit=st.decimals(0, 1, places=15),
    rounding=st.sampled_from(["exact", "up", "nearest"]),
    increment=st.sampled_from([Decimal(1), Decimal("0.5"), Decimal(6)]),
)
def test_bill_time_is_the_meters_arithmetic(
    count: int, unit: str, per_unit: Decimal, rounding: str, increment: Decimal
) -> None:
    """bill_time gives what SessionMeter gives for the same seconds, so session seconds and audio seconds
    are billed by one arithmetic and one rounding policy."""
    price = Price(unit=unit, per_unit=per_unit)  # type: ignore[arg-type]
    meter = SessionMeter(price, rounding=rounding, increment=increment)  # type: ignore[arg-type]
    meter.on_append(base64.b64encode(bytes(count % 10**6)))
    seconds = Fraction(count % 10**6, 48000)
    figures = meter.snapshot()
    assert (figures.quantity, figures.cost_usd) == bill_time(seconds, price, rounding=rounding, increment=increment)  # type: ignore[arg-type]


def test_the_providers_active_and_paused_breakdown_is_recorded_not_billed() -> None:
    """SessionUsage's active / paused seconds (the latest) go to upstream_usage beside the total; the bill is
    still the sidecar's own session time."""
    core = opened()
    core.on_upstream_text(started(), now=T0)
    breakdown = SessionUsage(seconds=10, active_seconds=7, paused_seconds=3)
    text = wire(SessionUsageUpdatedEvent(type="session.usage.updated", event_id="ev_9", usage=breakdown))
    core.on_upstream_text(text, now=T0 + 4 * NS_PER_SECOND)
    figures = core.figures(now=T0 + 4 * NS_PER_SECOND)
    assert figures.quantity == Decimal(4)
    assert orjson.loads(figures.upstream_usage) == {
        "duration_seconds": 10,
        "events": 1,
        "active_seconds": 7,
        "paused_seconds": 3,
    }


@pytest.mark.parametrize(
    "config",
    [
        {"delegation": {"type": "responses", "responses": {"model": "gpt-5"}}},
        {"delegation": {"type": "decisions", "decisions": {"model": "d", "questions": []}}},
        {"delegation": "responses"},
        {"triggers": [{"type": "decisions", "event_type": "session.input_transcript.delta"}]},
    ],
)
def test_delegation_to_models_the_sidecar_cannot_meter_is_refused(config: dict[str, Any]) -> None:
    """A Responses or Decisions delegation, or transcript triggers: refused in session.start (ending the session
    before any upstream) and in session.update (not forwarded; the session goes on)."""
    refused = parse_start(orjson.dumps({"type": "session.start", "session": {"model": "gpt-live-1", **config}}))
    assert isinstance(refused, Reply) and refused.ending == "delegation_not_supported"
    assert error_of(refused).error.code == "delegation_not_supported"
    reply = opened().on_client_text(orjson.dumps({"type": "session.update", "session": config}).decode(), now=T0)
    assert error_of(reply).error.code == "delegation_not_supported" and reply.ending is None


def test_client_delegation_and_no_triggers_are_relayed() -> None:
    """Client delegation (the application runs the tools) and `triggers: []` / `delegation: null` go through."""
    for config in ({"delegation": {"type": "client"}}, {"delegation": None, "triggers": []}):
        assert isinstance(
            parse_start(orjson.dumps({"type": "session.start", "session": {"model": "m", **config}})), LiveStart
        )
        reply = opened().on_client_text(orjson.dumps({"type": "session.update", "session": config}).decode(), now=T0)
        assert reply.client is None and orjson.loads(reply.upstream or "")["session"] == config
