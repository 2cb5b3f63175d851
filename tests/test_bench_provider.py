"""The benchmark provider's replies (bench/provider.py), without a socket: what the load generator matches."""

from __future__ import annotations

from typing import Any

import orjson

from bench.loadgen import DELTA_TYPE, append_frame_parts
from bench.provider import created_event, reply_to


def _reply(event: dict[str, Any] | bytes, session: dict[str, Any] | None = None) -> dict[str, Any] | None:
    payload = event if isinstance(event, bytes) else orjson.dumps(event)
    reply = reply_to(payload, session if session is not None else {})
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
