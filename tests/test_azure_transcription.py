"""Azure transcription as Azure wants it now (issue 16, item 3): the official openai SDK through the sidecar
to the fake provider's Azure transcription mode (fake_azure.py), which refuses the api-key way and accepts
a minted client secret (sidecar/azure_auth.py)."""

from __future__ import annotations

import logging
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from sidecar import azure_auth
from sidecar.catalog import Deployment
from sidecar.cli import startup_warnings
from sidecar.config import Settings
from sidecar.errors import UpstreamError
from sidecar.scrub import REDACTED
from sidecar.smoke import run_smoke
from sidecar.testing.fake_azure import EPHEMERAL_REQUIRED
from sidecar.testing.fake_provider import DEFAULT_TRANSCRIPT, FakeProvider
from sidecar.upstream import target
from tests.relay_stack import USER_KEY, catalog_for, entry, stack
from tests.support import next_of, sdk_transcript

DEPLOYMENT = "my-live-transcribe"
PUBLIC = "captions"


def azure_entry(provider: FakeProvider, model: str = DEPLOYMENT, **params: Any) -> dict[str, Any]:
    """An Azure gpt-live-transcribe deployment on the fake provider."""
    info = {"base_model": "azure/gpt-live-transcribe"}
    return entry(PUBLIC, f"azure/{model}", provider.url, provider.api_key, model_info=info, **params)


async def refused(url: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """Open a WebSocket that must be refused; the HTTP status and JSON body."""
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, additional_headers=headers):
            pass
    return info.value.response.status_code, orjson.loads(info.value.response.body or b"{}")


async def test_the_fake_refuses_the_old_way() -> None:
    """Azure's transcription socket refuses the api-key, `?model=` and an unknown or reused secret."""
    async with FakeProvider(azure_deployments=[DEPLOYMENT]) as provider:
        url = f"{provider.url}/openai/v1/realtime?intent=transcription"
        status, body = await refused(url, {"api-key": provider.api_key})
        assert (status, body["error"]["message"]) == (401, EPHEMERAL_REQUIRED)
        exchange = target(deployment(provider), transcription=True).client_secret
        assert exchange is not None
        secret = await azure_auth.mint(exchange, timeout_s=5)
        assert secret.value.startswith("ek_") and secret.expires_at is not None
        bearer = {"Authorization": f"Bearer {secret.value}"}
        status, _ = await refused(f"{url}&model={DEPLOYMENT}", bearer)
        assert status == 400
        async with connect(url, additional_headers=bearer):
            pass
        status, body = await refused(url, bearer)  # accepted once
        assert (status, body["error"]["message"]) == (401, EPHEMERAL_REQUIRED)


def deployment(provider: FakeProvider, *, model: str = DEPLOYMENT, api_key: str | None = None) -> Deployment:
    return Deployment("azure", model, provider.url, api_key or provider.api_key)


async def test_sdk_transcribes_through_a_minted_secret_and_is_billed(tmp_path: Path, speech_pcm16: bytes) -> None:
    """The SDK's transcription session reaches Azure with a Bearer ek_ (no api-key, no ?model=), the
    deployment name as its transcription model, and is billed at gpt-live-transcribe's price."""
    async with FakeProvider(azure_deployments=[DEPLOYMENT]) as provider:
        async with stack(tmp_path, entries=[azure_entry(provider)], provider=provider) as s:
            transcript = await sdk_transcript(s.sidecar.openai(USER_KEY), speech_pcm16, model=PUBLIC)
            row = await s.final_row()
            price = s.sidecar.app.state.services.catalog.resolve(PUBLIC).price.per_unit
        assert transcript == DEFAULT_TRANSCRIPT
        assert provider.azure is not None
        assert provider.azure.requests == [
            {"session": {"type": "transcription", "audio": {"input": {"transcription": {"model": DEPLOYMENT}}}}}
        ]
        handshake = provider.handshakes[0]
        assert (handshake.path, handshake.query) == ("/openai/v1/realtime", {"intent": "transcription"})
        assert handshake.headers["authorization"] == f"Bearer {provider.azure.minted[0]}"
        assert "api-key" not in handshake.headers
        first = provider.sessions[0].events[0]
        assert first["session"]["audio"]["input"]["transcription"]["model"] == DEPLOYMENT
        assert row.audio_bytes == len(speech_pcm16) and row.model == PUBLIC
        assert price == Decimal("0.000283333333333")
        assert abs(row.cost_usd - row.audio_seconds * price) <= Decimal("1e-10")


async def test_the_fake_refuses_a_transcription_model_that_is_no_deployment(tmp_path: Path) -> None:
    """The fake checks the session's transcription model: a public name is refused, the deployment is not
    (the sidecar always sends the deployment, so only a raw socket can get it wrong)."""
    async with FakeProvider(azure_deployments=[DEPLOYMENT]) as provider:
        exchange = target(deployment(provider), transcription=True).client_secret
        assert exchange is not None
        secret = await azure_auth.mint(exchange, timeout_s=5)
        url = f"{provider.url}/openai/v1/realtime?intent=transcription"
        async with connect(url, additional_headers={"Authorization": f"Bearer {secret.value}"}) as ws:
            await ws.recv()  # session.created
            for model, answer in (("gpt-live-transcribe", "error"), (DEPLOYMENT, "session.updated")):
                update = {"type": "transcription", "audio": {"input": {"transcription": {"model": model}}}}
                await ws.send(orjson.dumps({"type": "session.update", "session": update}).decode())
                assert orjson.loads(await ws.recv())["type"] == answer


async def test_failed_exchange_is_upstream_unavailable_and_fails_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused exchange fails that deployment (the next one serves); when every exchange fails the client
    gets 502 upstream_unavailable. No api-key and no ek_ value in the logs or anything the client sees."""
    caplog.set_level(logging.DEBUG)
    async with (
        FakeProvider(azure_deployments=[DEPLOYMENT]) as bad,
        FakeProvider(azure_deployments=[DEPLOYMENT], api_key="sk-fake-provider-key-good-0001") as good,
    ):
        assert bad.azure is not None and good.azure is not None
        bad.azure.status = 401
        entries = [azure_entry(bad), azure_entry(good)]
        async with stack(tmp_path, entries=entries, provider=good) as s:
            text = await sdk_transcript(s.sidecar.openai(USER_KEY), b"\0" * 48_000, model=PUBLIC)
            assert text == DEFAULT_TRANSCRIPT
            assert bad.handshakes == [] and len(good.handshakes) == 1
            good.azure.status = 500
            url = f"{s.sidecar.ws}/v1/realtime?model={PUBLIC}&intent=transcription"
            status, body = await refused(url, {"Authorization": f"Bearer {USER_KEY}"})
            async with httpx.AsyncClient(base_url=s.sidecar.http) as http:
                models = (await http.get("/v1/realtime/models")).text
        assert (status, body["error"]["code"]) == (502, "upstream_unavailable")
        # The fake providers' own server logs (websockets.server) may show what they were sent; the sidecar's may not.
        ours = [r for r in caplog.records if not r.name.startswith("websockets.server")]
        logs = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in ours)
        seen = logs + orjson.dumps(body).decode() + models
        for secret in (bad.api_key, good.api_key, *good.azure.minted):
            assert secret not in seen
        assert "client-secret exchange refused (HTTP 401)" in [getattr(r, "reason", None) for r in ours]


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (401, b'{"error": {"message": "bad key az-secret"}}', r"refused \(HTTP 401\)"),
        (200, b"not json", "malformed"),
        (200, b'{"value": ""}', "malformed"),
        (200, b'{"value": "ek_x\\r\\nX-Injected: 1"}', "malformed"),
        (200, b'{"value": "ek_x", "expires_at": "soon"}', "malformed"),
    ],
)
def test_parse_secret_failures_carry_no_provider_text(status: int, body: bytes, reason: str) -> None:
    """Non-2xx and malformed answers are UpstreamError naming the failure, never the provider's text."""
    with pytest.raises(UpstreamError, match=reason) as info:
        azure_auth.parse_secret(status, body)
    assert "az-secret" not in str(info.value)


async def test_exchange_timeout_is_an_upstream_error() -> None:
    """An exchange that does not answer within the connect timeout fails (httpx's timeout, translated)."""

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no answer", request=request)

    exchange = azure_auth.secret_request(Deployment("azure", "d", "https://res.example", "k"), api_key="k")
    with pytest.raises(UpstreamError, match="timed out"):
        await azure_auth.mint(exchange, timeout_s=5, transport=httpx.MockTransport(slow))


def test_resource_base_accepts_every_api_base_form() -> None:
    """The exchange goes to the resource's v1 surface whatever form api_base takes."""
    for base in ("https://r.example", "https://r.example/", "https://r.example/openai", "wss://r.example/openai/v1"):
        assert azure_auth.resource_base(base) + azure_auth.CLIENT_SECRETS_PATH == (
            "https://r.example/openai/v1/realtime/client_secrets"
        )


def test_gpt_live_transcribe_is_a_transcription_model_like_gpt_realtime_whisper() -> None:
    """gpt-live-transcribe and azure/gpt-live-transcribe are transcription models priced per second like
    gpt-realtime-whisper (the price map's entries; nothing added to the catalog's rules)."""
    base = "ws://127.0.0.1:1"
    catalog = catalog_for(
        [
            entry("whisper", "openai/gpt-realtime-whisper", base, "k"),
            entry("live", "openai/gpt-live-transcribe", base, "k"),
            entry("azure-live", "azure/gpt-live-transcribe", base, "k"),
        ]
    )
    for name in ("whisper", "live", "azure-live"):
        model = catalog.resolve(name)
        assert (model.kind, model.price.unit) == ("realtime-transcription", "second"), name
    assert catalog.resolve("azure-live").price.per_unit == Decimal("0.000283333333333")


async def test_preview_form_still_works_and_serve_and_smoke_warn(tmp_path: Path) -> None:
    """A deployment on the preview form (realtime_protocol beta) is served with its api-key as before; serve's
    startup warnings and smoke's output say once that Azure deprecated the form on 2026-04-30."""
    async with FakeProvider(azure_deployments=[DEPLOYMENT]) as provider:
        preview = azure_entry(provider, api_version="2025-04-01-preview", realtime_protocol="beta")
        ga = azure_entry(provider)
        catalog = catalog_for([preview, ga])
        config = tmp_path / "config.yaml"
        config.write_text(orjson.dumps({"model_list": [preview, ga]}).decode())
        settings = Settings(litellm_config=config, spool_dir=tmp_path / "spool")
        warnings = [w for w in startup_warnings(settings, catalog) if "2026-04-30" in w]
        assert len(warnings) == 1 and "captions#0" in warnings[0] and "captions#1" not in warnings[0]
        lines: list[str] = []
        assert await run_smoke(settings, PUBLIC, timeout_s=5, out=lines.append) == 0
        assert len([line for line in lines if "2026-04-30" in line]) == 1
        assert [line[:4] for line in lines if line.startswith(("ok", "FAIL"))] == ["ok  ", "ok  "]
        assert provider.handshakes[0].headers["api-key"] == provider.api_key
        assert provider.handshakes[0].path == "/openai/realtime"
        assert "authorization" in provider.handshakes[1].headers


async def test_a_conversation_session_on_the_same_azure_resource_keeps_the_api_key(tmp_path: Path) -> None:
    """Conversation sessions are not transcription sessions: GA `?model=<deployment>` with the api-key, as
    LiteLLM's Azure realtime handler sends it; no client secret is minted."""
    async with FakeProvider(azure_deployments=[DEPLOYMENT]) as provider:
        info = {"base_model": "azure/gpt-realtime"}
        voice = entry("voice", "azure/my-realtime", provider.url, provider.api_key, model_info=info)
        async with stack(tmp_path, entries=[voice], provider=provider) as s:
            async with s.sidecar.openai(USER_KEY).realtime.connect(model="voice") as conn:
                await next_of(conn, "session.created")
        assert provider.azure is not None and provider.azure.requests == []
        handshake = provider.handshakes[0]
        assert (handshake.path, handshake.query) == ("/openai/v1/realtime", {"model": "my-realtime"})
        assert handshake.headers["api-key"] == provider.api_key and "authorization" not in handshake.headers


async def test_a_provider_echoing_the_minted_secret_never_shows_it_to_the_client(tmp_path: Path) -> None:
    """The ek_ client secret a transcription session was opened with is scrubbed like the api-key: the fake
    echoes it (and the key) in its empty-commit error; the client sees neither."""
    async with FakeProvider(azure_deployments=[DEPLOYMENT]) as provider:
        async with stack(tmp_path, entries=[azure_entry(provider)], provider=provider) as s:
            client = s.sidecar.openai(USER_KEY)
            async with client.realtime.connect(model=PUBLIC, extra_query={"intent": "transcription"}) as conn:
                await next_of(conn, "session.created")
                await conn.input_audio_buffer.commit()
                error = await next_of(conn, "error")
        assert provider.azure is not None and len(provider.azure.minted) == 1
        secret = provider.azure.minted[0]
        echoed = provider.sessions[0].handshake.headers["authorization"]
        assert secret in echoed  # the bait was really sent upstream
        text = error.model_dump_json()
        assert "buffer too small" in text
        assert secret not in text and provider.api_key not in text
        assert f"[Bearer {REDACTED}]" in error.error.message
