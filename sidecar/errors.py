"""Errors: one root, and the single table from failure to HTTP status, close code and error code.

    SidecarError
    ├── ConfigError                 bad settings or config.yaml (at start; a reload keeps its catalog)
    ├── ProxyModelsUnavailable      LiteLLM's database unreadable for its models (proxy_models.py; at start:
    │                               exit 2, at a reload: 503 service_unavailable, the catalog in force kept)
    ├── Refusal                     refused before the upgrade: an HTTP status + OpenAI error body
    │   ├── InvalidApiKey           401 invalid_api_key
    │   ├── KeyBlocked              403 key_blocked
    │   ├── ModelNotAllowed         403 model_not_allowed
    │   ├── BudgetExceeded          403 budget_exceeded
    │   ├── ModelNotFound           404 model_not_found
    │   ├── ModelNotRealtime        400 model_not_realtime
    │   ├── ModelNotTranscription   400 model_not_transcription
    │   ├── ConcurrencyLimit        429 concurrency_limit
    │   ├── UpstreamUnavailable     502 upstream_unavailable
    │   └── ServiceUnavailable      503 service_unavailable (LiteLLM cannot be asked)
    ├── UpstreamError               an upstream connect/handshake failure (one deployment)
    └── KeyCheckError               the LiteLLM proxy could not be asked about a key

Endings after the upgrade are not exceptions: they are `Ending` values (docs/api.md, close codes),
built by `ending(code)`, each with its close code and error event; a Refusal after the upgrade (GPT-Live's
model arrives in its first message) becomes one by `refused(refusal)`.

Close reasons and error messages never carry exception text from a foreign library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final


class SidecarError(Exception):
    """Root of every exception the sidecar raises on purpose."""


class ConfigError(SidecarError):
    """Settings or the LiteLLM config.yaml are unusable."""


class KeyCheckError(SidecarError):
    """The LiteLLM proxy could not answer a key check (network, 5xx)."""


class UpstreamError(SidecarError):
    """Connecting to one upstream deployment failed. The message is safe to log (no secrets)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Refusal(SidecarError):
    """A refusal before the WebSocket upgrade (docs/api.md, "Refused before the upgrade")."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "invalid_request"
    error_type: ClassVar[str] = "invalid_request_error"

    def body(self) -> dict[str, dict[str, str | None]]:
        """The OpenAI-shaped JSON body."""
        return {"error": {"message": str(self), "type": self.error_type, "code": self.code, "param": None}}


class InvalidApiKey(Refusal):
    status = 401
    code = "invalid_api_key"
    error_type = "authentication_error"


class KeyBlocked(Refusal):
    status = 403
    code = "key_blocked"
    error_type = "permission_error"


class ModelNotAllowed(Refusal):
    status = 403
    code = "model_not_allowed"
    error_type = "permission_error"


class BudgetExceeded(Refusal):
    status = 403
    code = "budget_exceeded"
    error_type = "permission_error"


class ModelNotFound(Refusal):
    status = 404
    code = "model_not_found"
    error_type = "invalid_request_error"


class ModelNotRealtime(Refusal):
    status = 400
    code = "model_not_realtime"
    error_type = "invalid_request_error"


class ModelNotTranscription(Refusal):
    """A transcription session (intent=transcription, or a client secret minted for one) on a conversation model."""

    status = 400
    code = "model_not_transcription"
    error_type = "invalid_request_error"


class ConcurrencyLimit(Refusal):
    status = 429
    code = "concurrency_limit"
    error_type = "rate_limit_error"


class UpstreamUnavailable(Refusal):
    status = 502
    code = "upstream_unavailable"
    error_type = "server_error"


class ServiceUnavailable(Refusal):
    status = 503
    code = "service_unavailable"
    error_type = "server_error"


@dataclass(frozen=True, slots=True)
class Ending:
    """How the sidecar ends a live session: the error event it sends first, then the close code."""

    close_code: int
    code: str
    error_type: str
    message: str

    @property
    def close_reason(self) -> str:
        """The `close_reason` recorded for billing."""
        return self.code


# docs/api.md, "How the sidecar ends a session": close code, error code, message.
_ENDINGS: Final[dict[str, tuple[int, str, str]]] = {
    "key_revoked": (4001, "invalid_request_error", "The API key was revoked."),
    "budget_exceeded": (4002, "invalid_request_error", "The API key's budget is exhausted."),
    "session_terminated": (4003, "invalid_request_error", "The session was terminated by an administrator."),
    "idle_timeout": (4008, "invalid_request_error", "No client event within the idle timeout."),
    "max_duration": (4008, "invalid_request_error", "The session reached its maximum duration."),
    "server_shutdown": (1001, "server_error", "The server is shutting down."),
    "upstream_error": (1011, "server_error", "The upstream realtime connection failed."),
    "frame_too_large": (1009, "invalid_request_error", "The frame exceeds the maximum frame size."),
    # WebRTC calls (sidecar/calls): no client WebSocket to close, the close code is for the table only.
    "client_hangup": (1000, "invalid_request_error", "The call was hung up by its client."),
    "sideband_lost": (1011, "server_error", "The call's sideband could not be re-attached; the call was hung up."),
    # A call's session changed over its data channel (sidecar/calls/guard.py): hung up rather than misbilled.
    "model_mismatch": (1008, "invalid_request_error", "The call's model was changed; the call was hung up."),
    "transcriber_refused": (
        1008,
        "invalid_request_error",
        "The call's input transcription model was changed to one not available here; the call was hung up.",
    ),
    "session_pinned": (
        1008,
        "invalid_request_error",
        "A setting fixed by the call's client secret was changed and could not be restored; the call was hung up.",
    ),
    # GPT-Live (/v1/live/sessions): the session must open with session.start (LiteLLM's code and close code).
    "invalid_session_start": (
        1008,
        "invalid_request_error",
        "The first message must be a session.start JSON object with a non-empty session.model.",
    ),
    "session_start_timeout": (1008, "invalid_request_error", "No session.start within the handshake timeout."),
    # GPT-Live: a session.start that delegates to a Responses or Decisions backend, or sets transcript triggers,
    # which the sidecar can neither authorize nor meter exactly (docs/api.md, "/v1/live/sessions").
    "delegation_not_supported": (
        1008,
        "invalid_request_error",
        "GPT-Live delegation to a Responses or Decisions backend, and transcript triggers, are not supported here.",
    ),
}

# A refusal after the upgrade (GPT-Live names its model in session.start, after it): the refusal's code and
# message as an error event, then this close code (docs/api.md, "/v1/live/sessions"); 1008 for the rest.
_REFUSAL_CLOSE_CODES: Final[dict[str, int]] = {
    "budget_exceeded": 4002,
    "concurrency_limit": 1013,
    "service_unavailable": 1013,
    "upstream_unavailable": 1011,
}


def refused(refusal: Refusal) -> Ending:
    """The ending of a session refused after the upgrade: the refusal's code, type and message, closed with
    the refusal's close code (policy refusals 1008)."""
    close_code = _REFUSAL_CLOSE_CODES.get(refusal.code, 1008)
    return Ending(close_code=close_code, code=refusal.code, error_type=refusal.error_type, message=str(refusal))


def ending(code: str) -> Ending:
    """The contract's ending for `code`. Raises KeyError for an unknown code."""
    close_code, error_type, message = _ENDINGS[code]
    return Ending(close_code=close_code, code=code, error_type=error_type, message=message)
