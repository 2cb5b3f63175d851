"""WebRTC calls billed and controlled through a real sidecar stack (issue 17, items 2 and 3): the openai SDK creates
the call, the fake WebRTC provider (sidecar/testing/fake_calls.py) emits usage on the sideband, the billing rows
are exact; revocation, budget, DELETE /admin/sessions, the sideband drop rule and the drain end the call through
the provider's hangup, billed once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
from collections.abc import AsyncIterator
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import yaml

from sidecar.catalog import LIVE_ENDPOINT, REALTIME_ENDPOINT
from sidecar.pricing import Price
from sidecar.testing.fake_calls import FakeCall, FakeCallProvider
from sidecar.testing.fake_sdp import BROWSER_OFFER
from tests.billing_support import DEADLINE_S, SidecarProcess, poll
from tests.relay_stack import MASTER_KEY, USER_KEY, Stack, catalog_for, entry, stack

RT = "gpt-realtime"
LIVE = "gpt-live-1"
WHISPER = "gpt-realtime-whisper"
NS = 1_000_000_000
# One response's usage: 200 text + 1000 audio tokens in (none cached), 100 text + 600 audio tokens out.
USAGE = {
    "total_tokens": 1900,
    "input_tokens": 1200,
    "output_tokens": 700,
    "input_token_details": {"text_tokens": 200, "audio_tokens": 1000, "cached_tokens": 0},
    "output_token_details": {"text_tokens": 100, "audio_tokens": 600},
}


def entries(provider: FakeCallProvider) -> list[dict[str, Any]]:
    return [
        entry(RT, f"openai/{RT}", provider.url, provider.api_key),
        entry(LIVE, f"openai/{LIVE}", provider.url, provider.api_key),
        entry(WHISPER, f"openai/{WHISPER}", provider.url, provider.api_key),
    ]


def price_of(provider: FakeCallProvider, model: str) -> Price:
    route = LIVE_ENDPOINT if model == LIVE else REALTIME_ENDPOINT
    return catalog_for(entries(provider)).resolve(model, route=route).price


def cost(amount: Decimal) -> Decimal:
    return amount.quantize(Decimal("1e-10"), rounding=ROUND_HALF_EVEN)


def token_cost(price: Price, responses: int) -> Decimal:
    """What `responses` responses of USAGE cost at `price` (every token price of the model named)."""
    assert price.input_token and price.input_audio_token and price.output_token and price.output_audio_token
    one = 200 * price.input_token + 1000 * price.input_audio_token
    one += 100 * price.output_token + 600 * price.output_audio_token
    return cost(one * responses)


class Clock:
    """The sidecar's monotonic clock, moved by the test (nanoseconds)."""

    def __init__(self) -> None:
        self.now = 1000 * NS

    def __call__(self) -> int:
        return self.now


@contextlib.asynccontextmanager
async def running(tmp_path: Path, **settings: Any) -> AsyncIterator[tuple[Stack, FakeCallProvider]]:
    async with FakeCallProvider() as provider, stack(tmp_path, entries=entries(provider), **settings) as s:
        yield s, provider


async def realtime_call(s: Stack, provider: FakeCallProvider, session: dict[str, Any]) -> tuple[str, FakeCall]:
    """A realtime call created with the SDK: (the sidecar's call id, the provider's call) once watched."""
    raw = await s.sidecar.openai(USER_KEY).realtime.calls.with_raw_response.create(sdp=BROWSER_OFFER, session=session)
    assert raw.http_response.status_code == 201
    call = await asyncio.wait_for(provider.wait_for_call(), DEADLINE_S)
    await asyncio.wait_for(call.wait_for_sideband(1), DEADLINE_S)
    return raw.http_response.headers["location"].rsplit("/", 1)[1], call


async def final_row(s: Stack) -> Any:
    return await s.final_row()


async def metrics(s: Stack) -> str:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"{s.sidecar.http}/metrics")).text


def events_of(s: Stack) -> list[tuple[str, int]]:
    from sqlmodel import Session, select

    from sidecar.billing.tables import RealtimeUsageEvent

    with Session(s.writer.engine) as db:
        stored = db.exec(select(RealtimeUsageEvent).order_by(RealtimeUsageEvent.seq)).all()  # type: ignore[arg-type]
        return [(e.type, e.seq) for e in stored]


async def test_realtime_call_billed_from_response_done_usage_exactly(tmp_path: Path) -> None:
    """Two response.done on the sideband, then the SDK's hangup: one row, tokens and cost exact, close_reason
    client_hangup, the provider's hangup called once, every event stored once (checkpoint first, one final)."""
    async with running(tmp_path) as (s, provider):
        session_id, call = await realtime_call(s, provider, {"type": "realtime", "model": RT})
        async with httpx.AsyncClient() as http:
            listed = await http.get(
                f"{s.sidecar.http}/admin/sessions", headers={"Authorization": f"Bearer {MASTER_KEY}"}
            )
        assert [row["session_id"] for row in listed.json()["data"]] == [session_id]  # a live session like any other
        assert "sidecar_live_sessions 1.0" in await metrics(s)
        await call.response_done(USAGE)
        await call.response_done(USAGE)
        await s.sidecar.openai(USER_KEY).realtime.calls.hangup(session_id)
        row = await final_row(s)
        assert (row.session_id, row.close_reason, row.model, row.unit) == (session_id, "client_hangup", RT, "token")
        assert (row.input_tokens, row.output_tokens) == (2400, 1400)
        assert row.cost_usd == token_cost(price_of(provider, RT), 2)
        assert (row.audio_bytes, row.audio_seconds) == (0, Decimal(0))
        assert call.hung_up.is_set() and provider.hangups == 1
        kinds = events_of(s)
        assert kinds[0] == ("checkpoint", 1) and kinds[-1][0] == "final" and [k for k, _ in kinds].count("final") == 1
        exposed = await metrics(s)
        assert "sidecar_live_sessions 0.0" in exposed
        assert f'sidecar_sessions_total{{close_reason="client_hangup",model="{RT}"}} 1.0' in exposed


async def test_a_call_holds_its_keys_lease_until_it_is_billed(tmp_path: Path) -> None:
    """With one session allowed per key, a live call refuses a second (429 concurrency_limit, no provider call);
    once it is hung up and billed the lease is free again."""
    async with running(tmp_path, max_sessions_per_key=1) as (s, provider):
        session_id, _ = await realtime_call(s, provider, {"type": "realtime", "model": RT})
        client = s.sidecar.openai(USER_KEY)
        with pytest.raises(openai.RateLimitError) as refused:
            await client.realtime.calls.create(sdp=BROWSER_OFFER, session={"type": "realtime", "model": RT})
        assert refused.value.code == "concurrency_limit" and len(provider.calls) == 1
        await client.realtime.calls.hangup(session_id)
        await final_row(s)
        await client.realtime.calls.create(sdp=BROWSER_OFFER, session={"type": "realtime", "model": RT})
        assert len(provider.calls) == 2


async def test_transcription_call_billed_at_the_reported_seconds(tmp_path: Path) -> None:
    """A transcription call (its audio never reaches the sidecar) bills the seconds the provider reports in each
    transcription's usage, to the microsecond."""
    async with running(tmp_path) as (s, provider):
        session = {"type": "transcription", "audio": {"input": {"transcription": {"model": WHISPER}}}}
        session_id, call = await realtime_call(s, provider, session)
        await call.transcription_completed(seconds=2.345678, text="hello")
        await call.transcription_completed(seconds=1.5, text="world")
        await s.sidecar.openai(USER_KEY).realtime.calls.hangup(session_id)
        row = await final_row(s)
        price = price_of(provider, WHISPER)
        assert (row.model, row.unit, row.quantity) == (WHISPER, "second", Decimal("3.845678"))
        assert row.cost_usd == cost(Decimal("3.845678") * (price.per_unit or 0))
        assert orjson.loads(row.upstream_usage)["duration_seconds"] == 3.845678


async def test_live_call_billed_by_wall_clock_from_answer_to_hangup(tmp_path: Path) -> None:
    """GPT-Live: session seconds on the sidecar's clock from the answer to the hangup (exact); the provider's
    session.usage.updated recorded in upstream_usage, not billed."""
    clock = Clock()
    async with running(tmp_path, clock_ns=clock) as (s, provider):
        client = s.sidecar.openai(USER_KEY)
        created = await client.live.create(session={"model": LIVE}, transport={"type": "webrtc", "sdp": BROWSER_OFFER})
        call = await asyncio.wait_for(provider.wait_for_call(), DEADLINE_S)
        await asyncio.wait_for(call.wait_for_sideband(1), DEADLINE_S)
        clock.now += 61 * NS + 123_000  # 61.000123 s later
        await call.usage_updated(seconds=60)
        await client.live.sessions.hangup(created.session.id)
        row = await final_row(s)
        price = price_of(provider, LIVE)
        assert (row.close_reason, row.unit, row.quantity) == ("client_hangup", "session_second", Decimal("61.000123"))
        assert row.cost_usd == cost(Decimal("61.000123") * (price.per_unit or 0))
        assert orjson.loads(row.upstream_usage)["duration_seconds"] == 60
        assert call.hung_up.is_set()


async def test_revoked_key_ends_the_call_through_the_provider_hangup(tmp_path: Path) -> None:
    """A key deleted in LiteLLM: the next re-check ends the call by the provider's hangup; key_revoked, billed."""
    async with running(tmp_path, key_recheck_s=0.2) as (s, provider):
        _, call = await realtime_call(s, provider, {"type": "realtime", "model": RT})
        await call.response_done(USAGE)
        s.litellm.delete_key(USER_KEY)
        await asyncio.wait_for(call.hung_up.wait(), DEADLINE_S)
        row = await final_row(s)
        assert (row.close_reason, row.input_tokens) == ("key_revoked", 1200)
        assert row.cost_usd == token_cost(price_of(provider, RT), 1)


async def test_budget_cut_off_hangs_the_call_up(tmp_path: Path) -> None:
    """Spend + the call's running cost reaching the key's budget ends it (budget_exceeded) by hangup; the usage
    that crossed the budget is billed."""
    async with running(tmp_path, key_recheck_s=3600) as (s, provider):
        s.litellm.update_key(USER_KEY, max_budget=1.0, spend=0.99)
        _, call = await realtime_call(s, provider, {"type": "realtime", "model": RT})
        await call.response_done(USAGE)  # about $0.07: over the remaining $0.01
        await asyncio.wait_for(call.hung_up.wait(), DEADLINE_S)
        row = await final_row(s)
        assert row.close_reason == "budget_exceeded"
        assert row.cost_usd == token_cost(price_of(provider, RT), 1) > Decimal("0.01")


async def test_admin_delete_ends_the_call(tmp_path: Path) -> None:
    """DELETE /admin/sessions/{id} with the master key: hung up, session_terminated, billed once."""
    async with running(tmp_path) as (s, provider):
        session_id, call = await realtime_call(s, provider, {"type": "realtime", "model": RT})
        async with httpx.AsyncClient() as http:
            answer = await http.delete(
                f"{s.sidecar.http}/admin/sessions/{session_id}", headers={"Authorization": f"Bearer {MASTER_KEY}"}
            )
        assert answer.status_code == 202, answer.text
        await asyncio.wait_for(call.hung_up.wait(), DEADLINE_S)
        row = await final_row(s)
        assert row.close_reason == "session_terminated" and provider.hangups == 1


async def test_sideband_drop_is_reattached_and_billed_once(tmp_path: Path) -> None:
    """The fake aborts the sideband: the sidecar re-attaches at once; usage before and after is billed once."""
    async with running(tmp_path) as (s, provider):
        session_id, call = await realtime_call(s, provider, {"type": "realtime", "model": RT})
        await call.response_done(USAGE)
        await call.drop_sidebands()
        await asyncio.wait_for(call.wait_for_sideband(2), DEADLINE_S)
        await call.response_done(USAGE)
        await s.sidecar.openai(USER_KEY).realtime.calls.hangup(session_id)
        row = await final_row(s)
        assert (row.close_reason, row.input_tokens) == ("client_hangup", 2400)
        assert row.cost_usd == token_cost(price_of(provider, RT), 2)
        assert provider.hangups == 1


async def test_sideband_lost_beyond_the_bound_hangs_up_and_bills_what_was_seen(tmp_path: Path) -> None:
    """A sideband that cannot be re-attached within SIDECAR_SIDEBAND_REATTACH_S: the call is hung up, billed
    `sideband_lost` with the usage seen before the drop."""
    async with running(tmp_path, sideband_reattach_s=2.0) as (s, provider):
        _, call = await realtime_call(s, provider, {"type": "realtime", "model": RT})
        await call.response_done(USAGE)
        provider.refuse_sideband_status = 503
        await call.drop_sidebands()
        await asyncio.wait_for(call.hung_up.wait(), DEADLINE_S)
        row = await final_row(s)
        assert (row.close_reason, row.input_tokens) == ("sideband_lost", 1200)
        assert call.attach_attempts >= 2  # it did try again


async def test_call_ended_by_the_provider_is_upstream_close(tmp_path: Path) -> None:
    """The provider ends the call itself (the peer left): the sidecar sees the call gone, bills upstream_close and
    sends no hangup."""
    async with running(tmp_path) as (s, provider):
        _, call = await realtime_call(s, provider, {"type": "realtime", "model": RT})
        await call.response_done(USAGE)
        await call.end("peer_left")
        row = await final_row(s)
        assert (row.close_reason, row.input_tokens) == ("upstream_close", 1200)
        assert provider.hangups == 0


async def test_drain_lets_calls_run_through_the_grace_then_hangs_up(tmp_path: Path) -> None:
    """Drain: the call goes on during the grace (not hung up while /readyz says draining), then it is hung up and
    billed server_shutdown with its usage."""
    async with running(tmp_path, drain_grace_s=1.0) as (s, provider):
        _, call = await realtime_call(s, provider, {"type": "realtime", "model": RT})
        s.sidecar.server.begin_drain()

        async def draining() -> bool:
            async with httpx.AsyncClient() as http:
                return (await http.get(f"{s.sidecar.http}/readyz")).status_code == 503

        await poll(draining, what="the drain to start")
        assert not call.hung_up.is_set() and s.sidecar.app.state.services.supervisor.live
        await call.response_done(USAGE)  # still watched and billed during the grace
        await asyncio.wait_for(call.hung_up.wait(), DEADLINE_S)
        row = await final_row(s)
        assert (row.close_reason, row.input_tokens) == ("server_shutdown", 1200)


async def test_idle_call_is_hung_up(tmp_path: Path) -> None:
    """No server event on the sideband for SIDECAR_IDLE_TIMEOUT_S: hung up, billed idle_timeout."""
    async with running(tmp_path, idle_timeout_s=0.5) as (s, provider):
        client = s.sidecar.openai(USER_KEY)
        await client.realtime.calls.create(sdp=BROWSER_OFFER, session={"type": "realtime", "model": RT})
        call = await asyncio.wait_for(provider.wait_for_call(), DEADLINE_S)
        await asyncio.wait_for(call.hung_up.wait(), DEADLINE_S)
        row = await final_row(s)
        assert (row.close_reason, row.model) == ("idle_timeout", RT)


async def test_call_reaching_max_duration_is_hung_up(tmp_path: Path) -> None:
    """A GPT-Live call reaching SIDECAR_MAX_SESSION_S is hung up (max_duration) and billed its session seconds."""
    async with running(tmp_path, max_session_s=0.5) as (s, provider):
        client = s.sidecar.openai(USER_KEY)
        await client.live.create(session={"model": LIVE}, transport={"type": "webrtc", "sdp": BROWSER_OFFER})
        call = await asyncio.wait_for(provider.wait_for_call(), DEADLINE_S)
        await asyncio.wait_for(call.hung_up.wait(), DEADLINE_S)
        row = await final_row(s)
        assert row.close_reason == "max_duration" and row.unit == "session_second" and row.quantity > 0


async def test_sigterm_drain_of_a_serve_process_hangs_calls_up_after_the_grace(tmp_path: Path) -> None:
    """A real `sidecar serve` (embedded billing) on SIGTERM: the call goes on through the grace, its usage still
    billed; then it is hung up, the process exits 0, and the call has one final row, server_shutdown."""
    async with FakeCallProvider() as provider:
        db = tmp_path / "billing.db"
        config = tmp_path / "litellm.yaml"
        config.write_text(
            yaml.safe_dump({"model_list": entries(provider), "general_settings": {"master_key": MASTER_KEY}})
        )
        serve = SidecarProcess(
            {
                "SIDECAR_LITELLM_CONFIG": str(config),
                "SIDECAR_SPOOL_DIR": str(tmp_path / "spool"),
                "SIDECAR_DATABASE_URL": f"sqlite:///{db}",
                "SIDECAR_DRAIN_GRACE_S": "3",
            },
            workdir=tmp_path / "serve",
        )
        await serve.start()
        try:
            async with httpx.AsyncClient(base_url=serve.http) as http:
                answer = await http.post(
                    "/v1/realtime/calls",
                    params={"model": RT},
                    content=BROWSER_OFFER.encode(),
                    headers={"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/sdp"},
                )
                assert answer.status_code == 201, answer.text
                call = await asyncio.wait_for(provider.wait_for_call(), DEADLINE_S)
                await asyncio.wait_for(call.wait_for_sideband(1), DEADLINE_S)
                os.kill(serve.pid, signal.SIGTERM)

                async def draining() -> bool:
                    return (await http.get("/readyz")).status_code == 503

                await poll(draining, what="the drain to start")
                assert not call.hung_up.is_set()  # the grace: the call goes on
                await call.response_done(USAGE)
            await asyncio.wait_for(call.hung_up.wait(), DEADLINE_S)
            process = serve._process  # the drain ends the process itself: wait for its exit, no second signal
            assert process is not None
            assert await asyncio.wait_for(process.wait(), DEADLINE_S) == 0
        finally:
            await serve.kill()
    rows = sqlite3.connect(db).execute("select status, close_reason, input_tokens from realtime_usage").fetchall()
    assert rows == [("final", "server_shutdown", 1200)]
