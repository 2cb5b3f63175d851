"""The provider's WebRTC HTTP endpoints: create a call on the first deployment that answers, and hang one up.

URL forms (upstream.py's rules for the WebSocket routes, over HTTP), the credential in a header, never in the URL:

- realtime: OpenAI and OpenAI-compatible `<api_base>/v1/realtime/calls` with `Authorization: Bearer <key>`
  (a base ending in `/v1` gets no second one); Azure `<api_base>/openai/v1/realtime/calls` with `api-key: <key>`
  (Microsoft Foundry REST reference, "Create a Realtime call": `POST /openai/v1/realtime/calls`, multipart
  `sdp` + `session`, 201 with `Location` and the SDP answer);
- GPT-Live: `<api_base>/v1/live/sessions`, Azure `<api_base>/openai/v1/live/sessions`;
- hangup: `<create path>/{provider call id}/hangup`.

Azure transcription calls are posted with the api-key like every other Azure call. Azure's WebRTC how-to mints
an ephemeral key server-side (`/openai/v1/realtime/client_secrets`) only so that the browser can post the offer
itself; its REST reference for `/openai/v1/realtime/calls` names no ephemeral-only rule, unlike the
transcription WebSocket, which refuses a standing api-key (azure_auth.py). A deployment that refused the
api-key would answer 401/403: skipped like any deployment that refuses.

Failover: a deployment that cannot be reached within the timeout, or answers 401, 403, 404, 408, 429 or 5xx,
or a 2xx the sidecar cannot use (no call id, no SDP), is counted (`on_failure`) and the next one is tried; any
other answer is about the offer itself: OfferRefused with the provider's message, scrubbed. No error text ever
names the provider's key, host, deployment or call id.

HTTP: calls.http11 (h11 on asyncio streams, keep-alive pool, TLS verified, one timeout per request).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from sidecar.calls.call import ProviderCall
from sidecar.calls.http11 import HTTP11Pool, HTTPError, HTTPTimeout
from sidecar.calls.offer import OfferRefused, ProviderRequest, parse_answer, provider_error_message
from sidecar.catalog import LIVE_ENDPOINT, Deployment, RealtimeModel
from sidecar.catalog import Route as SessionRoute
from sidecar.errors import UpstreamError, UpstreamUnavailable
from sidecar.scrub import Scrubber
from sidecar.upstream import OPENAI_API_BASE, _api_key_headers, _v1

log = logging.getLogger("sidecar.calls")

#: A provider's answers that say "not this deployment" rather than "not this offer".
FAILOVER_STATUSES: Final = frozenset({401, 403, 404, 408, 429})
_HTTP_SCHEMES: Final = {"wss://": "https://", "ws://": "http://"}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One provider URL and its credential headers (never logged)."""

    url: str
    headers: tuple[tuple[str, str], ...] = field(repr=False)


def _http_base(api_base: str) -> str:
    base = api_base.rstrip("/")
    for ws, http in _HTTP_SCHEMES.items():
        if base.startswith(ws):
            return http + base[len(ws) :]
    return base


def create_endpoint(deployment: Deployment, route: SessionRoute) -> Endpoint:
    """Where a call on `route` is created on `deployment` (module docstring). Pure."""
    path = "/live/sessions" if route == LIVE_ENDPOINT else "/realtime/calls"
    if deployment.provider == "azure":
        url = f"{_http_base(deployment.api_base or '')}/openai/v1{path}"
    else:
        url = f"{_v1(_http_base(deployment.api_base or OPENAI_API_BASE))}{path}"
    return Endpoint(url, _api_key_headers(deployment))


def hangup_endpoint(call: ProviderCall) -> Endpoint:
    """Where the provider's call is hung up. Pure."""
    created = create_endpoint(call.deployment, call.route)
    # The id is a plain path segment (offer.parse_answer refuses any other).
    return Endpoint(f"{created.url}/{call.call_id}/hangup", created.headers)


@dataclass(frozen=True, slots=True)
class Created:
    """A call the provider answered: the call, the SDP answer for the client, the attempts it took."""

    call: ProviderCall
    sdp: str = field(repr=False)
    attempts: int


async def create_call(
    client: HTTP11Pool,
    model: RealtimeModel,
    route: SessionRoute,
    body_for: Callable[[Deployment], ProviderRequest],
    *,
    timeout_s: float,
    deployments: Sequence[Deployment] | None = None,
    on_failure: Callable[[Deployment, UpstreamError], None] | None = None,
) -> Created:
    """Post the offer to each deployment of `model` in order until one creates the call. `body_for` gives the
    request for a deployment (it may raise a Refusal: the request's own fault, not retried). Raises
    OfferRefused (the provider refused the offer itself) or UpstreamUnavailable (every deployment failed)."""
    for attempt, deployment in enumerate(deployments or model.deployments, start=1):
        request = body_for(deployment)
        try:
            call_id, sdp = await _create_one(client, deployment, route, request, model=model, timeout_s=timeout_s)
        except UpstreamError as exc:
            log.warning(
                "call create failed on a deployment",
                extra={"deployment_id": deployment.deployment_id, "reason": str(exc)},
            )
            if on_failure is not None:
                on_failure(deployment, exc)
            continue
        return Created(ProviderCall(route=route, deployment=deployment, call_id=call_id), sdp, attempt)
    raise UpstreamUnavailable("Every deployment of the model failed to create the call.")


async def _create_one(
    client: HTTP11Pool,
    deployment: Deployment,
    route: SessionRoute,
    request: ProviderRequest,
    *,
    model: RealtimeModel,
    timeout_s: float,
) -> tuple[str, str]:
    """(the provider's call id, the SDP answer). Raises UpstreamError (skip this deployment) or OfferRefused."""
    endpoint = create_endpoint(deployment, route)
    headers = [*endpoint.headers, ("Content-Type", request.content_type)]
    try:
        response = await client.post(endpoint.url, content=request.content, headers=headers, timeout_s=timeout_s)
    except HTTPTimeout as exc:
        raise UpstreamError("call create timed out") from exc
    except HTTPError as exc:
        raise UpstreamError(f"call create failed to connect ({type(exc).__name__})") from exc
    status = response.status
    if 200 <= status < 300:
        answer = parse_answer(route, location=response.headers.get("location"), body=response.content)
        return answer.call_id, answer.sdp
    if status in FAILOVER_STATUSES or status >= 500:
        raise UpstreamError(f"call create refused (HTTP {status})", status=status)
    scrubber = Scrubber.for_deployment(deployment, public_model=model.name)
    message = scrubber.text(provider_error_message(response.content)) or f"HTTP {status}"
    raise OfferRefused(f"The provider refused the offer: {message}")


async def hangup_call(client: HTTP11Pool, call: ProviderCall, *, timeout_s: float = 10.0) -> None:
    """Ask the provider to end `call`. Raises UpstreamError (the status or the failure kind, no secret); a call
    the provider no longer knows (404) is over already: not an error."""
    endpoint = hangup_endpoint(call)
    try:
        response = await client.post(endpoint.url, headers=endpoint.headers, timeout_s=timeout_s)
    except HTTPTimeout as exc:
        raise UpstreamError("call hangup timed out") from exc
    except HTTPError as exc:
        raise UpstreamError(f"call hangup failed to connect ({type(exc).__name__})") from exc
    if not (200 <= response.status < 300 or response.status == 404):
        raise UpstreamError(f"call hangup refused (HTTP {response.status})", status=response.status)
