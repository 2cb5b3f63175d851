"""The fake provider's Azure transcription mode: Azure's ephemeral authentication, enforced.

`FakeProvider(azure_deployments=[...])` turns it on. Then, like Azure (sidecar/azure_auth.py cites the
references):

- `POST /openai/v1/realtime/client_secrets` wants the resource's `api-key` (401 otherwise) and a body
  `{"session": {"type": "transcription", "audio": {"input": {"transcription": {"model": <deployment>}}}}}`
  whose model is one of the deployments (400 otherwise); it answers `{"value": "ek_...", "expires_at": ..,
  "session": {...}}`. `status` (when set) refuses every exchange with that HTTP status instead.
- A transcription socket (`/openai/v1/realtime?intent=transcription`) is refused with an api-key (401
  "This operation requires ephemeral authentication."), with `?model=` (400, as Azure refuses a
  transcription model there), and without a bearer secret minted here and not yet used (401); a secret is
  accepted once.
- The session's transcription model (`session.update`) must be a deployment name (`model_error`).

Conversation sockets and the preview form keep the api-key (the caller's checks). The websockets server
parses GET requests only, so `posted` turns a complete POST into the GET that websockets can parse, keeping
the body aside for `process_request` to answer (no other way in without a second port: the sidecar derives
both URLs from one api_base).
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from sidecar.testing.fake_wire import Handshake

CLIENT_SECRETS_PATH: Final = "/openai/v1/realtime/client_secrets"
TRANSCRIPTION_PATH: Final = "/openai/v1/realtime"
EPHEMERAL_REQUIRED: Final = "This operation requires ephemeral authentication."
SECRET_LIFETIME_S: Final = 60


@dataclass(frozen=True)
class Answer:
    """An HTTP answer: status and JSON body."""

    status: int
    body: dict[str, Any]


def _azure_error(status: int, code: str, message: str) -> Answer:
    """Azure's error body shape (`{"error": {"code", "message"}}`)."""
    return Answer(status, {"error": {"code": code, "message": message}})


def posted(raw: bytes) -> tuple[bytes, bytes] | None:
    """(the request as a body-less GET head, its body) once `raw` holds a whole POST; None until then."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.split(b"\r\n")
    length = 0
    kept = [b"GET " + lines[0].removeprefix(b"POST ")]
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
        elif name.strip().lower() != b"content-type":
            kept.append(line)
    if len(rest) < length:
        return None
    return b"\r\n".join(kept) + b"\r\n\r\n", bytes(rest[:length])


@dataclass
class AzureTranscription:
    """The mode's state: the resource key, its deployment names, the secrets minted and not yet used."""

    api_key: str
    deployments: Collection[str]
    #: Refuse every client-secret exchange with this HTTP status (a failed exchange).
    status: int | None = None
    #: Every exchange's body as received (tests check its shape).
    requests: list[dict[str, Any]] = field(default_factory=list)
    minted: list[str] = field(default_factory=list)
    _unused: dict[str, str] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def client_secret(self, headers: dict[str, str], body: bytes, *, now: float) -> Answer:
        """Answer `POST /openai/v1/realtime/client_secrets`."""
        if self.status is not None:
            return _azure_error(self.status, "fault_injected", f"Refused by fault injection (HTTP {self.status}).")
        if headers.get("api-key") != self.api_key:
            return _azure_error(401, "401", "Access denied due to invalid subscription key or wrong API endpoint.")
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _azure_error(400, "invalid_json", "The request body is not JSON.")
        self.requests.append(request)
        session = request.get("session") if isinstance(request, dict) else None
        model = _transcription_model(session) if isinstance(session, dict) else None
        if not isinstance(session, dict) or session.get("type") != "transcription" or model is None:
            return _azure_error(400, "invalid_value", "session must be a transcription session naming its model.")
        if model not in self.deployments:
            return _azure_error(400, "DeploymentNotFound", "The transcription model is not a deployment name.")
        value = f"ek_fake{next(self._ids)}_{secrets.token_hex(12)}"
        self._unused[value] = model
        self.minted.append(value)
        expires_at = int(now) + SECRET_LIFETIME_S
        answer_session = {"type": "transcription", "audio": {"input": {"transcription": {"model": model}}}}
        return Answer(200, {"value": value, "expires_at": expires_at, "session": answer_session})

    def refusal(self, handshake: Handshake) -> Answer | None:
        """Why a transcription socket is refused, or None to accept it (and spend its secret)."""
        if handshake.path != TRANSCRIPTION_PATH or handshake.query.get("intent") != "transcription":
            return None
        if "api-key" in handshake.headers:
            return _azure_error(401, "Unauthorized", EPHEMERAL_REQUIRED)
        if "model" in handshake.query:
            message = "The realtime operation does not work with the specified model. Please choose different model."
            return _azure_error(400, "OperationNotSupported", message)
        scheme, _, token = handshake.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or self._unused.pop(token.strip(), None) is None:
            return _azure_error(401, "Unauthorized", EPHEMERAL_REQUIRED)
        return None

    def model_error(self, update: dict[str, Any]) -> str | None:
        """Why a transcription session's update is refused: its transcription model is no deployment."""
        model = _transcription_model(update)
        if model is None or model in self.deployments:
            return None
        return f"Invalid transcription model: {model!r} is not a deployment of this resource."


def _transcription_model(session: dict[str, Any]) -> str | None:
    """The GA (`audio.input.transcription.model`) or beta (`input_audio_transcription.model`) model named."""
    audio = session.get("audio")
    holders = [
        (audio.get("input") or {}).get("transcription") if isinstance(audio, dict) else None,
        session.get("input_audio_transcription"),
    ]
    for holder in holders:
        if isinstance(holder, dict) and isinstance(holder.get("model"), str):
            return str(holder["model"])
    return None
