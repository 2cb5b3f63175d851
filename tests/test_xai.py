"""xAI's Voice Agent API (`xai/grok-voice-*`, issue 16 item 4): the catalog, the upstream form, the pure core's
session seconds and text messages, and a session through the sidecar with the official `openai` SDK against the
fake provider's xAI mode, billed exactly on a clock the test moves (no sleeping)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from sidecar.auth import Principal
from sidecar.catalog import Catalog, build_catalog, describe, load_price_map
from sidecar.errors import ModelNotFound, ModelNotRealtime
from sidecar.metering import SessionMeter
from sidecar.surfaces.core import SessionClock
from sidecar.surfaces.xai import XaiSession, is_text_message
from sidecar.testing.fake_provider import FakeProvider
from sidecar.upstream import route_target
from tests.relay_stack import USER_KEY, entry, stack

PRICE_MAP = load_price_map()
PER_SECOND = Decimal("0.001333333333333")  # xai/grok-voice-latest input_cost_per_second
PER_MESSAGE = Decimal("0.004")  # its input_cost_per_text_message
NS = 1_000_000_000
QUANTUM = Decimal("1e-10")


class Clock:
    """The sidecar's monotonic clock in nanoseconds, moved by the test."""

    def __init__(self) -> None:
        self.ns = 11 * NS

    def __call__(self) -> int:
        return self.ns

    def advance(self, seconds: str) -> None:
        self.ns += int(Decimal(seconds) * NS)


def xai_catalog(environ: dict[str, str], **params: Any) -> Catalog:
    models = [
        {"model_name": "grok-voice", "litellm_params": {"model": "xai/grok-voice-latest", **params}},
        {"model_name": "grok-chat", "litellm_params": {"model": "xai/grok-4", **params}},
        {"model_name": "grok-nope", "litellm_params": {"model": "xai/grok-voice-nope", **params}},
    ]
    return build_catalog({"model_list": models}, price_map=PRICE_MAP, environ=environ)


def item(*content: dict[str, Any], kind: str = "message") -> str:
    body: dict[str, Any] = {"type": kind}
    if kind == "message":
        body |= {"role": "user", "content": list(content)}
    return orjson.dumps({"type": "conversation.item.create", "item": body}).decode()


TEXT = {"type": "input_text", "text": "hello"}
AUDIO = {"type": "input_audio", "audio": base64.b64encode(bytes(480)).decode()}
TOOL_RESULT = orjson.dumps(
    {"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": "c1", "output": "{}"}}
).decode()


# --- catalog and upstream -------------------------------------------------------------------------------


def test_an_xai_voice_model_is_a_realtime_session_priced_per_second_and_per_text_message() -> None:
    """xai/grok-voice-latest: kind realtime-session, unit second, both prices from the price map; LiteLLM's defaults
    for the base (https://api.x.ai) and the key (XAI_API_KEY)."""
    catalog = xai_catalog({"XAI_API_KEY": "xai-env-key"})
    model = catalog.resolve("grok-voice")
    assert (model.kind, model.price.unit) == ("realtime-session", "second")
    assert (model.price.per_unit, model.price.per_text_message) == (PER_SECOND, PER_MESSAGE)
    (deployment,) = model.deployments
    assert (deployment.provider, deployment.model) == ("xai", "grok-voice-latest")
    assert (deployment.api_base, deployment.api_key) == ("https://api.x.ai", "xai-env-key")
    (row,) = describe(catalog)
    assert row["pricing"] == {"input_cost_per_second": "0.001333333333333", "input_cost_per_text_message": "0.004"}
    assert row["providers"] == ["xai"] and "xai-env-key" not in str(row)


def test_the_config_wins_over_the_xai_variables() -> None:
    """litellm_params.api_key / api_base win; XAI_API_BASE comes before xAI's own base."""
    catalog = xai_catalog({"XAI_API_KEY": "env", "XAI_API_BASE": "https://xai.example"}, api_key="cfg")
    (deployment,) = catalog.resolve("grok-voice").deployments
    assert (deployment.api_base, deployment.api_key) == ("https://xai.example", "cfg")
    unset = xai_catalog({})
    assert unset.resolve("grok-voice").deployments[0].api_key is None
    assert any("grok-voice" in warning and "api_key" in warning for warning in unset.warnings)


def test_unknown_and_non_voice_xai_models_are_refused() -> None:
    """An xai model the price map does not know as realtime, a chat model, and a name not in the config."""
    catalog = xai_catalog({"XAI_API_KEY": "k"})
    with pytest.raises(ModelNotRealtime):
        catalog.resolve("grok-nope")
    with pytest.raises(ModelNotRealtime):
        catalog.resolve("grok-chat")
    with pytest.raises(ModelNotFound):
        catalog.resolve("grok-voice-9")


def test_the_xai_upstream_form() -> None:
    """wss://api.x.ai/v1/realtime?model=<model>, Authorization: Bearer, nothing else."""
    deployment = xai_catalog({"XAI_API_KEY": "k"}).resolve("grok-voice").deployments[0]
    tgt = route_target(deployment, "/v1/realtime")
    assert tgt.url == "wss://api.x.ai/v1/realtime?model=grok-voice-latest"
    assert tgt.headers == (("Authorization", "Bearer k"),) and not tgt.inject_model


# --- the pure core --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "counted"),
    [
        (item(TEXT), True),
        (item(TEXT, TEXT), True),  # one event, one message
        (item(kind="function_call"), True),  # every item but the two exceptions
        (item(AUDIO), False),  # billed as audio
        (item(TEXT, {"type": "audio", "audio": ""}), False),
        (TOOL_RESULT, False),
        ('{"type":"response.create"}', False),
        ('{"type":"session.update","session":{}}', False),
    ],
)
def test_what_counts_as_a_text_message(frame: str, counted: bool) -> None:
    """xAI's rule: each client conversation.item.create, except function_call_output and audio items."""
    assert is_text_message(orjson.loads(frame)) is counted


def test_session_clock() -> None:
    """From the first start to the first stop; 0 before the start; running until stopped."""
    clock = SessionClock()
    assert clock.seconds(now=5) == 0
    clock.start(NS)
    clock.start(2 * NS)
    assert clock.seconds(now=3 * NS) == 2
    assert clock.stop(4 * NS) and not clock.stop(9 * NS)
    assert clock.seconds(now=100 * NS) == 3
    assert SessionClock().seconds(now=1) == 0
    exact = SessionClock()
    exact.start(0)
    assert exact.seconds(now=1) == Fraction(1, NS)  # exact nanoseconds, no float on the way


def core() -> XaiSession:
    catalog = xai_catalog({"XAI_API_KEY": "k"})
    model = catalog.resolve("grok-voice")
    principal = Principal(key_hash="h", key_alias="", user_id="u", team_id="", models=())
    return XaiSession(
        session_id="rs_1",
        model=model,
        deployment=model.deployments[0],
        principal=principal,
        meter=SessionMeter(model.price),
        started_at=datetime.now(UTC),
        transcription=False,
    )


def test_the_core_bills_session_seconds_plus_text_messages() -> None:
    """Seconds from the provider's first event to the end; one message per billable item forwarded; a frame
    that is not forwarded (bad JSON) counts nothing; the cost is the sum, exactly."""
    session = core()
    session.on_upstream_text('{"type":"conversation.created"}', now=2 * NS)
    for frame in (item(TEXT), item(AUDIO), TOOL_RESULT, item(TEXT), '{"type":"conversation.item.create"'):
        session.on_client_text(frame, now=3 * NS)
    session.on_upstream_text('{"type":"response.done","response":{"id":"r","usage":{}}}', now=4 * NS)
    running = session.figures(now=5 * NS)
    session.on_end(now=9 * NS + NS // 4)
    final = session.figures(now=60 * NS)
    assert running.quantity == 3 and final.quantity == Decimal("7.25")
    assert (final.unit, session.text_messages) == ("session_second", 2)
    assert final.cost_usd == (Decimal("7.25") * PER_SECOND + 2 * PER_MESSAGE).quantize(QUANTUM)
    assert orjson.loads(final.upstream_usage) == {"text_messages": 2, "text_message_cost_usd": "0.0080000000"}
    event = session.usage_event("final", now=datetime.now(UTC))
    assert (event.unit, event.quantity, event.cost_usd) == ("session_second", final.quantity, final.cost_usd)
    assert final.audio_bytes == 0 and not session.awaiting  # item audio is not an append and session.walkout() == ()


def test_audio_sent_faster_than_real_time_is_billed_as_the_audio() -> None:
    """10 s of audio appended within a 2 s session bills 10 s (xAI bills the audio sent)."""
    session = core()
    session.on_upstream_text('{"type":"conversation.created"}', now=0)
    chunk = base64.b64encode(bytes(48000)).decode()  # 1 s of 24 kHz PCM16
    for _ in range(10):
        session.on_client_text(orjson.dumps({"type": "input_audio_buffer.append", "audio": chunk}).decode())
    session.on_end(now=2 * NS)
    figures = session.figures(now=2 * NS)
    assert (figures.quantity, figures.audio_seconds) == (10, 10)
    assert figures.cost_usd == (10 * PER_SECOND).quantize(QUANTUM)


# --- through the sidecar --------------------------------------------------------------------------------


async def test_an_xai_session_through_the_sidecar_is_billed_by_session_seconds_and_text_messages(
    tmp_path: Path,
) -> None:
    """The SDK's realtime.connect with the xAI model: the sidecar dials xAI's form (Bearer, ?model=, no
    api-key), relays xAI's events scrubbed of its key, host and deployment name, and bills the seconds from
    the provider's first event to the close on its own clock plus 0.004 per text message, exactly."""
    clock = Clock()
    provider = FakeProvider(xai=True)
    async with provider:
        entries = [
            entry(
                "grok-voice",
                "xai/my-grok-deployment",
                provider.url,
                provider.api_key,
                model_info={"base_model": "xai/grok-voice-latest"},
            )
        ]
        async with stack(tmp_path, provider=provider, entries=entries, clock_ns=clock) as s:
            secrets = (provider.api_key, provider.host_port, "my-grok-deployment")
            async with s.sidecar.openai(USER_KEY).realtime.connect(model="grok-voice") as conn:
                first = await conn.recv()
                assert first.type == "conversation.created"  # type: ignore[comparison-overlap]
                clock.advance("1.5")
                await conn.send(orjson.loads(item(TEXT)))
                await conn.send(orjson.loads(TOOL_RESULT))
                await conn.send(orjson.loads(item(AUDIO)))
                await conn.input_audio_buffer.append(audio=base64.b64encode(bytes(4800)).decode())
                await conn.send(orjson.loads(item(TEXT)))
                await conn.response.create()
                seen = []
                async for server_event in conn:
                    seen.append(server_event.type)
                    if server_event.type == "response.done":
                        break
                await conn.input_audio_buffer.commit()  # the buffer was committed: an error naming the secrets
                await conn.input_audio_buffer.commit()
                errors = []
                async for server_event in conn:
                    if server_event.type == "error":
                        errors.append(server_event.error.message)
                        if len(errors) == 1:
                            break
                clock.advance("2.25")
            row = await s.final_row()
    assert (row.model, row.kind, row.unit) == ("grok-voice", "realtime-session", "session_second")
    assert row.provider_model == "xai/my-grok-deployment"
    assert Decimal(row.quantity) == Decimal("3.75")
    assert Decimal(row.cost_usd) == (Decimal("3.75") * PER_SECOND + 2 * PER_MESSAGE).quantize(QUANTUM)
    assert orjson.loads(row.upstream_usage)["text_messages"] == 2
    assert row.close_reason == "client_close" and row.audio_bytes == 4800
    handshake = provider.handshakes[0]
    assert handshake.path == "/v1/realtime" and handshake.query == {"model": "my-grok-deployment"}
    assert handshake.headers["authorization"] == f"Bearer {provider.api_key}"
    assert "api-key" not in handshake.headers and "openai-beta" not in handshake.headers
    assert errors and all(secret not in message for message in errors for secret in secrets)
    assert "grok-voice" in errors[0]  # the deployment name shown as the public model
    assert "response.done" in seen


async def test_an_unknown_xai_model_is_refused_before_the_upgrade(tmp_path: Path) -> None:
    """A configured xai model that is not a realtime voice model: 400 model_not_realtime; nothing dialled."""
    provider = FakeProvider(xai=True)
    async with provider:
        entries = [
            entry("grok-voice", "xai/grok-voice-latest", provider.url, provider.api_key),
            entry("grok-nope", "xai/grok-voice-nope", provider.url, provider.api_key),
        ]
        async with stack(tmp_path, provider=provider, entries=entries) as s:
            for model, status, code in (("grok-nope", 400, "model_not_realtime"), ("grok-9", 404, "model_not_found")):
                with pytest.raises(InvalidStatus) as refused:
                    async with connect(
                        f"{s.sidecar.ws}/v1/realtime?model={model}",
                        additional_headers={"Authorization": f"Bearer {USER_KEY}"},
                    ):
                        pass
                assert refused.value.response.status_code == status
                assert orjson.loads(refused.value.response.body or b"")["error"]["code"] == code
    assert provider.handshakes == []


async def test_the_fake_xai_mode_refuses_other_forms() -> None:
    """The xAI fake accepts only /v1/realtime?model= with the Bearer key: no api-key, no intent, no other path."""
    async with FakeProvider(xai=True) as provider:
        good = {"Authorization": f"Bearer {provider.api_key}"}
        for path, headers, status in (
            ("/openai/v1/realtime?model=m", {"api-key": provider.api_key}, 404),
            ("/v1/realtime?model=m", {**good, "api-key": provider.api_key}, 401),
            ("/v1/realtime", good, 400),
            ("/v1/realtime?model=m&intent=transcription", good, 400),
        ):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(f"{provider.url}{path}", additional_headers=headers):
                    pass
            assert refused.value.response.status_code == status
        async with connect(f"{provider.url}/v1/realtime?model=m", additional_headers=good) as ws:
            assert orjson.loads(await ws.recv())["type"] == "conversation.created"
