"""Two replicas on one real Redis (issue 17): a WebRTC call is watched by the replica that created it; an admin
DELETE or the owner's hangup sent to the other replica still ends it (through the control channel), billed once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
import yaml

from sidecar.testing.fake_calls import FakeCall, FakeCallProvider
from sidecar.testing.fake_litellm import FakeLiteLLM
from sidecar.testing.fake_sdp import BROWSER_OFFER
from tests.billing_support import DEADLINE_S, RedisServer, SidecarProcess
from tests.relay_stack import MASTER_KEY, USER_KEY, Stack, entry, stack

RT = "gpt-realtime"
USAGE = {"input_tokens": 100, "output_tokens": 50, "total_tokens": 150}


@contextlib.asynccontextmanager
async def pair(tmp_path: Path, redis_url: str, unique: str) -> AsyncIterator[tuple[Stack, Stack, FakeCallProvider]]:
    """Replicas `a` and `b` sharing one Redis (this test's own key prefix and control channel) and one provider."""
    shared: dict[str, Any] = {"control_prefix": f"test:{unique}", "control_channel": f"test:{unique}:control"}
    async with contextlib.AsyncExitStack() as exits:
        provider = await exits.enter_async_context(FakeCallProvider())
        entries = [entry(RT, f"openai/{RT}", provider.url, provider.api_key)]
        litellm = FakeLiteLLM(master_key=MASTER_KEY)  # one LiteLLM behind both replicas
        litellm.add_key(USER_KEY, key_alias="alice-key", user_id="alice", team_id="")
        stacks = []
        for name in ("a", "b"):
            client = aioredis.Redis.from_url(redis_url)
            exits.push_async_callback(client.aclose)
            (tmp_path / name).mkdir()
            running = await exits.enter_async_context(
                stack(tmp_path / name, entries=entries, litellm=litellm, redis=client, replica=name, **shared)
            )
            stacks.append(running)
        yield stacks[0], stacks[1], provider
        cleanup = aioredis.Redis.from_url(redis_url)
        keys = [k async for k in cleanup.scan_iter(match=f"test:{unique}*")]
        if keys:
            await cleanup.delete(*keys)
        await cleanup.aclose()


async def create_on(replica: Stack, provider: FakeCallProvider) -> tuple[str, FakeCall]:
    raw = await replica.sidecar.openai(USER_KEY).realtime.calls.with_raw_response.create(
        sdp=BROWSER_OFFER, session={"type": "realtime", "model": RT}
    )
    assert raw.http_response.status_code == 201
    call = await asyncio.wait_for(provider.wait_for_call(), DEADLINE_S)
    await asyncio.wait_for(call.wait_for_sideband(1), DEADLINE_S)
    return raw.http_response.headers["location"].rsplit("/", 1)[1], call


async def test_admin_delete_on_the_other_replica_ends_the_call(tmp_path: Path, redis_url: str, unique: str) -> None:
    """Created on A, watched by A only, listed on B as A's; DELETE on B ends it on A (hangup), billed once by A."""
    async with pair(tmp_path, redis_url, unique) as (a, b, provider):
        session_id, call = await create_on(a, provider)
        assert session_id in a.sidecar.app.state.services.supervisor.live
        assert session_id not in b.sidecar.app.state.services.supervisor.live
        master = {"Authorization": f"Bearer {MASTER_KEY}"}
        async with httpx.AsyncClient() as http:
            listed = (await http.get(f"{b.sidecar.http}/admin/sessions", headers=master)).json()["data"]
            assert [(row["session_id"], row["replica"]) for row in listed] == [(session_id, "a")]
            await call.response_done(USAGE)
            answer = await http.delete(f"{b.sidecar.http}/admin/sessions/{session_id}", headers=master)
        assert answer.status_code == 202, answer.text
        await asyncio.wait_for(call.hung_up.wait(), DEADLINE_S)
        row = await a.final_row()
        assert (row.session_id, row.close_reason, row.input_tokens, row.output_tokens) == (
            session_id,
            "session_terminated",
            100,
            50,
        )
        assert b.rows() == [] and provider.hangups == 1


async def test_client_hangup_on_the_other_replica_ends_the_call(tmp_path: Path, redis_url: str, unique: str) -> None:
    """The owner's hangup sent to B ends the call A watches: client_hangup, one hangup, billed once by A."""
    async with pair(tmp_path, redis_url, unique) as (a, b, provider):
        session_id, call = await create_on(a, provider)
        await call.response_done(USAGE)
        await b.sidecar.openai(USER_KEY).realtime.calls.hangup(session_id)
        await asyncio.wait_for(call.hung_up.wait(), DEADLINE_S)
        row = await a.final_row()
        assert (row.close_reason, row.input_tokens) == ("client_hangup", 100)
        assert b.rows() == [] and provider.hangups == 1
        assert not b.sidecar.app.state.services.supervisor.live


async def test_a_dead_replicas_call_is_hung_up_by_another(tmp_path: Path) -> None:
    """Replica A (a `sidecar serve` process) watches a call and is SIGKILLed: once its heartbeat lapses, replica B
    finds the call in the shared store and hangs it up (once), billing nothing itself."""
    redis_server = RedisServer(tmp_path / "redis")
    await redis_server.start()
    try:
        async with FakeCallProvider() as provider:
            entries = [entry(RT, f"openai/{RT}", provider.url, provider.api_key)]
            config = tmp_path / "litellm.yaml"
            config.write_text(yaml.safe_dump({"model_list": entries, "general_settings": {"master_key": MASTER_KEY}}))
            a = SidecarProcess(
                {
                    "SIDECAR_LITELLM_CONFIG": str(config),
                    "SIDECAR_REDIS_URL": redis_server.url,
                    "SIDECAR_SPOOL_DIR": str(tmp_path / "a" / "spool"),
                    "SIDECAR_DATABASE_URL": f"sqlite:///{tmp_path / 'unused.db'}",
                },
                workdir=tmp_path / "a",
            )
            await a.start()
            client = aioredis.Redis.from_url(redis_server.url)
            try:
                (tmp_path / "b").mkdir()
                async with stack(tmp_path / "b", entries=entries, redis=client, replica="b") as b:
                    async with httpx.AsyncClient() as http:
                        answer = await http.post(
                            f"{a.http}/v1/realtime/calls",
                            params={"model": RT},
                            content=BROWSER_OFFER.encode(),
                            headers={"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/sdp"},
                        )
                    assert answer.status_code == 201, answer.text
                    call = await asyncio.wait_for(provider.wait_for_call(), DEADLINE_S)
                    await asyncio.wait_for(call.wait_for_sideband(1), DEADLINE_S)
                    await a.kill()
                    assert not call.hung_up.is_set()  # the provider runs the call on, unwatched
                    await asyncio.wait_for(call.hung_up.wait(), DEADLINE_S)
                    assert provider.hangups == 1 and b.rows() == []
                    assert not b.sidecar.app.state.services.supervisor.live
            finally:
                await client.aclose()
                await a.kill()
    finally:
        await redis_server.shutdown()
