"""sidecar/calls/provider.py: the provider's WebRTC URLs and auth per deployment kind, failover, hangup."""

from __future__ import annotations

import json as jsonlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest

from sidecar.calls.call import ProviderCall
from sidecar.calls.http11 import HTTP11Pool, HTTPError, HTTPTimeout, Response
from sidecar.calls.offer import OfferRefused, ProviderRequest
from sidecar.calls.provider import create_call, create_endpoint, hangup_call, hangup_endpoint
from sidecar.catalog import LIVE_ENDPOINT, REALTIME_ENDPOINT, Deployment, RealtimeModel
from sidecar.errors import UpstreamError, UpstreamUnavailable
from sidecar.pricing import Price

ANSWER = "v=0\r\ns=-\r\n"
OPENAI = Deployment("openai", "gpt-realtime", None, "sk-openai-key")
GATEWAY = Deployment("openai", "gpt-realtime", "http://gw.internal:8080/v1", "sk-gw")
AZURE = Deployment("azure", "my-azure-rt", "https://res.openai.azure.com/", "azure-key-123", deployment_id="az")
BODY = ProviderRequest("application/sdp", b"v=0\r\n")


def model(*deployments: Deployment) -> RealtimeModel:
    return RealtimeModel("gpt-realtime", "realtime-conversation", Price("token"), "gpt-realtime", deployments)


def test_urls_and_auth_per_deployment_kind() -> None:
    """OpenAI <base>/v1/realtime/calls with Bearer (no second /v1), Azure <base>/openai/v1/... with api-key."""
    assert create_endpoint(OPENAI, REALTIME_ENDPOINT).url == "https://api.openai.com/v1/realtime/calls"
    assert create_endpoint(OPENAI, REALTIME_ENDPOINT).headers == (("Authorization", "Bearer sk-openai-key"),)
    assert create_endpoint(GATEWAY, LIVE_ENDPOINT).url == "http://gw.internal:8080/v1/live/sessions"
    azure = create_endpoint(AZURE, REALTIME_ENDPOINT)
    assert azure.url == "https://res.openai.azure.com/openai/v1/realtime/calls"
    assert azure.headers == (("api-key", "azure-key-123"),)
    assert create_endpoint(AZURE, LIVE_ENDPOINT).url == "https://res.openai.azure.com/openai/v1/live/sessions"
    wss = Deployment("openai", "m", "wss://gw.example/v1", None)
    assert create_endpoint(wss, REALTIME_ENDPOINT) == create_endpoint(
        Deployment("openai", "m", "https://gw.example/v1", None), REALTIME_ENDPOINT
    )
    assert create_endpoint(wss, REALTIME_ENDPOINT).headers == ()
    call = ProviderCall(route=LIVE_ENDPOINT, deployment=AZURE, call_id="sess_1")
    assert hangup_endpoint(call).url == "https://res.openai.azure.com/openai/v1/live/sessions/sess_1/hangup"
    assert "azure-key-123" not in repr(azure)


@dataclass(frozen=True)
class Seen:
    """One request the fake provider received: its URL, headers (names in lower case) and body."""

    url: str
    headers: dict[str, str]
    content: bytes


class Provider(HTTP11Pool):
    """The provider as the calls' HTTP client sees it: `answers` in order (an exception is the client's failure)."""

    def __init__(self, *answers: Response | Exception) -> None:
        super().__init__()
        self.queue = list(answers)
        self.seen: list[Seen] = []

    async def post(
        self, url: str, *, headers: Sequence[tuple[str, str]] = (), content: bytes = b"", timeout_s: float
    ) -> Response:
        self.seen.append(Seen(url, {name.lower(): value for name, value in headers}, content))
        answer = self.queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def transport(*answers: Response | Exception) -> tuple[Provider, list[Seen]]:
    """A client whose provider gives `answers` in order."""
    client = Provider(*answers)
    return client, client.seen


def reply(status: int, text: str = "", headers: dict[str, str] | None = None, json: object = None) -> Response:
    content = jsonlib.dumps(json).encode() if json is not None else text.encode()
    return Response(status, {name.lower(): value for name, value in (headers or {}).items()}, content)


def created(call_id: str = "rtc_1") -> Response:
    return reply(201, text=ANSWER, headers={"Location": f"/v1/realtime/calls/{call_id}"})


def body_for(deployment: Deployment) -> ProviderRequest:
    return BODY


def recorder() -> tuple[list[tuple[str, int | None]], Callable[[Deployment, UpstreamError], None]]:
    failures: list[tuple[str, int | None]] = []
    return failures, lambda deployment, error: failures.append((deployment.model, error.status))


@pytest.mark.parametrize(
    "refusal",
    [
        reply(500),
        reply(503),
        reply(429),
        reply(401),
        reply(404),
        reply(201, text=ANSWER),  # no Location: no call the sidecar could control
        HTTPError("refused"),
        HTTPTimeout("slow"),
    ],
)
async def test_a_failing_deployment_is_skipped(refusal: Response | Exception) -> None:
    """Connect errors, timeouts, 401/404/429/5xx and unusable answers fail over to the next deployment, counted."""
    client, seen = transport(refusal, created("rtc_second"))
    failures, on_failure = recorder()
    async with client:
        done = await create_call(
            client, model(AZURE, OPENAI), REALTIME_ENDPOINT, body_for, timeout_s=5, on_failure=on_failure
        )
    assert (done.call.deployment, done.call.call_id, done.sdp, done.attempts) == (OPENAI, "rtc_second", ANSWER, 2)
    assert [r.url for r in seen] == [
        "https://res.openai.azure.com/openai/v1/realtime/calls",
        "https://api.openai.com/v1/realtime/calls",
    ]
    assert seen[0].headers["api-key"] == "azure-key-123" and "authorization" not in seen[0].headers
    assert seen[1].headers["authorization"] == "Bearer sk-openai-key" and "api-key" not in seen[1].headers
    assert seen[1].headers["content-type"] == "application/sdp" and seen[1].content == BODY.content
    assert len(failures) == 1 and failures[0][0] == "my-azure-rt"


async def test_every_deployment_failing_is_upstream_unavailable_without_detail() -> None:
    """All refusing: UpstreamUnavailable whose message names no host, key or deployment."""
    client, _ = transport(reply(500, text="res.openai.azure.com azure-key-123"), HTTPError("x"))
    failures, on_failure = recorder()
    async with client:
        with pytest.raises(UpstreamUnavailable) as caught:
            await create_call(
                client, model(AZURE, OPENAI), REALTIME_ENDPOINT, body_for, timeout_s=5, on_failure=on_failure
            )
    text = str(caught.value)
    assert not any(secret in text for secret in ("azure", "my-azure-rt", "sk-openai", "api.openai.com"))
    assert [status for _, status in failures] == [500, None]


async def test_an_offer_refused_by_the_provider_is_the_clients_error_scrubbed() -> None:
    """A 400 about the offer stops there (no failover) with the provider's message, its secrets scrubbed."""
    message = "Bad SDP for my-azure-rt at res.openai.azure.com with key azure-key-123"
    client, seen = transport(reply(400, json={"error": {"message": message}}), created())
    async with client:
        with pytest.raises(OfferRefused) as caught:
            await create_call(client, model(AZURE, OPENAI), REALTIME_ENDPOINT, body_for, timeout_s=5)
    text = str(caught.value)
    assert len(seen) == 1 and "Bad SDP" in text
    assert "my-azure-rt" not in text and "res.openai.azure.com" not in text and "azure-key-123" not in text
    assert caught.value.status == 400 and caught.value.code == "offer_refused"


async def test_live_create_reads_the_json_answer() -> None:
    """GPT-Live: the call id is the JSON session.id."""
    live = reply(200, json={"session": {"id": "sess_9"}, "transport": {"type": "webrtc", "sdp": ANSWER}})
    client, seen = transport(live)
    async with client:
        done = await create_call(client, model(GATEWAY), LIVE_ENDPOINT, body_for, timeout_s=5)
    assert done.call == ProviderCall(route=LIVE_ENDPOINT, deployment=GATEWAY, call_id="sess_9")
    assert seen[0].url == "http://gw.internal:8080/v1/live/sessions"


async def test_hangup() -> None:
    """POST <create path>/{id}/hangup with the credential; 404 (already over) is fine; other failures raise
    UpstreamError with the status only."""
    call = ProviderCall(route=REALTIME_ENDPOINT, deployment=OPENAI, call_id="rtc_7")
    client, seen = transport(reply(200), reply(404), reply(500), HTTPError("x"))
    async with client:
        await hangup_call(client, call)
        await hangup_call(client, call)
        with pytest.raises(UpstreamError, match="HTTP 500") as refused:
            await hangup_call(client, call)
        assert refused.value.status == 500
        with pytest.raises(UpstreamError, match="connect"):
            await hangup_call(client, call)
    assert seen[0].url == "https://api.openai.com/v1/realtime/calls/rtc_7/hangup"
    assert seen[0].headers["authorization"] == "Bearer sk-openai-key"
