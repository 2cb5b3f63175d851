"""A client's own sideband of its WebRTC call through the sidecar (issue 17, stretch): the SDK's
`realtime.connect(call_id=)` and `live.sideband.connect(session_id=)` against the sidecar; the owner's key only;
frames scrubbed; usage it causes billed once (by the call's watch), never twice."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from sidecar.testing.fake_calls import FakeCallProvider
from sidecar.testing.fake_provider import RESPONSE_INPUT_TOKENS, RESPONSE_OUTPUT_TOKENS
from sidecar.testing.fake_sdp import BROWSER_OFFER
from tests.billing_support import DEADLINE_S
from tests.relay_stack import MASTER_KEY, USER_KEY, Stack, entry, stack

RT, RT_DEPLOYMENT = "gpt-realtime", "my-rt-deployment"
LIVE, LIVE_DEPLOYMENT = "gpt-live-1", "my-live-deployment"
OTHER_KEY = "sk-other-key-test-0002"


@contextlib.asynccontextmanager
async def running(tmp_path: Path) -> AsyncIterator[tuple[Stack, FakeCallProvider]]:
    async with FakeCallProvider() as provider:
        entries = [
            entry(RT, f"openai/{RT_DEPLOYMENT}", provider.url, provider.api_key, model_info={"base_model": RT}),
            entry(LIVE, f"openai/{LIVE_DEPLOYMENT}", provider.url, provider.api_key, model_info={"base_model": LIVE}),
        ]
        async with stack(tmp_path, entries=entries) as s:
            s.litellm.add_key(OTHER_KEY, key_alias="bob-key", user_id="bob", team_id="")
            yield s, provider


def leaks(text: str, provider: FakeCallProvider) -> list[str]:
    secrets = [provider.api_key, provider.url.removeprefix("http://"), RT_DEPLOYMENT, LIVE_DEPLOYMENT]
    return [secret for secret in secrets if secret in text]


async def refused(url: str, key: str) -> tuple[int, dict[str, Any]]:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, additional_headers={"Authorization": f"Bearer {key}"}):
            pass
    response = info.value.response
    return response.status_code, orjson.loads(response.body or b"{}")


async def test_owner_sideband_is_relayed_scrubbed_and_billed_once(tmp_path: Path) -> None:
    """The owner attaches with the SDK: session.created scrubbed of the deployment's names; a response.create
    sent on it is answered (response.done to the client) and billed once, by the call's watch; the call's end
    closes the client's sideband."""
    async with running(tmp_path) as (s, provider):
        client = s.sidecar.openai(USER_KEY)
        raw = await client.realtime.calls.with_raw_response.create(
            sdp=BROWSER_OFFER, session={"type": "realtime", "model": RT}
        )
        session_id = raw.http_response.headers["location"].rsplit("/", 1)[1]
        call = await asyncio.wait_for(provider.wait_for_call(), DEADLINE_S)
        async with client.realtime.connect(call_id=session_id) as connection:
            first = await connection.recv_bytes()
            assert orjson.loads(first)["type"] == "session.created"
            assert leaks(first.decode(), provider) == [] and RT in first.decode()
            await asyncio.wait_for(call.wait_for_sideband(2), DEADLINE_S)  # the watch's and the client's
            await connection.send({"type": "response.create"})
            seen = []
            async for event in connection:
                seen.append(event.type)
                if event.type == "response.done":
                    break
            assert seen[-2:] == ["response.created", "response.done"]
            await client.realtime.calls.hangup(session_id)
            rest = [event.type async for event in connection]  # the provider closes every sideband of the call
            assert "error" not in rest
        row = await s.final_row()
        assert (row.close_reason, row.input_tokens, row.output_tokens) == (
            "client_hangup",
            RESPONSE_INPUT_TOKENS,
            RESPONSE_OUTPUT_TOKENS,
        )


async def test_only_the_owner_or_the_master_key_may_attach(tmp_path: Path) -> None:
    """Another key's attach and an unknown call id are refused 404 session_not_found before the upgrade (not told
    apart); the master key may attach."""
    async with running(tmp_path) as (s, _):
        raw = await s.sidecar.openai(USER_KEY).realtime.calls.with_raw_response.create(
            sdp=BROWSER_OFFER, session={"type": "realtime", "model": RT}
        )
        session_id = raw.http_response.headers["location"].rsplit("/", 1)[1]
        base = f"{s.sidecar.ws}/v1/realtime?call_id="
        for url, key in ((base + session_id, OTHER_KEY), (base + "rs_unknown", USER_KEY)):
            status, body = await refused(url, key)
            assert (status, body["error"]["code"]) == (404, "session_not_found")
        status, _ = await refused(base + session_id, "sk-not-a-key")
        assert status == 401
        async with connect(base + session_id, additional_headers={"Authorization": f"Bearer {MASTER_KEY}"}) as ws:
            assert orjson.loads(await ws.recv())["type"] == "session.created"


async def test_live_owner_sideband_through_the_sidecar(tmp_path: Path) -> None:
    """GPT-Live: the SDK's live.sideband.connect on the sidecar's session id gets the call's session.started,
    scrubbed; a session.update naming another model is refused by the sidecar, not forwarded."""
    async with running(tmp_path) as (s, provider):
        client = s.sidecar.openai(USER_KEY)
        created = await client.live.create(session={"model": LIVE}, transport={"type": "webrtc", "sdp": BROWSER_OFFER})
        call = await asyncio.wait_for(provider.wait_for_call(), DEADLINE_S)
        async with client.live.sideband.connect(session_id=created.session.id) as connection:
            first = await connection.recv_bytes()
            assert orjson.loads(first)["type"] == "session.started" and leaks(first.decode(), provider) == []
            await asyncio.wait_for(call.wait_for_sideband(2), DEADLINE_S)
            await connection.send({"type": "session.update", "session": {"model": "gpt-other"}})
            answer = orjson.loads(await connection.recv_bytes())
            assert (answer["type"], answer["error"]["code"]) == ("error", "model_mismatch")
            sideband = call.sidebands[1]
            assert all(event.get("type") != "session.update" for event in sideband.events)
        await client.live.sessions.hangup(created.session.id)
        row = await s.final_row()
        assert row.close_reason == "client_hangup"
