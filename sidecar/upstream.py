"""Provider connectors: URL and header forms, and failover across deployments.

URL forms follow LiteLLM's own realtime handlers (litellm/llms/openai/realtime/handler.py and
litellm/llms/azure/realtime/handler.py) and the provider docs:

- OpenAI and OpenAI-compatible: `<api_base>/v1/realtime?model=<model>`, `Authorization: Bearer <key>`.
  OpenAI itself reads `?model=` as a conversation session and refuses it on `intent=transcription`, so
  for a transcription session on an OpenAI host the model is left out of the URL and put in the session
  configuration instead (`Target.inject_model`). Other hosts keep `?model=`: a gateway may route on it.
- xAI (`xai/` models; LiteLLM's litellm/llms/xai/realtime/handler.py subclasses its OpenAI handler): the
  OpenAI form on xAI's base, `wss://api.x.ai/v1/realtime?model=<model>` (xAI's own example names the model
  in the query), `Authorization: Bearer <key>`, no OpenAI-Beta header. The catalog fills the base
  (XAI_API_BASE, else https://api.x.ai) and the key (XAI_API_KEY) as LiteLLM does.
- Azure OpenAI GA, the default (no `realtime_protocol`, or `GA`/`v1`; an `api_version` alone no longer
  selects the preview form, as in LiteLLM's `azure_realtime_protocol_for_client`): `<api_base>/openai/v1/
  realtime?model=<deployment>`, `api-key: <key>`. A transcription session there is opened as Azure wants it
  now (sidecar/azure_auth.py): a client secret minted with the api-key first, then `<api_base>/openai/v1/
  realtime?intent=transcription` with `Authorization: Bearer ek_...`, no api-key and no `?model=` (Azure
  refuses both), the deployment name as the transcription model in the session configuration.
- Azure OpenAI preview (`realtime_protocol` set to anything else, e.g. `beta`/`preview`, with an
  `api_version`): `<api_base>/openai/realtime?api-version=<v>&deployment=<deployment>`, `api-key: <key>`,
  `intent` passed on. Azure deprecated this form on 2026-04-30 (`preview_deployments`: serve and smoke
  warn).

The other two voice routes (issue 15; `route_target`), each with one form per provider and the credential
only in a header, never in the URL:

- GPT-Live (`/v1/live/sessions`): OpenAI and OpenAI-compatible `<api_base>/v1/live/sessions` with no query
  (the `openai` SDK's `live.connect`: "Connect to Live without query parameters"; the model travels in the
  client's first message, `session.start`, rewritten to the deployment's name by surfaces/live.py).
  Azure: `<api_base>/openai/v1/live/sessions`, no query, `api-key: <key>` (Microsoft Learn, "GPT-Live"
  how-to, learn.microsoft.com/azure/foundry/openai/how-to/gpt-live: `wss://<resource>.openai.azure.com/
  openai/v1/live/sessions`, model in `session.start`, "an API key or Microsoft Entra ID credentials"; the
  page's example shows the Entra bearer form, an API key goes in `api-key` as on every Azure v1 route and
  in LiteLLM's Azure realtime handler). There is no preview form: `api_version` and `realtime_protocol`
  are ignored.
- Realtime translation (`/v1/realtime/translations`): OpenAI and OpenAI-compatible
  `<api_base>/v1/realtime/translations?model=<model>` (the SDK's `realtime.translations.connect(model=)`:
  "The WebSocket URL requires a `model` query parameter"). Azure: `<api_base>/openai/v1/realtime/
  translations?model=<deployment>`, `api-key: <key>`, whatever `api_version` / `realtime_protocol` say
  (LiteLLM 1.110 litellm/llms/azure/realtime/handler.py `_construct_url`, `realtime_mode="translation"`).

A base ending in `/v1` is not given a second one, as on /v1/realtime. (LiteLLM's own OpenAI handlers
replace the base's path instead; the sidecar keeps one rule for every route, so a gateway mounted under a
path prefix works on all three.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol
from urllib.parse import urlencode, urlsplit

from sidecar import azure_auth
from sidecar.azure_auth import SecretRequest
from sidecar.catalog import LIVE_ENDPOINT, REALTIME_ENDPOINT, TRANSLATION_ENDPOINT, Deployment, Route
from sidecar.errors import UpstreamError, UpstreamUnavailable
from sidecar.upstream_conn import open_upstream

log = logging.getLogger("sidecar.upstream")

OPENAI_API_BASE: Final = "https://api.openai.com"
OPENAI_HOSTS: Final = ("api.openai.com",)


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to open one upstream session. `headers` hold the credential: never log them."""

    url: str
    headers: tuple[tuple[str, str], ...] = field(repr=False)
    inject_model: bool
    deployment: Deployment
    #: The route whose protocol the upstream speaks (catalog.ROUTES).
    route: Route = REALTIME_ENDPOINT
    #: Azure transcription: the client-secret exchange whose secret becomes the handshake's credential.
    client_secret: SecretRequest | None = field(default=None, repr=False)

    @property
    def safe_url(self) -> str:
        """The URL without its host (for logs and errors the client may see)."""
        parts = urlsplit(self.url)
        return f"{parts.path}?{parts.query}" if parts.query else parts.path


def _ws_base(api_base: str) -> str:
    base = api_base.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://") :]
    if base.startswith("http://"):
        return "ws://" + base[len("http://") :]
    return base


def is_openai_host(api_base: str | None, *, openai_hosts: Sequence[str] = OPENAI_HOSTS) -> bool:
    """True when the base points at OpenAI itself (or no base: OpenAI's default)."""
    if api_base is None:
        return True
    host = urlsplit(_ws_base(api_base)).hostname or ""
    return any(host == h or host.endswith("." + h) for h in openai_hosts)


def _v1(base: str) -> str:
    """`<base>/v1`, unless the base already ends with it."""
    return base if base.endswith("/v1") else base + "/v1"


def route_target(
    deployment: Deployment,
    route: Route,
    *,
    transcription: bool = False,
    openai_hosts: Sequence[str] = OPENAI_HOSTS,
) -> Target:
    """The URL and headers of `deployment` for a session on `route` (module docstring). Pure.

    `transcription` matters on /v1/realtime only (a transcription session there; `target`).
    """
    if route == LIVE_ENDPOINT:
        return _live_target(deployment)
    if route == TRANSLATION_ENDPOINT:
        return _translation_target(deployment)
    return target(deployment, transcription=transcription, openai_hosts=openai_hosts)


def _api_key_headers(deployment: Deployment) -> tuple[tuple[str, str], ...]:
    """The credential header of the deployment's provider (none without a key)."""
    if not deployment.api_key:
        return ()
    if deployment.provider == "azure":
        return (("api-key", deployment.api_key),)
    return (("Authorization", f"Bearer {deployment.api_key}"),)


def _live_target(deployment: Deployment) -> Target:
    """GPT-Live: no query at all; the model is in the client's `session.start`."""
    if deployment.provider == "azure":
        url = f"{_ws_base(deployment.api_base or '')}/openai/v1/live/sessions"
    else:
        url = f"{_v1(_ws_base(deployment.api_base or OPENAI_API_BASE))}/live/sessions"
    return Target(url, _api_key_headers(deployment), False, deployment, LIVE_ENDPOINT)


def _translation_target(deployment: Deployment) -> Target:
    """Realtime translation: the provider's model (Azure: the deployment name) in `?model=`."""
    query = urlencode({"model": deployment.model})
    if deployment.provider == "azure":
        url = f"{_ws_base(deployment.api_base or '')}/openai/v1/realtime/translations?{query}"
    else:
        url = f"{_v1(_ws_base(deployment.api_base or OPENAI_API_BASE))}/realtime/translations?{query}"
    return Target(url, _api_key_headers(deployment), False, deployment, TRANSLATION_ENDPOINT)


def target(deployment: Deployment, *, transcription: bool, openai_hosts: Sequence[str] = OPENAI_HOSTS) -> Target:
    """The /v1/realtime URL and headers for one deployment. Pure."""
    intent = {"intent": "transcription"} if transcription else {}
    if deployment.provider == "azure":
        return _azure_target(deployment, intent)
    base = _ws_base(deployment.api_base or OPENAI_API_BASE)
    path = _v1(base)
    drop_model = transcription and is_openai_host(deployment.api_base, openai_hosts=openai_hosts)
    query = {**({} if drop_model else {"model": deployment.model}), **intent}
    headers = (("Authorization", f"Bearer {deployment.api_key}"),) if deployment.api_key else ()
    return Target(f"{path}/realtime?{urlencode(query)}", headers, drop_model, deployment)


def azure_preview(deployment: Deployment) -> bool:
    """True when an Azure deployment is configured for the deprecated preview URL form (module docstring)."""
    protocol = (deployment.realtime_protocol or "").upper()
    return deployment.provider == "azure" and protocol not in ("", "GA", "V1")


def preview_deployments(deployments: Sequence[Deployment]) -> list[str]:
    """The deployment ids (else names) of the Azure deployments on the preview form, once each, in order."""
    names = (d.deployment_id or d.model for d in deployments if azure_preview(d))
    return list(dict.fromkeys(names))


def preview_warning(deployments: Sequence[Deployment]) -> str | None:
    """The one warning for every Azure deployment on the preview form (`sidecar serve`, `sidecar smoke`)."""
    names = preview_deployments(deployments)
    if not names:
        return None
    return (
        f"Azure deployment(s) {', '.join(names)} use the preview realtime URL form (/openai/realtime?api-version=), "
        "which Azure deprecated on 2026-04-30: remove realtime_protocol (or set it to GA) to use /openai/v1/realtime"
    )


def _azure_target(deployment: Deployment, intent: dict[str, str]) -> Target:
    base = _ws_base(deployment.api_base or "")
    headers = (("api-key", deployment.api_key),) if deployment.api_key else ()
    if not azure_preview(deployment):
        if intent and deployment.api_key:
            exchange = azure_auth.secret_request(deployment, api_key=deployment.api_key)
            url = f"{base}/openai/v1/realtime?{urlencode(intent)}"
            return Target(url, (), True, deployment, client_secret=exchange)
        query = {**({} if intent else {"model": deployment.model}), **intent}
        url = f"{base}/openai/v1/realtime" + (f"?{urlencode(query)}" if query else "")
        return Target(url, headers, bool(intent), deployment)
    query = {"api-version": deployment.api_version or "", "deployment": deployment.model, **intent}
    return Target(f"{base}/openai/realtime?{urlencode(query)}", headers, False, deployment)


class Upstream(Protocol):
    """What the relay needs of an upstream connection (sidecar.upstream_conn.UpstreamConnection)."""

    async def send(self, message: str | bytes) -> None: ...
    async def recv(self) -> str | bytes: ...
    async def close(self, code: int = 1000, reason: str = "") -> None: ...


Dialer = Callable[[Target], Awaitable[Upstream]]


def websocket_dialer(*, max_frame_bytes: int, connect_timeout_s: float) -> Dialer:
    """A dialer over the lean sans-I/O client (upstream_conn.py). Failures are UpstreamError (no secrets).

    A target with a client-secret exchange (Azure transcription) mints its secret first, within the same
    connect timeout, and opens the socket with it; a failed exchange fails that deployment alone.
    """

    async def dial(tgt: Target) -> Upstream:
        headers = tgt.headers
        minted: tuple[str, ...] = ()
        if tgt.client_secret is not None:
            secret = await azure_auth.mint(tgt.client_secret, timeout_s=connect_timeout_s)
            headers, minted = secret.headers, (secret.value,)
        connection = await open_upstream(
            tgt.url, headers, max_frame_bytes=max_frame_bytes, open_timeout_s=connect_timeout_s
        )
        connection.secrets = minted  # the session scrubs them like the api-key (Connected.secrets)
        return connection

    return dial


@dataclass(frozen=True, slots=True)
class Connected:
    """An open upstream session, the target that answered, and the credentials minted to open it (an Azure
    transcription session's `ek_...`: scrubbed from its frames like the api-key)."""

    connection: Upstream
    target: Target
    attempts: int
    secrets: tuple[str, ...] = field(default=(), repr=False)


async def connect_any(
    deployments: Sequence[Deployment],
    dial: Dialer,
    *,
    transcription: bool,
    route: Route = REALTIME_ENDPOINT,
    openai_hosts: Sequence[str] = OPENAI_HOSTS,
    on_failure: Callable[[Deployment, UpstreamError], None] | None = None,
) -> Connected:
    """Open the first deployment that answers on `route`, in order. Raises UpstreamUnavailable when all fail."""
    for attempt, deployment in enumerate(deployments, start=1):
        tgt = route_target(deployment, route, transcription=transcription, openai_hosts=openai_hosts)
        try:
            connection = await dial(tgt)
            # A dialer's connection may carry what it minted (websocket_dialer's does); test dialers need not.
            return Connected(connection, tgt, attempt, getattr(connection, "secrets", ()))
        except UpstreamError as exc:
            log.warning(
                "upstream connect failed",
                extra={"deployment_id": deployment.deployment_id, "reason": str(exc)},
            )
            if on_failure is not None:
                on_failure(deployment, exc)
        except asyncio.CancelledError:
            raise
    raise UpstreamUnavailable("Every deployment of the model failed to connect.")
