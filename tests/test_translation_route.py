"""/v1/realtime/translations through the sidecar: the official `openai` SDK's `realtime.translations.connect`
(and raw WebSocket clients where the SDK cannot misbehave) against a sidecar on a real socket, the fake
provider behind it, billing into a real database."""

from __future__ import annotations

import base64
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from openai import AsyncOpenAI
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from sidecar.auth import hash_key
from sidecar.testing.fake_provider import FakeProvider, Faults
from sidecar.testing.fake_translation import FRAME_BYTES
from tests.relay_stack import MASTER_KEY, USER_KEY, Stack, entry, stack
from tests.support import next_raw

MODEL = "gpt-realtime-translate"
PRICE = Decimal("0.000566666666667")  # input_cost_per_second in LiteLLM's price map
PATH = "/v1/realtime/translations"


def voice_entries(provider: FakeProvider) -> list[dict[str, Any]]:
    """A translation model, a GPT-Live model and a /v1/realtime model, all on the fake provider."""
    return [
        entry(MODEL, f"openai/{MODEL}", provider.url, provider.api_key),
        entry("gpt-live-1", "openai/gpt-live-1", provider.url, provider.api_key),
        entry("gpt-realtime", "openai/gpt-realtime", provider.url, provider.api_key),
    ]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def raw(s: Stack, *, model: str = MODEL, key: str = USER_KEY) -> ClientConnection:
    """A raw WebSocket translation session through the sidecar, past session.created."""
    ws = await connect(f"{s.sidecar.ws}{PATH}?model={model}", additional_headers={"Authorization": f"Bearer {key}"})
    assert orjson.loads(await ws.recv())["type"] == "session.created"
    return ws


async def refusal(s: Stack, query: str, key: str = USER_KEY) -> tuple[int, dict[str, Any]]:
    """The HTTP refusal of a connect to `query` (status, error body)."""
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{s.sidecar.ws}{query}", additional_headers={"Authorization": f"Bearer {key}"}):
            pass
    response = refused.value.response
    body: dict[str, Any] = orjson.loads(response.body or b"{}")["error"]
    return response.status_code, body


async def test_a_translation_session_with_the_sdk_is_billed_by_its_input_audio(
    tmp_path: Path, speech_pcm16: bytes
) -> None:
    """The SDK translates the shared speech through the sidecar; the one final bills its input audio seconds
    to the microsecond (unit `second`, kind realtime-translation); the provider got exactly those bytes."""
    provider = FakeProvider()
    async with provider, stack(tmp_path, provider=provider, entries=voice_entries(provider)) as s:
        async with s.sidecar.openai(USER_KEY).realtime.translations.connect(model=MODEL) as conn:
            created = await conn.recv()
            assert created.type == "session.created" and created.session.model == MODEL
            await conn.session.update(session={"audio": {"output": {"language": "fr"}}})
            assert (await conn.recv()).type == "session.updated"
            for offset in range(0, len(speech_pcm16), FRAME_BYTES):
                await conn.session.input_audio_buffer.append(audio=b64(speech_pcm16[offset : offset + FRAME_BYTES]))
            await conn.session.close()
            kinds = [event.type async for event in conn]
        assert kinds[-1] == "session.closed" and "session.output_audio.delta" in kinds
        row = await s.final_row()
    assert (row.model, row.kind, row.unit) == (MODEL, "realtime-translation", "second")
    assert row.audio_bytes == len(speech_pcm16) == 320022
    assert Decimal(row.quantity) == Decimal(row.audio_seconds) == Decimal("6.667125")
    assert Decimal(row.cost_usd) == (Decimal("6.667125") * PRICE).quantize(Decimal("1e-10"))
    assert row.provider_model == f"openai/{MODEL}"
    assert row.close_reason == "client_close"  # the client's session.close, though the provider closed first
    assert provider.sessions[0].protocol == "translation"
    assert provider.sessions[0].handshake.query == {"model": MODEL}
    assert provider.sessions[0].audio_bytes == len(speech_pcm16)


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        (f"{PATH}?model=gpt-live-1", 400, "model_not_realtime"),
        (f"{PATH}?model=gpt-realtime", 400, "model_not_realtime"),
        (f"{PATH}?model=no-such-model", 404, "model_not_found"),
        (PATH, 404, "model_not_found"),
        (f"/v1/realtime?model={MODEL}", 400, "model_not_realtime"),
    ],
    ids=["live-model", "realtime-model", "unknown", "no-model", "translation-model-on-realtime"],
)
async def test_wrong_route_and_unknown_models_are_refused_before_the_upgrade(
    tmp_path: Path, query: str, status: int, code: str
) -> None:
    """A model of another route is refused before the upgrade both ways (the message names its route), as is
    an unknown model or none; nothing reaches the provider and nothing is billed."""
    provider = FakeProvider()
    async with provider, stack(tmp_path, provider=provider, entries=voice_entries(provider)) as s:
        got_status, body = await refusal(s, query)
        assert (got_status, body["code"]) == (status, code)
        if "gpt-live-1" in query:
            assert "/v1/live/sessions" in body["message"]
        if query.startswith("/v1/realtime?"):
            assert PATH in body["message"]
        assert provider.sessions == [] and s.rows() == []


async def test_auth_budget_and_concurrency_are_refused_before_the_upgrade(tmp_path: Path) -> None:
    """No key 401; a blocked key 403; a spent budget 403; the key's session limit 429; as on /v1/realtime."""
    provider = FakeProvider()
    async with provider, stack(tmp_path, provider=provider, entries=voice_entries(provider)) as s:
        with pytest.raises(InvalidStatus) as no_key:
            async with connect(f"{s.sidecar.ws}{PATH}?model={MODEL}"):
                pass
        assert no_key.value.response.status_code == 401
        s.litellm.add_key("sk-blocked-0001", blocked=True)
        assert (await refusal(s, f"{PATH}?model={MODEL}", "sk-blocked-0001"))[1]["code"] == "key_blocked"
        s.litellm.add_key("sk-spent-0001", max_budget=1.0, spend=1.0)
        assert (await refusal(s, f"{PATH}?model={MODEL}", "sk-spent-0001"))[1]["code"] == "budget_exceeded"
        s.litellm.add_key("sk-one-0001", max_parallel_requests=1)
        first = await raw(s, key="sk-one-0001")
        assert (await refusal(s, f"{PATH}?model={MODEL}", "sk-one-0001"))[0] == 429
        await first.close()
        assert len(provider.sessions) == 1


async def test_bad_events_are_answered_and_not_forwarded(tmp_path: Path) -> None:
    """An event the translation API does not define, another model, another input rate, bad base64 and a binary
    frame are error events; none reaches the provider; the session goes on and bills what was appended."""
    provider = FakeProvider()
    async with provider, stack(tmp_path, provider=provider, entries=voice_entries(provider)) as s:
        ws = await raw(s)
        replies = []
        for event in (
            {"type": "response.create", "event_id": "e1"},
            {"type": "session.update", "session": {"model": "gpt-realtime"}, "event_id": "e2"},
            {
                "type": "session.update",
                "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}},
            },
            {"type": "session.input_audio_buffer.append", "audio": "%%%"},
        ):
            await ws.send(orjson.dumps(event).decode())
            replies.append(orjson.loads(await ws.recv())["error"]["code"])
        await ws.send(b"\x00\x01")
        replies.append(orjson.loads(await ws.recv())["error"]["code"])
        await ws.send(append(4800))
        await ws.close()
        row = await s.final_row()
    assert replies == [
        "unknown_event",
        "model_mismatch",
        "invalid_audio_format",
        "invalid_base64",
        "binary_not_supported",
    ]
    assert (row.audio_bytes, Decimal(row.quantity), row.close_reason) == (4800, Decimal("0.1"), "client_close")
    decoded = provider.sessions[0]
    assert decoded.audio_bytes == 4800


async def test_upstream_keys_hosts_and_deployment_names_are_scrubbed(tmp_path: Path) -> None:
    """A translation deployment named differently from its public model: the client sees only the public name;
    the provider's key and host never reach the client."""
    provider = FakeProvider()
    async with provider:
        entries = [
            entry(MODEL, "openai/my-secret-translate", provider.url, provider.api_key, model_info={"base_model": MODEL})
        ]
        async with stack(tmp_path, provider=provider, entries=entries) as s:
            async with connect(
                f"{s.sidecar.ws}{PATH}?model={MODEL}", additional_headers={"Authorization": f"Bearer {MASTER_KEY}"}
            ) as ws:
                created = await ws.recv()
                assert isinstance(created, str)
                assert "my-secret-translate" not in created and provider.api_key not in created
                assert orjson.loads(created)["session"]["model"] == MODEL
            assert provider.sessions[0].handshake.query == {"model": "my-secret-translate"}


async def test_an_upstream_drop_is_billed_once(tmp_path: Path) -> None:
    """The provider vanishing mid-session ends it (error event, close 1011 upstream_error), billed once with the
    audio appended before."""
    provider = FakeProvider()
    async with provider, stack(tmp_path, provider=provider, entries=voice_entries(provider)) as s:
        ws = await raw(s)
        await ws.send(append(FRAME_BYTES))
        await next_raw(ws, "session.output_audio.delta")  # the provider has the frame: the sidecar metered it
        await provider.drop_all()
        last, code = await ending_of(ws)
        assert (last["error"]["code"], code) == ("upstream_error", 1011)
        row = await s.final_row()
    assert (row.close_reason, row.audio_bytes, Decimal(row.quantity)) == ("upstream_error", FRAME_BYTES, Decimal("0.2"))


async def test_a_client_abort_is_billed_once(tmp_path: Path) -> None:
    """A client whose TCP connection vanishes is billed once, as client_abort, for what it appended."""
    provider = FakeProvider()
    async with provider, stack(tmp_path, provider=provider, entries=voice_entries(provider)) as s:
        ws = await raw(s)
        await ws.send(append(FRAME_BYTES))
        await next_raw(ws, "session.output_audio.delta")
        ws.transport.abort()
        row = await s.final_row()
    assert (row.close_reason, row.audio_bytes) == ("client_abort", FRAME_BYTES)


def append(count: int) -> str:
    """A translation append of `count` bytes of silence."""
    return orjson.dumps({"type": "session.input_audio_buffer.append", "audio": b64(bytes(count))}).decode()


async def ending_of(ws: ClientConnection) -> tuple[dict[str, Any], int]:
    """Read until the sidecar closes: the last event before the close, and the close code."""
    last: dict[str, Any] = {}
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            last = orjson.loads(await ws.recv())
    assert closed.value.rcvd is not None
    return last, closed.value.rcvd.code


async def test_failover_to_the_next_deployment(tmp_path: Path) -> None:
    """A refusing first translation deployment fails over to the second; all refusing is 502 before the upgrade."""
    async with FakeProvider(faults=Faults(refuse_status=500)) as bad, FakeProvider() as good:
        entries = [
            entry(MODEL, f"openai/{MODEL}", bad.url, bad.api_key),
            entry(MODEL, f"openai/{MODEL}", good.url, good.api_key),
            entry("translate-broken", f"openai/{MODEL}", bad.url, bad.api_key),
        ]
        async with stack(tmp_path, provider=good, entries=entries) as s:
            ws = await raw(s)
            await ws.close()
            assert len(bad.handshakes) == 1 and good.sessions[0].protocol == "translation"
            status, body = await refusal(s, f"{PATH}?model=translate-broken")
            assert (status, body["code"]) == (502, "upstream_unavailable")


async def test_revocation_in_flight_ends_the_session_billed_once(tmp_path: Path) -> None:
    """An admin revocation of the key ends a translation session: key_revoked, close 4001, one final."""
    provider = FakeProvider()
    async with provider, stack(tmp_path, provider=provider, entries=voice_entries(provider)) as s:
        ws = await raw(s)
        await ws.send(append(FRAME_BYTES))
        await next_raw(ws, "session.output_audio.delta")
        async with httpx.AsyncClient(
            base_url=s.sidecar.http, headers={"Authorization": f"Bearer {MASTER_KEY}"}
        ) as admin:
            answer = await admin.post("/admin/revocations", json={"key_hash": hash_key(USER_KEY)})
        assert answer.status_code == 202
        last, code = await ending_of(ws)
        assert (last["error"]["code"], code) == ("key_revoked", 4001)
        row = await s.final_row()
    assert (row.close_reason, row.audio_bytes) == ("key_revoked", FRAME_BYTES)


async def test_budget_cut_off_in_flight_counts_input_audio(tmp_path: Path) -> None:
    """A key with budget for 1 s of translation: once the appended audio's running cost reaches it, the session
    ends with budget_exceeded, close 4002, billed once for what was appended."""
    provider = FakeProvider()
    async with provider, stack(tmp_path, provider=provider, entries=voice_entries(provider)) as s:
        s.litellm.add_key("sk-budget", max_budget=float(PRICE))
        ws = await raw(s, key="sk-budget")
        for _ in range(10):  # 2 s in 200 ms frames
            await ws.send(append(FRAME_BYTES))
        last, code = await ending_of(ws)
        assert (last["error"]["code"], code) == ("budget_exceeded", 4002)
        row = await s.final_row()
    assert row.close_reason == "budget_exceeded" and Decimal(row.cost_usd) >= PRICE


async def test_litellm_alias_of_the_route_serves_the_same_session(tmp_path: Path) -> None:
    """/realtime/translations (LiteLLM's alias) serves translation like /v1/realtime/translations."""
    provider = FakeProvider()
    async with provider, stack(tmp_path, provider=provider, entries=voice_entries(provider)) as s:
        client = AsyncOpenAI(base_url=s.sidecar.http, api_key=USER_KEY, max_retries=0)
        async with client.realtime.translations.connect(model=MODEL) as conn:
            assert (await conn.recv()).type == "session.created"
            await conn.session.close()
            assert [e.type async for e in conn][-1] == "session.closed"
        row = await s.final_row()
    assert (row.model, row.close_reason) == (MODEL, "client_close")
    assert provider.sessions[0].handshake.path == PATH


async def test_source_transcription_is_refused_and_the_session_goes_on(tmp_path: Path) -> None:
    """A session.update naming a source transcription model (unbillable: the provider reports no usage for it)
    is answered transcription_not_supported and not forwarded; the session goes on."""
    provider = FakeProvider()
    async with provider, stack(tmp_path, provider=provider, entries=voice_entries(provider)) as s:
        async with s.sidecar.openai(USER_KEY).realtime.translations.connect(model=MODEL) as conn:
            assert (await conn.recv()).type == "session.created"
            transcription: Any = {"input": {"transcription": {"model": "gpt-realtime-whisper"}}}
            await conn.session.update(session={"audio": transcription}, event_id="upd-1")
            refusal = await conn.recv()
            assert refusal.type == "error" and refusal.error.code == "transcription_not_supported"
            await conn.session.update(session={"audio": {"output": {"language": "fr"}}})
            assert (await conn.recv()).type == "session.updated"
            await conn.session.close()
            assert [e.type async for e in conn][-1] == "session.closed"
        row = await s.final_row()
    assert row.close_reason == "client_close"
    updates = [e for e in provider.sessions[0].events if e.get("type") == "session.update"]
    assert [u["session"] for u in updates] == [{"audio": {"output": {"language": "fr"}}}]
