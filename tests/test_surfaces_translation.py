"""The realtime translation session core (sidecar/surfaces/translation.py), driven with events built from the
`openai` SDK's own types (`openai.types.realtime.RealtimeTranslation*`), so the shapes are the SDK's."""

from __future__ import annotations

import base64
from decimal import Decimal
from fractions import Fraction
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.realtime import (
    RealtimeErrorEvent,
    RealtimeTranslationInputAudioBufferAppendEvent,
    RealtimeTranslationSessionClosedEvent,
    RealtimeTranslationSessionCloseEvent,
    RealtimeTranslationSessionCreatedEvent,
    RealtimeTranslationSessionUpdateEvent,
    RealtimeTranslationSessionUpdateRequest,
)
from openai.types.realtime.realtime_translation_session import RealtimeTranslationSession
from openai.types.realtime.realtime_translation_session_update_request import Audio, AudioOutput
from pydantic import BaseModel

from sidecar.catalog import TRANSLATION_ENDPOINT
from sidecar.metering import bill_time
from sidecar.pricing import Price
from sidecar.surfaces.core import Reply
from sidecar.surfaces.translation import TranslationSession

PRICE = Price(unit="second", per_unit=Decimal("0.000566666666667"))  # gpt-realtime-translate, LiteLLM's map
PROPERTY = settings(deadline=None, database=None, max_examples=200)
BYTES_PER_SECOND = 48000  # 24 kHz PCM16 mono


def wire(event: BaseModel) -> str:
    """An SDK event as the SDK sends it (fields not given left out)."""
    return orjson.dumps(event.model_dump(exclude_none=True)).decode()


def append(data: bytes, event_id: str | None = None) -> str:
    audio = base64.b64encode(data).decode()
    return wire(
        RealtimeTranslationInputAudioBufferAppendEvent(
            type="session.input_audio_buffer.append", audio=audio, event_id=event_id
        )
    )


def core(**kwargs: Any) -> TranslationSession:
    return TranslationSession(public_model="gpt-realtime-translate", upstream_model="dep-tr", price=PRICE, **kwargs)


def error_of(reply: Reply) -> RealtimeErrorEvent:
    """The reply's client text as the SDK's RealtimeErrorEvent (validated: the shape is the SDK's)."""
    assert reply.upstream is None and reply.client is not None and reply.ending is None
    return RealtimeErrorEvent.model_validate(orjson.loads(reply.client))


def test_appended_audio_is_billed_per_second_at_24khz() -> None:
    """Input audio seconds come from the appended bytes at 48000 bytes a second, to the microsecond."""
    session = core()
    assert session.route == TRANSLATION_ENDPOINT and session.opening() == ()
    for size in (9600, 9600, 4801):  # 200 ms, 200 ms, 100.02 ms
        text = append(bytes(size))
        assert session.on_client_text(text, now=0) == Reply(text, None)
    figures = session.figures(now=0)
    assert (figures.unit, figures.audio_bytes, figures.audio_seconds) == ("second", 24001, Decimal("0.500021"))
    assert (figures.quantity, figures.cost_usd) == bill_time(Fraction(24001, BYTES_PER_SECOND), PRICE)


def test_invalid_base64_is_refused_and_not_billed() -> None:
    """An append whose audio is not standard padded base64 is answered invalid_base64 and bills nothing."""
    session = core()
    bad = orjson.dumps({"type": "session.input_audio_buffer.append", "audio": "AAA", "event_id": "a1"}).decode()
    error = error_of(session.on_client_text(bad, now=0))
    assert (error.error.code, error.error.event_id, error.error.type) == (
        "invalid_base64",
        "a1",
        "invalid_request_error",
    )
    assert session.figures(now=0).audio_bytes == 0


def test_update_without_model_goes_upstream() -> None:
    """A session.update of what the API lets change (output language) is forwarded as sent."""
    update = RealtimeTranslationSessionUpdateEvent(
        type="session.update",
        session=RealtimeTranslationSessionUpdateRequest(audio=Audio(output=AudioOutput(language="de"))),
    )
    reply = core().on_client_text(wire(update), now=0)
    assert reply.client is None
    assert RealtimeTranslationSessionUpdateEvent.model_validate(orjson.loads(reply.upstream or "")) == update


def test_update_may_not_name_another_model() -> None:
    """The model is fixed at creation: another model is refused (model_mismatch); this one is rewritten."""
    session = core()
    other = {"type": "session.update", "event_id": "u1", "session": {"model": "gpt-realtime"}}
    error = error_of(session.on_client_text(orjson.dumps(other).decode(), now=0))
    assert (error.error.code, error.error.event_id) == ("model_mismatch", "u1")
    same = {"type": "session.update", "session": {"model": "gpt-realtime-translate"}}
    reply = session.on_client_text(orjson.dumps(same).decode(), now=0)
    assert orjson.loads(reply.upstream or "")["session"]["model"] == "dep-tr"


@pytest.mark.parametrize(
    "audio_format",
    [{"type": "audio/pcmu"}, {"type": "audio/pcm", "rate": 16000}, {"type": "audio/wav"}],
)
def test_update_may_not_change_the_input_format(audio_format: dict[str, Any]) -> None:
    """Only 24 kHz PCM16 is metered: an update naming another input format is refused."""
    update = {"type": "session.update", "session": {"audio": {"input": {"format": audio_format}}}}
    assert error_of(core().on_client_text(orjson.dumps(update).decode(), now=0)).error.code == "invalid_audio_format"


@pytest.mark.parametrize(
    "event",
    [
        {"type": "input_audio_buffer.append", "audio": "AAAA"},  # the /v1/realtime name
        {"type": "response.create"},
        {"type": "session.start", "session": {"model": "gpt-live-1"}},
        {"type": 3},
        {},
    ],
)
def test_events_the_api_does_not_define_are_refused(event: dict[str, Any]) -> None:
    """Anything but session.update, session.input_audio_buffer.append and session.close: unknown_event."""
    assert error_of(core().on_client_text(orjson.dumps(event).decode(), now=0)).error.code == "unknown_event"


@pytest.mark.parametrize(("text", "code"), [("{", "invalid_json"), ("[]", "invalid_event")])
def test_bad_frames(text: str, code: str) -> None:
    """Malformed client frames get an error event and are not forwarded."""
    assert error_of(core().on_client_text(text, now=0)).error.code == code


def test_close_goes_upstream_and_closed_is_seen() -> None:
    """session.close is forwarded; the provider's session.closed is recorded and relayed."""
    session = core()
    close = wire(RealtimeTranslationSessionCloseEvent(type="session.close"))
    assert session.on_client_text(close, now=0).upstream == close
    closed = wire(RealtimeTranslationSessionClosedEvent(type="session.closed", event_id="e9"))
    assert session.on_upstream_text(closed, now=5) == closed and session.closed_by_provider


def test_upstream_frames_are_scrubbed() -> None:
    """Upstream frames pass through the injected scrubber: the deployment name is shown as the public one."""
    session = core(scrub=lambda text: text.replace("dep-tr", "gpt-realtime-translate"))
    created = RealtimeTranslationSessionCreatedEvent(
        type="session.created",
        event_id="e1",
        session=RealtimeTranslationSession(id="sess_1", audio={}, expires_at=1, model="dep-tr", type="translation"),
    )
    shown = RealtimeTranslationSessionCreatedEvent.model_validate(
        orjson.loads(session.on_upstream_text(wire(created), now=0))
    )
    assert shown.session.model == "gpt-realtime-translate" and not session.closed_by_provider


@PROPERTY
@given(chunks=st.lists(st.integers(0, 20000), max_size=30), bad=st.lists(st.booleans(), max_size=30))
def test_bill_is_exactly_the_valid_appended_audio(chunks: list[int], bad: list[bool]) -> None:
    """For any sequence of appends, some invalid, the bill is the valid bytes' seconds at 24 kHz PCM16."""
    session = core()
    total = 0
    for size, invalid in zip(chunks, bad + [False] * len(chunks), strict=False):
        text = append(bytes(size))
        if invalid:
            text = text.replace('"audio":"', '"audio":"!')
        reply = session.on_client_text(text, now=0)
        assert (reply.upstream is None) == invalid
        total += 0 if invalid else size
    figures = session.figures(now=0)
    assert figures.audio_bytes == total
    assert (figures.quantity, figures.cost_usd) == bill_time(Fraction(total, BYTES_PER_SECOND), PRICE)


def test_source_transcription_is_refused_unless_turned_off() -> None:
    """audio.input.transcription naming a model is refused (no usage to bill it by); null turns it off and goes."""
    update = {"type": "session.update", "session": {"audio": {"input": {"transcription": {"model": "whisper-1"}}}}}
    reply = core().on_client_text(orjson.dumps(update).decode(), now=0)
    assert error_of(reply).error.code == "transcription_not_supported" and reply.ending is None
    off = {"type": "session.update", "session": {"audio": {"input": {"transcription": None}}}}
    assert core().on_client_text(orjson.dumps(off).decode(), now=0).upstream is not None
