"""/v1/live/sessions through the sidecar: the official `openai` SDK's `live.connect` (and raw WebSocket clients
where the SDK cannot misbehave) against a sidecar on a real socket, the fake provider behind it, billing into a
real database. The sidecar's relay driver runs on a clock the test moves (`stack(clock_ns=...)`), so session
seconds are exact without sleeping."""

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
from tests.relay_stack import MASTER_KEY, USER_KEY, Stack, entry, stack

MODEL = "gpt-live-1"
PRICE = Decimal("0.000833333333333")  # input_cost_per_second in LiteLLM's price map
PATH = "/v1/live/sessions"
NS = 1_000_000_000


class Clock:
    """A monotonic clock in nanoseconds (the sidecar's) or seconds (the provider's), moved by the test."""

    def __init__(self) -> None:
        self.ns = 7 * NS

    def __call__(self) -> int:
        return self.ns

    def seconds(self) -> float:
        return self.ns / NS

    def advance(self, seconds: float) -> None:
        self.ns += round(seconds * NS)


def voice_entries(provider: FakeProvider) -> list[dict[str, Any]]:
    """A GPT-Live model, a translation model and a /v1/realtime model, all on the fake provider."""
    return [
        entry(MODEL, f"openai/{MODEL}", provider.url, provider.api_key),
        entry("gpt-realtime-translate", "openai/gpt-realtime-translate", provider.url, provider.api_key),
        entry("gpt-realtime", "openai/gpt-realtime", provider.url, provider.api_key),
    ]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def event(kind: str, **fields: Any) -> str:
    return orjson.dumps({"type": kind, **fields}).decode()


def start(model: str = MODEL) -> str:
    return event("session.start", session={"model": model}, event_id="start-1")


async def raw(s: Stack, *, key: str = USER_KEY) -> ClientConnection:
    """A raw WebSocket to the live route, upgraded (nothing sent yet)."""
    return await connect(f"{s.sidecar.ws}{PATH}", additional_headers={"Authorization": f"Bearer {key}"})


async def started(s: Stack, *, key: str = USER_KEY) -> ClientConnection:
    """A raw live session past session.started."""
    ws = await raw(s, key=key)
    await ws.send(start())
    assert orjson.loads(await ws.recv())["type"] == "session.started"
    return ws


async def ending_of(ws: ClientConnection) -> tuple[dict[str, Any], int]:
    """Read until the sidecar closes: the last event before the close, and the close code."""
    last: dict[str, Any] = {}
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            last = orjson.loads(await ws.recv())
    assert closed.value.rcvd is not None
    return last, closed.value.rcvd.code


async def test_a_live_session_with_the_sdk_bills_session_seconds_muted_time_included(tmp_path: Path) -> None:
    """The SDK's live session through the sidecar: session.start rewritten upstream, session.started back; the
    final bills the seconds from session.started to the end on the sidecar's clock (unit session_second),
    muted seconds included; the provider's own seconds are recorded beside it, not billed."""
    clock = Clock()
    provider = FakeProvider(clock=clock.seconds)
    async with provider, stack(tmp_path, provider=provider, entries=voice_entries(provider), clock_ns=clock) as s:
        async with s.sidecar.openai(USER_KEY).live.connect() as conn:
            await conn.session.start(session={"model": MODEL, "instructions": "Be brief."}, event_id="start-1")
            first = await conn.recv()
            assert first.type == "session.started" and first.session.model == MODEL
            clock.advance(1.25)
            await conn.session.input_audio.append(audio=b64(bytes(4800)))
            await conn.session.input_audio.mute(event_id="mute-1")
            assert (await conn.recv()).type == "session.input_audio.muted"
            clock.advance(3.5)  # muted time is billed
            await conn.session.input_audio.unmute()
            assert (await conn.recv()).type == "session.input_audio.unmuted"
            clock.advance(0.75)
            await conn.session.close()
            closed = [e async for e in conn]
        assert closed[-1].type == "session.closed" and closed[-1].usage.seconds == 6
        row = await s.final_row()
    assert (row.model, row.kind, row.unit) == (MODEL, "live-session", "session_second")
    assert Decimal(row.quantity) == Decimal("5.5")
    assert Decimal(row.cost_usd) == (Decimal("5.5") * PRICE).quantize(Decimal("1e-10"))
    assert (row.audio_bytes, Decimal(row.audio_seconds)) == (4800, Decimal("0.1"))
    assert orjson.loads(row.upstream_usage) == {"duration_seconds": 6, "events": 1}
    assert row.close_reason == "client_close"  # the client's session.close, though the provider closed first
    assert row.key_hash == hash_key(USER_KEY)
    session = provider.sessions[0]
    assert session.protocol == "live" and session.handshake.path == PATH and session.handshake.query == {}


@pytest.mark.parametrize(
    ("first", "code"),
    [
        (event("session.input_audio.append", audio="AAAA"), "invalid_session_start"),
        ("not json", "invalid_session_start"),
        (event("session.start", session={"model": ""}), "invalid_session_start"),
        (start("no-such-model"), "model_not_found"),
        (start("gpt-realtime"), "model_not_realtime"),
        (start("gpt-realtime-translate"), "model_not_realtime"),
        (
            event(
                "session.start",
                session={"model": MODEL, "delegation": {"type": "responses", "responses": {"model": "gpt-5"}}},
            ),
            "delegation_not_supported",
        ),
        (
            event(
                "session.start",
                session={
                    "model": MODEL,
                    "delegation": {"type": "decisions", "decisions": {"model": "d", "questions": []}},
                },
            ),
            "delegation_not_supported",
        ),
        (
            event(
                "session.start",
                session={
                    "model": MODEL,
                    "triggers": [
                        {
                            "type": "decisions",
                            "event_type": "session.input_transcript.delta",
                            "decisions": {"questions": []},
                        }
                    ],
                },
            ),
            "delegation_not_supported",
        ),
    ],
    ids=[
        "append-first",
        "not-json",
        "empty-model",
        "unknown-model",
        "realtime-model",
        "translation-model",
        "responses-delegation",
        "decisions-delegation",
        "decision-triggers",
    ],
)
async def test_a_bad_first_message_is_an_error_event_and_1008(tmp_path: Path, first: str, code: str) -> None:
    """No session.start first, an unknown model, or a model of another route: GPT-Live's error event with the
    code, then close 1008; nothing reaches the provider and nothing is billed."""
    provider = FakeProvider()
    async with provider, stack(tmp_path, provider=provider, entries=voice_entries(provider)) as s:
        ws = await raw(s)
        await ws.send(first)
        last, close_code = await ending_of(ws)
        assert (last["type"], last["error"]["code"], close_code) == ("error", code, 1008)
        assert "client_event_id" in last
        if code == "model_not_realtime":
            assert "/v1/" in last["error"]["message"]
        assert provider.sessions == [] and s.rows() == []


async def test_no_first_message_within_the_handshake_timeout_is_1008(tmp_path: Path) -> None:
    """A client that never sends session.start is answered session_start_timeout and closed 1008."""
    provider = FakeProvider()
    async with (
        provider,
        stack(tmp_path, provider=provider, entries=voice_entries(provider), handshake_timeout_s=1.0) as s,
    ):
        ws = await raw(s)
        last, close_code = await ending_of(ws)
        assert (last["error"]["code"], close_code) == ("session_start_timeout", 1008)
        assert provider.sessions == []


async def test_delegation_in_a_session_update_is_refused_and_the_session_goes_on(tmp_path: Path) -> None:
    """With the SDK: client delegation is relayed; a session.update delegating to a Responses backend is answered
    delegation_not_supported and not forwarded; the session goes on and bills its seconds."""
    provider = FakeProvider()
    async with provider, stack(tmp_path, provider=provider, entries=voice_entries(provider)) as s:
        async with s.sidecar.openai(USER_KEY).live.connect() as conn:
            await conn.session.start(session={"model": MODEL, "delegation": {"type": "client"}})
            assert (await conn.recv()).type == "session.started"
            delegation: Any = {"type": "responses", "responses": {"model": "gpt-5", "tools": [{"type": "web_search"}]}}
            await conn.session.update(session={"delegation": delegation}, event_id="upd-1")
            refusal = await conn.recv()
            assert refusal.type == "error" and refusal.error.code == "delegation_not_supported"
            assert refusal.client_event_id == "upd-1"
            await conn.session.close()
            assert [e async for e in conn][-1].type == "session.closed"
        row = await s.final_row()
    assert row.close_reason == "client_close"
    sent = [e.get("type") for e in provider.sessions[0].events]
    assert "session.update" not in sent and sent[0] == "session.start"


async def test_a_drain_refuses_a_client_waiting_for_session_start_at_once(tmp_path: Path) -> None:
    """A drain does not wait out the handshake timeout (an hour here) for a client that has not sent its
    session.start: it is answered service_unavailable and closed 1013 as soon as the drain starts."""
    provider = FakeProvider()
    async with (
        provider,
        stack(tmp_path, provider=provider, entries=voice_entries(provider), handshake_timeout_s=3600.0) as s,
    ):
        ws = await raw(s)
        await s.sidecar.app.state.services.supervisor.drain(0)
        last, close_code = await ending_of(ws)
        assert (last["error"]["code"], close_code) == ("service_unavailable", 1013)
        assert provider.sessions == []


async def test_a_live_model_is_refused_on_realtime_before_the_upgrade(tmp_path: Path) -> None:
    """/v1/realtime?model=gpt-live-1 is refused 400 model_not_realtime, naming the live route."""
    provider = FakeProvider()
    async with provider, stack(tmp_path, provider=provider, entries=voice_entries(provider)) as s:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(
                f"{s.sidecar.ws}/v1/realtime?model={MODEL}", additional_headers={"Authorization": f"Bearer {USER_KEY}"}
            ):
                pass
        assert refused.value.response.status_code == 400
        body = orjson.loads(refused.value.response.body or b"")["error"]
        assert body["code"] == "model_not_realtime" and PATH in body["message"]


async def test_auth_is_refused_before_the_upgrade_and_policy_after_it(tmp_path: Path) -> None:
    """No key or an unknown key: 401 before the upgrade. After session.start: a key not allowed the model 1008
    model_not_allowed; a spent budget 4002; the key's session limit 1013 concurrency_limit."""
    provider = FakeProvider()
    async with provider, stack(tmp_path, provider=provider, entries=voice_entries(provider)) as s:
        for headers in ({}, {"Authorization": "Bearer sk-nobody"}):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(f"{s.sidecar.ws}{PATH}", additional_headers=headers):
                    pass
            assert refused.value.response.status_code == 401
        s.litellm.add_key("sk-other-models", models=["gpt-realtime"])
        s.litellm.add_key("sk-spent", max_budget=1.0, spend=1.0)
        s.litellm.add_key("sk-one", max_parallel_requests=1)
        for key, code, close_code in (
            ("sk-other-models", "model_not_allowed", 1008),
            ("sk-spent", "budget_exceeded", 4002),
        ):
            ws = await raw(s, key=key)
            await ws.send(start())
            last, got = await ending_of(ws)
            assert (last["error"]["code"], got) == (code, close_code)
        holder = await started(s, key="sk-one")
        ws = await raw(s, key="sk-one")
        await ws.send(start())
        last, got = await ending_of(ws)
        assert (last["error"]["code"], got) == ("concurrency_limit", 1013)
        await holder.close()
        assert len(provider.sessions) == 1


async def test_the_browser_subprotocol_form_authenticates(tmp_path: Path) -> None:
    """`realtime, openai-insecure-api-key.<key>` works on the live route too (the server selects realtime)."""
    provider = FakeProvider()
    async with provider, stack(tmp_path, provider=provider, entries=voice_entries(provider)) as s:
        async with connect(
            f"{s.sidecar.ws}{PATH}",
            subprotocols=["realtime", f"openai-insecure-api-key.{USER_KEY}"],  # type: ignore[list-item]
        ) as ws:
            assert ws.subprotocol == "realtime"
            await ws.send(start())
            assert orjson.loads(await ws.recv())["type"] == "session.started"


async def test_in_session_refusals_and_scrubbing(tmp_path: Path) -> None:
    """A second session.start, another model in session.update, bad base64 and a binary frame are GPT-Live
    error events, not forwarded; the deployment's name and the provider's key never reach the client."""
    provider = FakeProvider()
    async with provider:
        entries = [
            entry(MODEL, "openai/my-live-deployment", provider.url, provider.api_key, model_info={"base_model": MODEL})
        ]
        async with stack(tmp_path, provider=provider, entries=entries) as s:
            ws = await raw(s)
            await ws.send(start())
            text = await ws.recv()
            assert isinstance(text, str) and "my-live-deployment" not in text and provider.api_key not in text
            assert orjson.loads(text)["session"]["model"] == MODEL
            codes = []
            for frame in (
                start(),
                event("session.update", session={"model": "gpt-realtime"}, event_id="u1"),
                event("session.input_audio.append", audio="%%%"),
                b"\x00",
            ):
                await ws.send(frame)
                codes.append(orjson.loads(await ws.recv())["error"]["code"])
            await ws.close()
            row = await s.final_row()
    assert codes == ["session_already_started", "model_mismatch", "invalid_base64", "binary_not_supported"]
    assert row.close_reason == "client_close" and row.audio_bytes == 0
    assert provider.sessions[0].handshake.path == PATH


async def test_revocation_in_flight_ends_the_session_billed_once(tmp_path: Path) -> None:
    """An admin revocation of the key ends a live session: error event key_revoked, close 4001, one final
    billing its seconds so far."""
    clock = Clock()
    provider = FakeProvider()
    async with provider, stack(tmp_path, provider=provider, entries=voice_entries(provider), clock_ns=clock) as s:
        ws = await started(s)
        clock.advance(2)
        async with httpx.AsyncClient(
            base_url=s.sidecar.http, headers={"Authorization": f"Bearer {MASTER_KEY}"}
        ) as admin:
            answer = await admin.post("/admin/revocations", json={"key_hash": hash_key(USER_KEY)})
        assert answer.status_code == 202
        last, code = await ending_of(ws)
        assert (last["type"], last["error"]["code"], code) == ("error", "key_revoked", 4001)
        row = await s.final_row()
    assert (row.close_reason, Decimal(row.quantity), row.unit) == ("key_revoked", Decimal(2), "session_second")


async def test_budget_cut_off_in_flight_counts_session_time(tmp_path: Path) -> None:
    """A key with budget left for 10 s of GPT-Live: once the session's running cost (its seconds on the clock,
    nothing appended) reaches it, the session ends with budget_exceeded, close 4002, billed once."""
    clock = Clock()
    provider = FakeProvider()
    async with provider, stack(tmp_path, provider=provider, entries=voice_entries(provider), clock_ns=clock) as s:
        s.litellm.add_key("sk-budget", max_budget=float(PRICE * 10))
        ws = await started(s, key="sk-budget")
        clock.advance(4)
        await s.sidecar.app.state.services.supervisor.next_poll()
        assert s.sidecar.app.state.services.supervisor.live  # under budget: still live
        clock.advance(7)
        last, code = await ending_of(ws)
        assert (last["error"]["code"], code) == ("budget_exceeded", 4002)
        row = await s.final_row()
    assert (row.close_reason, Decimal(row.quantity)) == ("budget_exceeded", Decimal(11))


async def test_an_upstream_drop_is_billed_once(tmp_path: Path) -> None:
    """The provider vanishing ends the session with upstream_error (1011), billed once up to then."""
    clock = Clock()
    provider = FakeProvider()
    async with provider, stack(tmp_path, provider=provider, entries=voice_entries(provider), clock_ns=clock) as s:
        ws = await started(s)
        clock.advance(3)
        await provider.drop_all()
        last, code = await ending_of(ws)
        assert (last["error"]["code"], code) == ("upstream_error", 1011)
        row = await s.final_row()
    assert (row.close_reason, Decimal(row.quantity)) == ("upstream_error", Decimal(3))


async def test_a_client_abort_is_billed_once(tmp_path: Path) -> None:
    """A client whose TCP connection vanishes is billed once, client_abort, for its session time."""
    clock = Clock()
    provider = FakeProvider()
    async with provider, stack(tmp_path, provider=provider, entries=voice_entries(provider), clock_ns=clock) as s:
        ws = await started(s)
        clock.advance(2.5)
        ws.transport.abort()
        row = await s.final_row()
    assert (row.close_reason, Decimal(row.quantity)) == ("client_abort", Decimal("2.5"))


async def test_a_client_secret_for_a_live_model_works_on_the_live_route_only(tmp_path: Path) -> None:
    """A secret minted for gpt-live-1 opens a live session billed to the minting key; it is refused on
    /v1/realtime (400) and for another model in session.start (1008 model_not_allowed)."""
    provider = FakeProvider()
    async with provider, stack(tmp_path, provider=provider, entries=voice_entries(provider)) as s:

        async def mint(session: dict[str, Any]) -> httpx.Response:
            async with httpx.AsyncClient(base_url=s.sidecar.http, headers={"Authorization": f"Bearer {USER_KEY}"}) as c:
                return await c.post("/v1/realtime/client_secrets", json={"session": session})

        refused = await mint({"type": "realtime", "model": MODEL, "instructions": "x"})
        assert (refused.status_code, refused.json()["error"]["code"]) == (400, "invalid_request")
        secrets = [(await mint({"type": "realtime", "model": MODEL})).json()["value"] for _ in range(3)]
        async with s.sidecar.openai(secrets[0]).live.connect() as conn:
            await conn.session.start(session={"model": MODEL})
            assert (await conn.recv()).type == "session.started"
        with pytest.raises(InvalidStatus) as wrong_route:
            async with connect(
                f"{s.sidecar.ws}/v1/realtime?model={MODEL}",
                additional_headers={"Authorization": f"Bearer {secrets[1]}"},
            ):
                pass
        assert wrong_route.value.response.status_code == 400
        ws = await raw(s, key=secrets[2])
        await ws.send(start("gpt-realtime"))
        last, code = await ending_of(ws)
        assert (last["error"]["code"], code) == ("model_not_allowed", 1008)
        row = await s.final_row()
    assert (row.key_hash, row.model) == (hash_key(USER_KEY), MODEL)


async def test_failover_to_the_next_deployment_and_1011_when_all_refuse(tmp_path: Path) -> None:
    """A refusing first deployment fails over to the second (which gets the session.start); when every
    deployment refuses, the client gets upstream_unavailable and close 1011, no provider host in it."""
    async with FakeProvider(faults=Faults(refuse_status=500)) as bad, FakeProvider() as good:
        entries = [
            entry(MODEL, f"openai/{MODEL}", bad.url, bad.api_key),
            entry(MODEL, f"openai/{MODEL}", good.url, good.api_key),
            entry("live-broken", f"openai/{MODEL}", bad.url, bad.api_key),
        ]
        async with stack(tmp_path, provider=good, entries=entries) as s:
            ws = await started(s)
            await ws.close()
            assert len(bad.handshakes) == 1 and good.sessions[0].protocol == "live"
            ws = await raw(s)
            await ws.send(start("live-broken"))
            last, code = await ending_of(ws)
            assert (last["error"]["code"], code) == ("upstream_unavailable", 1011)
            assert bad.host_port not in orjson.dumps(last).decode()
            row = await s.final_row()
    assert row.model == MODEL


async def test_an_azure_deployment_gets_the_azure_form_and_its_name_stays_hidden(tmp_path: Path) -> None:
    """An Azure GPT-Live deployment: <api_base>/openai/v1/live/sessions with the key in `api-key`, the
    deployment's name in the session.start upstream; the client sees only the public name; billed as usual."""
    clock = Clock()
    provider = FakeProvider()
    async with provider:
        entries = [
            entry(
                MODEL,
                "azure/my-live-deployment",
                provider.url,
                provider.api_key,
                model_info={"base_model": "azure/gpt-live-1"},
            )
        ]
        async with stack(tmp_path, provider=provider, entries=entries, clock_ns=clock) as s:
            ws = await raw(s)
            await ws.send(start())
            text = await ws.recv()
            assert isinstance(text, str) and "my-live-deployment" not in text
            clock.advance(1.5)
            await ws.close()
            row = await s.final_row()
    handshake = provider.sessions[0].handshake
    assert (handshake.path, handshake.query) == ("/openai/v1/live/sessions", {})
    assert handshake.headers["api-key"] == provider.api_key and "authorization" not in handshake.headers
    assert (row.provider_model, row.unit, Decimal(row.quantity)) == (
        "azure/my-live-deployment",
        "session_second",
        Decimal("1.5"),
    )


@pytest.mark.parametrize("prefix", ["", "/openai/v1"])
async def test_litellm_aliases_of_the_route_serve_the_same_session(tmp_path: Path, prefix: str) -> None:
    """/live/sessions and /openai/v1/live/sessions (LiteLLM's aliases) serve GPT-Live like /v1/live/sessions; a
    client's session.close ends it as client_close."""
    provider = FakeProvider()
    async with provider, stack(tmp_path, provider=provider, entries=voice_entries(provider)) as s:
        client = AsyncOpenAI(base_url=f"{s.sidecar.http}{prefix}", api_key=USER_KEY, max_retries=0)
        async with client.live.connect() as conn:
            await conn.session.start(session={"model": MODEL})
            assert (await conn.recv()).type == "session.started"
            await conn.session.close()
            assert [e async for e in conn][-1].type == "session.closed"
        row = await s.final_row()
    assert (row.model, row.close_reason) == (MODEL, "client_close")
    assert provider.sessions[0].handshake.path == PATH
