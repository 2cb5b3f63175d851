"""Realtime events: parse and build the few the sidecar reads or writes; everything else passes through.

Event names follow the OpenAI Realtime API (GA), with the beta names the sidecar also understands.
Parsing uses orjson and happens at most once per frame.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, Final

import orjson

APPEND: Final = "input_audio_buffer.append"
SESSION_UPDATE: Final = "session.update"
BETA_TRANSCRIPTION_UPDATE: Final = "transcription_session.update"
SESSION_UPDATES: Final = frozenset({SESSION_UPDATE, BETA_TRANSCRIPTION_UPDATE})
RESPONSE_CREATED: Final = "response.created"
RESPONSE_DONE: Final = "response.done"
TRANSCRIPTION_COMPLETED: Final = "conversation.item.input_audio_transcription.completed"
SERVER_SESSION_EVENTS: Final = frozenset(
    {
        "session.created",
        "session.updated",
        "transcription_session.created",
        "transcription_session.updated",
    }
)

JSONDecodeError = orjson.JSONDecodeError


#: Parse one frame (str or bytes). Raises JSONDecodeError. orjson's own function: no wrapper on the hot path.
loads: Final[Callable[[str | bytes], Any]] = orjson.loads


def dumps(event: object) -> str:
    """Serialise one event compactly."""
    return orjson.dumps(event).decode()


def event_id() -> str:
    """A fresh server-side event id, in OpenAI's `event_` style."""
    return "event_" + uuid.uuid4().hex[:24]


def error_event(code: str, message: str, *, error_type: str = "invalid_request_error", ref: Any = None) -> str:
    """An `error` server event (OpenAI shape), serialised. `ref` is the client event_id it answers."""
    return dumps(
        {
            "type": "error",
            "event_id": event_id(),
            "error": {
                "type": error_type,
                "code": code,
                "message": message,
                "param": None,
                "event_id": ref if isinstance(ref, str) else None,
            },
        }
    )


def dig(obj: Any, *path: str) -> Any:
    """obj[path[0]][path[1]]... or None when any step is missing or not an object."""
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj
