"""The fake provider's xAI mode (`FakeProvider(xai=True)`): xAI's Voice Agent API as the sidecar must dial it.

xAI's realtime endpoint is `wss://api.x.ai/v1/realtime?model=<model>` with `Authorization: Bearer <key>`
(docs.x.ai, Voice Agent API; LiteLLM's XAIRealtime). In this mode the fake serves only that path and refuses,
before the upgrade: another path (404), an Azure `api-key` header or a Bearer other than the key (401), no
`?model=` (400 `missing_required_parameter`) and an `intent` (400 `unknown_parameter`: xAI has no
transcription intent on this route). After the upgrade it speaks the OpenAI subset of `_Conversation` with
xAI's differences the sidecar meets: the first event is `conversation.created` (no `session.created`), and
`response.done` carries `usage: {}` (xAI bills time and text messages, not tokens; LiteLLM's
XAIRealtimeNormalizer notes the empty usage).

Pure data and functions; fake_provider.py applies them.
"""

from __future__ import annotations

from typing import Any, Final

from sidecar.testing.fake_wire import Event, Handshake, new_id
from sidecar.testing.fake_wire import event as server_event

PATH: Final = "/v1/realtime"


def refusal(handshake: Handshake, *, api_key: str) -> tuple[int, str, str] | None:
    """(HTTP status, error code, message) refusing this handshake in the xAI mode, or None to accept it."""
    if handshake.path != PATH:
        return 404, "not_found", f"Invalid URL (GET {handshake.path})"
    scheme, _, sent = handshake.headers.get("authorization", "").partition(" ")
    if "api-key" in handshake.headers or scheme.lower() != "bearer" or sent.strip() != api_key:
        return 401, "invalid_api_key", "Incorrect API key provided."
    if not handshake.query.get("model"):
        return 400, "missing_required_parameter", "Missing required query parameter: model."
    if "intent" in handshake.query:
        return 400, "unknown_parameter", "Unknown query parameter: intent."
    return None


def opening() -> list[Event]:
    """xAI's first message at connection: `conversation.created`."""
    return [
        server_event("conversation.created", conversation={"id": new_id("conv"), "object": "realtime.conversation"})
    ]


def response_usage() -> dict[str, Any]:
    """The usage of xAI's `response.done`: empty."""
    return {}
