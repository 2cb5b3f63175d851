"""Settings a WebRTC call's browser changes over its data channel (the sidecar sees only the provider's
session.updated on its sideband): the transcriber followed and billed, an unpriceable one hung up, a client
secret's pinned settings restored on the sideband or the call hung up. Real sidecar, the openai SDK, the fake
WebRTC provider (its data channel played by `call.client_event`)."""

from __future__ import annotations

import asyncio
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import orjson

from sidecar.testing.fake_calls import FakeCall, FakeCallProvider
from sidecar.testing.fake_sdp import BROWSER_OFFER
from tests.billing_support import DEADLINE_S, poll
from tests.relay_stack import USER_KEY, Stack
from tests.test_calls_create import RT, TRANSCRIBER, TRANSCRIBER_DEPLOYMENT, WHISPER, calls_stack, fake, mint


def cost(amount: Decimal) -> Decimal:
    return amount.quantize(Decimal("1e-10"), rounding=ROUND_HALF_EVEN)


def per_second(running: Stack, name: str) -> Decimal:
    price = running.sidecar.app.state.services.catalog.transcribers[name].price
    assert price.unit == "second" and price.per_unit is not None
    return price.per_unit


async def created(
    running: Stack, provider: FakeCallProvider, key: str, session: dict[str, Any]
) -> tuple[str, FakeCall]:
    """A realtime call created with the SDK under `key`: (the sidecar's call id, the provider's call), watched."""
    raw = await running.sidecar.openai(key).realtime.calls.with_raw_response.create(sdp=BROWSER_OFFER, session=session)
    assert raw.http_response.status_code == 201, raw.http_response.text
    call = await asyncio.wait_for(provider.wait_for_call(), DEADLINE_S)
    await asyncio.wait_for(call.wait_for_sideband(1), DEADLINE_S)
    return raw.http_response.headers["location"].rsplit("/", 1)[1], call


async def browser_update(call: FakeCall, session: dict[str, Any]) -> None:
    """The browser's session.update over the data channel: the provider applies it and shows session.updated on
    the sidebands."""
    await call.client_event(orjson.dumps({"type": "session.update", "session": session}).decode())


def transcriber(name: str) -> dict[str, Any]:
    return {"type": "realtime", "audio": {"input": {"transcription": {"model": name}}}}


def duration(seconds: float) -> dict[str, Any]:
    return {"type": "duration", "seconds": seconds}


CONVERSATION = {"type": "realtime", "model": RT, "audio": {"input": {"transcription": {"model": TRANSCRIBER}}}}


async def test_a_transcriber_changed_over_the_data_channel_is_billed_at_its_own_price(tmp_path: Path) -> None:
    """whisper-1 at the create, gpt-realtime-whisper set by the browser: 10 s before the change at whisper-1's
    price, 4 s after it at gpt-realtime-whisper's, exactly."""
    async with fake() as provider, calls_stack(tmp_path, provider) as running:
        session_id, call = await created(running, provider, USER_KEY, CONVERSATION)
        await call.transcription_completed(usage=duration(10.0))
        await browser_update(call, transcriber(WHISPER))
        assert call.protocol.session["audio"]["input"]["transcription"]["model"] == WHISPER  # type: ignore[attr-defined]
        await call.transcription_completed(usage=duration(4.0))
        await running.sidecar.openai(USER_KEY).realtime.calls.hangup(session_id)
        row = await running.final_row()
        expected = cost(10 * per_second(running, TRANSCRIBER) + 4 * per_second(running, WHISPER))
        assert per_second(running, TRANSCRIBER) != per_second(running, WHISPER)
        assert (row.close_reason, row.cost_usd) == ("client_hangup", expected)
        usage = orjson.loads(row.upstream_usage)
        assert Decimal(str(usage["transcription_cost_usd"])) == expected and "transcription_unpriced" not in usage
        assert provider.hangups == 1


async def test_an_unpriceable_transcriber_ends_the_call_through_hangup(tmp_path: Path) -> None:
    """A transcriber the config does not have (gpt-4o-transcribe): the call is hung up through the provider as
    transcriber_refused; the transcription before the change is billed at whisper-1's price."""
    async with fake() as provider, calls_stack(tmp_path, provider) as running:
        _, call = await created(running, provider, USER_KEY, CONVERSATION)
        await call.transcription_completed(usage=duration(10.0))
        await browser_update(call, transcriber("gpt-4o-transcribe"))
        await asyncio.wait_for(call.hung_up.wait(), DEADLINE_S)
        row = await running.final_row()
        assert (row.close_reason, row.cost_usd) == ("transcriber_refused", cost(10 * per_second(running, TRANSCRIBER)))
        assert provider.hangups == 1


PINNED = {
    "type": "realtime",
    "model": RT,
    "instructions": "Caption only.",
    "audio": {"input": {"transcription": {"model": TRANSCRIBER}}, "output": {"voice": "alloy"}},
}


async def test_a_pinned_setting_changed_over_the_data_channel_is_restored_on_the_sideband(tmp_path: Path) -> None:
    """A client secret pinning the voice, the instructions and the transcriber: the browser changes the voice; the
    sidecar's sideband sends a session.update with the bound values (the transcriber by its deployment name, no
    model), the provider's session shows them again, and the call goes on until its hangup."""
    async with fake() as provider, calls_stack(tmp_path, provider) as running:
        secret = await mint(running.sidecar.http, PINNED)
        session_id, call = await created(running, provider, secret, {"type": "realtime", "model": RT})
        sideband = call.sidebands[0]
        await browser_update(call, {"type": "realtime", "audio": {"output": {"voice": "verse"}}})

        async def restores() -> list[dict[str, Any]]:
            return [e for e in sideband.events if e.get("type") == "session.update"]

        (restore,) = await poll(restores, what="the sideband's session.update")
        assert restore["session"] == {
            "type": "realtime",
            "instructions": "Caption only.",
            "audio": {"input": {"transcription": {"model": TRANSCRIBER_DEPLOYMENT}}, "output": {"voice": "alloy"}},
        }
        assert call.protocol.session["audio"]["output"]["voice"] == "alloy"  # type: ignore[attr-defined]
        await call.response_done()
        await running.sidecar.openai(USER_KEY).realtime.calls.hangup(session_id)
        row = await running.final_row()
        assert (row.close_reason, provider.hangups) == ("client_hangup", 1)
        assert row.input_tokens > 0  # the call went on, billed


async def test_a_pinned_setting_the_provider_keeps_changed_hangs_the_call_up(tmp_path: Path) -> None:
    """The provider keeps showing the changed instructions after the sidecar's restore: hung up as session_pinned,
    through the provider's hangup, the usage before it billed."""
    async with fake() as provider, calls_stack(tmp_path, provider) as running:
        secret = await mint(running.sidecar.http, PINNED)
        _, call = await created(running, provider, secret, {"type": "realtime", "model": RT})
        await call.transcription_completed(usage=duration(5.0))
        shown = orjson.loads(orjson.dumps(call.protocol.session))  # type: ignore[attr-defined]
        shown["instructions"] = "Say anything."
        await call.emit({"type": "session.updated", "session": shown})
        await call.emit({"type": "session.updated", "session": shown})  # before the restore's answer
        await asyncio.wait_for(call.hung_up.wait(), DEADLINE_S)
        row = await running.final_row()
        assert (row.close_reason, row.cost_usd) == ("session_pinned", cost(5 * per_second(running, TRANSCRIBER)))
        assert provider.hangups == 1


async def test_a_transcriber_the_key_may_not_use_ends_the_call(tmp_path: Path) -> None:
    """A key allowed gpt-realtime and whisper-1 only: the browser's change to gpt-realtime-whisper hangs the call up
    as transcriber_refused, the transcription before it billed at whisper-1's price."""
    async with fake() as provider, calls_stack(tmp_path, provider) as running:
        limited = "sk-limited-key-test-0003"
        running.litellm.add_key(limited, key_alias="limited", user_id="carol", team_id="", models=[RT, TRANSCRIBER])
        _, call = await created(running, provider, limited, CONVERSATION)
        await call.transcription_completed(usage=duration(7.5))
        await browser_update(call, transcriber(WHISPER))
        await asyncio.wait_for(call.hung_up.wait(), DEADLINE_S)
        row = await running.final_row()
        assert (row.close_reason, row.cost_usd) == (
            "transcriber_refused",
            cost(Decimal("7.5") * per_second(running, TRANSCRIBER)),
        )


async def test_the_model_changed_over_the_data_channel_ends_the_call(tmp_path: Path) -> None:
    """The provider shows another model after the browser's update: hung up as model_mismatch, the response before
    it billed."""
    async with fake() as provider, calls_stack(tmp_path, provider) as running:
        _, call = await created(running, provider, USER_KEY, {"type": "realtime", "model": RT})
        await call.response_done()
        await browser_update(call, {"type": "realtime", "model": "gpt-realtime-mini"})
        await asyncio.wait_for(call.hung_up.wait(), DEADLINE_S)
        row = await running.final_row()
        assert row.close_reason == "model_mismatch" and row.input_tokens > 0 and provider.hangups == 1
