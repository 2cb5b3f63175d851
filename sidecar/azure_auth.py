"""Azure realtime transcription's ephemeral authentication: a client secret minted with the api-key.

Azure refuses a standing api-key on a transcription WebSocket ("This operation requires ephemeral
authentication", as LiteLLM PR 38645 reports for `azure/gpt-live-transcribe`). The deployment's api-key is
exchanged first for a short-lived client secret, and the socket is opened with that:

    POST <resource>/openai/v1/realtime/client_secrets        api-key: <key>, Content-Type: application/json
    {"session": {"type": "transcription",
                 "audio": {"input": {"transcription": {"model": "<deployment>"}}}}}
    200 {"value": "ek_...", "expires_at": <unix seconds>, "session": {...}}

    GET <resource>/openai/v1/realtime?intent=transcription   Authorization: Bearer ek_...   (no `?model=`)

Sources: Microsoft Foundry REST reference "Create a Realtime client secret" (`POST /openai/v1/realtime/
client_secrets`, body `expires_after` + `session` of type `transcription` | `realtime`); the OpenAI SDK's
`realtime.client_secrets.create` (`ClientSecretCreateResponse`: `value`, `expires_at`, `session`); LiteLLM's
litellm/llms/azure/realtime/http_transformation.py (`_azure_realtime_v1_url(.., "client_secrets")`: the v1
surface under the resource, `api-key` header); the Azure realtime audio reference ("Azure OpenAI requires
the name of the existing model deployment" as the transcription model). No `expires_after` is sent: the
default lifetime (about a minute) is more than one handshake needs, and the secret is used at once.

The request and the answer are shaped by pure functions; `mint` is the one HTTP call (httpx), bounded by
the connect timeout. Every failure is an `UpstreamError` whose text names the status or the failure kind,
never the key, the secret or the provider's body (which may echo either).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson

from sidecar.catalog import Deployment
from sidecar.errors import UpstreamError

CLIENT_SECRETS_PATH: Final = "/openai/v1/realtime/client_secrets"
_HTTP_SCHEMES: Final = {"wss": "https", "ws": "http"}


@dataclass(frozen=True, slots=True)
class SecretRequest:
    """The client-secret exchange of one deployment. `headers` hold its api-key: never log them."""

    url: str
    headers: tuple[tuple[str, str], ...] = field(repr=False)
    body: bytes


@dataclass(frozen=True, slots=True)
class ClientSecret:
    """A minted client secret (`ek_...`) and its expiry (unix seconds, when Azure gives one)."""

    value: str = field(repr=False)
    expires_at: int | None

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """The WebSocket handshake's credential: the secret as a bearer token, no api-key."""
        return (("Authorization", f"Bearer {self.value}"),)


def resource_base(api_base: str) -> str:
    """`https://<resource>` from an api_base given in any form (http(s) or ws(s), with `/openai[/v1]`)."""
    parts = urlsplit(api_base.rstrip("/"))
    scheme = _HTTP_SCHEMES.get(parts.scheme, parts.scheme)
    path = parts.path.removesuffix("/v1").removesuffix("/openai")
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def secret_request(deployment: Deployment, *, api_key: str) -> SecretRequest:
    """The exchange for a transcription session whose model is the deployment's name. Pure."""
    session = {"type": "transcription", "audio": {"input": {"transcription": {"model": deployment.model}}}}
    headers = (("api-key", api_key), ("Content-Type", "application/json"))
    url = resource_base(deployment.api_base or "") + CLIENT_SECRETS_PATH
    return SecretRequest(url, headers, orjson.dumps({"session": session}))


def parse_secret(status: int, body: bytes) -> ClientSecret:
    """The secret in Azure's answer. Raises UpstreamError (status or failure kind only) unless 2xx with a
    non-empty `value` fit for a header (printable ASCII, no space) and an integer or absent `expires_at`."""
    if not 200 <= status < 300:
        raise UpstreamError(f"client-secret exchange refused (HTTP {status})", status=status)
    try:
        answer: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        answer = None
    value = answer.get("value") if isinstance(answer, dict) else None
    expires_at = answer.get("expires_at") if isinstance(answer, dict) else None
    token = isinstance(value, str) and value.isascii() and value.isprintable() and " " not in value
    if not token or not value or not (expires_at is None or type(expires_at) is int):
        raise UpstreamError("client-secret exchange gave a malformed answer")
    return ClientSecret(value, expires_at)


async def mint(
    request: SecretRequest, *, timeout_s: float, transport: httpx.AsyncBaseTransport | None = None
) -> ClientSecret:
    """POST the exchange once, within `timeout_s` in all. Raises UpstreamError (never with a secret)."""
    try:
        async with asyncio.timeout(timeout_s), httpx.AsyncClient(timeout=timeout_s, transport=transport) as http:
            response = await http.post(request.url, content=request.body, headers=list(request.headers))
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise UpstreamError("client-secret exchange timed out") from exc
    except httpx.HTTPError as exc:
        raise UpstreamError("client-secret exchange failed to connect") from exc
    return parse_secret(response.status_code, response.content)
