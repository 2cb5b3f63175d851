"""The benchmark provider's replies (bench/provider.py) on each surface: what the load generator matches (without a
socket), and the load generator and provider together on a real socket."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from openai.types.live import InputTranscriptDeltaEvent, SessionClosedEvent, SessionStartedEvent
from openai.types.realtime import (
    RealtimeTranslationOutputTranscriptDeltaEvent,
    RealtimeTranslationSessionClosedEvent,
    RealtimeTranslationSessionCreatedEvent,
)
from picows import ws_create_server

from bench.loadgen import DELTA_TYPE, SURFACES, Plan, append_frame_parts, run, start_frame
from bench.provider import (
    CLOSED_HEAD,
    LIVE,
    REALTIME,
    TRANSLATION,
    created_event,
    listener_for,
    opening,
    reply_to,
    surface_of,
)


def _reply(
    event: dict[str, Any] | bytes, session: dict[str, Any] | None = None, *, surface: str = REALTIME
) -> dict[str, Any] | None:
    payload = event if isinstance(event, bytes) else orjson.dumps(event)
    reply = reply_to(payload, session if session is not None else {}, surface=surface)
    return None if reply is None else orjson.loads(reply)


def test_an_append_is_answered_by_a_delta_carrying_its_event_id() -> None:
    before, after = append_frame_parts()
    reply = _reply(before + b"e41" + after)
    assert reply is not None
    assert reply["type"] == DELTA_TYPE
    assert reply["delta"] == "e41"
    assert reply["event_id"].startswith("event_")


def test_every_delta_has_its_own_event_id() -> None:
    first = _reply({"type": "input_audio_buffer.append", "event_id": "e0", "audio": ""})
    second = _reply({"type": "input_audio_buffer.append", "event_id": "e1", "audio": ""})
    assert first is not None and second is not None
    assert first["event_id"] != second["event_id"]


def test_session_updates_are_merged_and_answered_with_their_updated_event() -> None:
    session: dict[str, Any] = {"model": "m"}
    reply = _reply({"type": "session.update", "session": {"type": "transcription"}}, session)
    assert reply is not None and reply["type"] == "session.updated"
    assert reply["session"] == {"model": "m", "type": "transcription"}
    beta = _reply({"type": "transcription_session.update", "session": {}}, session)
    assert beta is not None and beta["type"] == "transcription_session.updated"


def test_malformed_json_gets_an_error_and_unknown_events_no_reply() -> None:
    error = _reply(b"{not json")
    assert error is not None and error["type"] == "error"
    assert error["error"]["code"] == "invalid_json"
    assert _reply({"type": "input_audio_buffer.commit"}) is None


def test_session_created_is_a_ga_transcription_session() -> None:
    event = orjson.loads(created_event(model="gpt-realtime-whisper", transcription=True))
    assert event["type"] == "session.created"
    assert event["session"]["type"] == "transcription"
    assert event["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}


# ---- GPT-Live and realtime translation (issue 15): the same load shape on their own routes ----------------


@pytest.mark.parametrize(
    ("path", "surface"),
    [
        ("/v1/realtime?model=m&intent=transcription", REALTIME),
        ("/openai/realtime?deployment=d&api-version=x", REALTIME),
        ("/v1/live/sessions", LIVE),
        ("/openai/v1/live/sessions", LIVE),
        ("/v1/realtime/translations?model=gpt-realtime-translate", TRANSLATION),
        ("/openai/v1/realtime/translations?model=d", TRANSLATION),
    ],
)
def test_the_path_names_the_protocol(path: str, surface: str) -> None:
    """OpenAI's and Azure's paths of each surface (the ones sidecar/upstream.py connects to)."""
    assert surface_of(path) == surface


def test_live_waits_for_session_start_and_answers_session_started() -> None:
    """GPT-Live opens with nothing; the client's session.start is answered by a SessionStartedEvent."""
    assert opening(LIVE, model="gpt-live-1", transcription=False) is None
    session: dict[str, Any] = {"model": ""}
    reply = _reply(start_frame("gpt-live-1"), session, surface=LIVE)
    assert reply is not None
    started = SessionStartedEvent.model_validate(reply)
    assert started.session.model == "gpt-live-1"
    assert started.session.id.startswith("sess_")
    assert started.client_event_id == "start"
    assert not any(key.startswith("_") for key in reply["session"])


@pytest.mark.parametrize("surface", [LIVE, TRANSLATION])
def test_an_append_on_each_surface_is_answered_by_its_delta_carrying_the_event_id(surface: str) -> None:
    """The load generator's append for the surface gets the delta it matches, valid for the SDK's type."""
    before, after = append_frame_parts(surface=surface)
    reply = _reply(before + b"e7" + after, {"model": "m"}, surface=surface)
    assert reply is not None
    assert reply["type"] == SURFACES[surface].delta
    assert reply["delta"] == "e7"
    model = InputTranscriptDeltaEvent if surface == LIVE else RealtimeTranslationOutputTranscriptDeltaEvent
    model.model_validate(reply)


@pytest.mark.parametrize("surface", [LIVE, TRANSLATION])
def test_the_realtime_append_is_not_answered_on_the_other_surfaces(surface: str) -> None:
    """Each route answers only its own append event (a relay that mixed them up would show as missing replies)."""
    before, after = append_frame_parts()
    assert _reply(before + b"e1" + after, {"model": "m"}, surface=surface) is None


def test_translation_opens_with_a_translation_session() -> None:
    created = opening(TRANSLATION, model="gpt-realtime-translate", transcription=False)
    assert created is not None
    event = RealtimeTranslationSessionCreatedEvent.model_validate(orjson.loads(created))
    assert event.session.model == "gpt-realtime-translate"
    assert event.session.type == "translation"


def test_session_close_is_answered_by_session_closed_on_the_new_surfaces_only() -> None:
    """`session.close` -> `session.closed` (the connection then closes with 1000); /v1/realtime has no such event."""
    close = orjson.dumps({"type": "session.close"})
    session: dict[str, Any] = {"model": ""}
    _reply(start_frame("gpt-live-1"), session, surface=LIVE)
    live = reply_to(close, session, surface=LIVE)
    assert live is not None and live.startswith(CLOSED_HEAD)
    assert SessionClosedEvent.model_validate(orjson.loads(live)).reason == "close_requested"
    translation = reply_to(close, {"model": "m"}, surface=TRANSLATION)
    assert translation is not None and translation.startswith(CLOSED_HEAD)
    RealtimeTranslationSessionClosedEvent.model_validate(orjson.loads(translation))
    assert reply_to(close, {}, surface=REALTIME) is None


@pytest.mark.parametrize("surface", [REALTIME, LIVE, TRANSLATION])
async def test_the_load_generator_and_the_provider_run_sessions_on_each_surface(surface: str) -> None:
    """Over a real socket (127.0.0.1, port 0): two sessions stream a short window, every append answered,
    closed with 1000, no error (the bench's machinery for each surface, without a relay)."""
    server = await ws_create_server(listener_for("sk-test"), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    routes = {REALTIME: "/v1/realtime?model=m&intent=transcription", LIVE: "/v1/live/sessions"}
    route = routes.get(surface, "/v1/realtime/translations?model=gpt-realtime-translate")
    now = time.monotonic()
    plan = Plan(
        url=f"ws://127.0.0.1:{port}{route}",
        headers={"Authorization": "Bearer sk-test"},
        sessions=[0, 1],
        connect_at=now,
        rate=100.0,
        window=(now + 0.2, now + 0.7),
        drain_s=1.0,
        deadline=now + 10.0,
        surface=SURFACES[surface],
        model="gpt-live-1",
    )
    async with server:
        report = await run(plan)
    assert report.connected == report.completed == 2
    assert report.error_events == report.unmatched_replies == report.missing_replies == 0
    assert report.replies_received == report.appends_sent > 0
    assert len(report.rtt_s) > 0
    assert report.close_codes == {"1000": 2}
