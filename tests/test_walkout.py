"""Walk-outs on /v1/realtime (issue 15, item 3): a client gone while a response is in progress gets that
response cancelled upstream and billed with its usage; the wait is bounded and its outcome recorded."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from openai.resources.realtime.realtime import AsyncRealtimeConnection

from sidecar.metering import SessionMeter
from sidecar.testing.fake_provider import (
    RESPONSE_INPUT_TOKENS,
    RESPONSE_OUTPUT_TOKENS,
    FakeProvider,
    Faults,
    response_usage,
)
from tests.relay_stack import USER_KEY, Stack, catalog_for, entry, stack


def _entries(provider: FakeProvider) -> list[dict[str, Any]]:
    return [entry("gpt-realtime", "openai/gpt-realtime", provider.url, provider.api_key)]


def _response_cost(provider: FakeProvider) -> Decimal:
    """What the fake's one response costs at gpt-realtime's price."""
    meter = SessionMeter(catalog_for(_entries(provider)).resolve("gpt-realtime").price)
    meter.on_response_done(response_usage())
    return meter.cost()


async def _response_in_progress(conn: AsyncRealtimeConnection) -> str:
    """Ask for a response and return its id once the provider announced it (it stays in progress)."""
    await conn.response.create()
    async for event in conn:
        if event.type == "response.created":
            assert event.response.id is not None
            return event.response.id
    raise AssertionError("the connection closed before response.created")


async def _leave(conn: AsyncRealtimeConnection, how: str) -> None:
    if how == "abort":
        conn._connection.transport.abort()  # no close frame: the client vanishes
    else:
        await conn.close()


def _cancels(s: Stack) -> list[dict[str, Any]]:
    return [event for event in s.provider.sessions[0].events if event.get("type") == "response.cancel"]


@pytest.mark.parametrize(("how", "reason"), [("abort", "client_abort"), ("close", "client_close")])
async def test_walkout_during_a_response_is_billed_with_its_usage(tmp_path: Path, how: str, reason: str) -> None:
    """A client that leaves mid-response: the sidecar cancels it upstream and bills its response.done usage."""
    async with FakeProvider(faults=Faults(hold_responses=True)) as provider:
        async with stack(tmp_path, provider=provider, entries=_entries(provider)) as s:
            client = s.sidecar.openai(USER_KEY)
            async with client.realtime.connect(model="gpt-realtime") as conn:
                response_id = await _response_in_progress(conn)
                await _leave(conn, how)
            row = await s.final_row()
            assert [event.get("response_id") for event in _cancels(s)] == [response_id]
            assert row.cost_usd == _response_cost(provider) > 0
    assert row.close_reason == reason
    assert (row.input_tokens, row.output_tokens) == (RESPONSE_INPUT_TOKENS, RESPONSE_OUTPUT_TOKENS)
    assert orjson.loads(row.upstream_usage)["walkout"] == "response_done"


async def test_walkout_wait_times_out_billed_with_what_is_known_and_marked(tmp_path: Path) -> None:
    """A provider that never answers the cancel: the session closes after SIDECAR_WALKOUT_WAIT_S, billed with
    what was known (no tokens) and marked `walkout: timed_out`."""
    async with FakeProvider(faults=Faults(hold_responses=True, ignore_cancel=True)) as provider:
        async with stack(tmp_path, provider=provider, entries=_entries(provider), walkout_wait_s=0.05) as s:
            client = s.sidecar.openai(USER_KEY)
            async with client.realtime.connect(model="gpt-realtime") as conn:
                await _response_in_progress(conn)
                await _leave(conn, "abort")
            row = await s.final_row()
            assert len(_cancels(s)) == 1
            await s.provider.sessions[0].closed.wait()  # the upstream is closed after the wait
    assert row.close_reason == "client_abort"
    assert (row.input_tokens, row.output_tokens, row.cost_usd) == (0, 0, 0)
    assert orjson.loads(row.upstream_usage) == {"walkout": "timed_out"}


async def test_walkout_ends_when_the_upstream_closes_instead_of_answering(tmp_path: Path) -> None:
    """A provider that closes on the cancel: no wait for the timeout (an hour here), billed with what was known,
    marked `walkout: upstream_closed`."""
    faults = Faults(hold_responses=True, close_on_cancel=(1000, "bye"))
    async with FakeProvider(faults=faults) as provider:
        async with stack(tmp_path, provider=provider, entries=_entries(provider), walkout_wait_s=3600.0) as s:
            client = s.sidecar.openai(USER_KEY)
            async with client.realtime.connect(model="gpt-realtime") as conn:
                await _response_in_progress(conn)
                await _leave(conn, "abort")
            row = await s.final_row()
    assert row.close_reason == "client_abort"
    assert orjson.loads(row.upstream_usage) == {"walkout": "upstream_closed"}


async def test_abort_with_no_response_in_progress_closes_at_once(tmp_path: Path) -> None:
    """No response in progress: no cancel, no wait (a wait of an hour would hang this test), no walk-out mark."""
    async with FakeProvider(faults=Faults(hold_responses=True)) as provider:
        async with stack(tmp_path, provider=provider, entries=_entries(provider), walkout_wait_s=3600.0) as s:
            client = s.sidecar.openai(USER_KEY)
            async with client.realtime.connect(model="gpt-realtime") as conn:
                await conn.session.update(session={"type": "realtime", "instructions": "hi"})
                async for event in conn:
                    if event.type == "session.updated":
                        break
                await _leave(conn, "abort")
            row = await s.final_row()
            await s.provider.sessions[0].closed.wait()
            assert _cancels(s) == []
    assert row.close_reason == "client_abort"
    assert "walkout" not in (orjson.loads(row.upstream_usage) if row.upstream_usage else {})


async def test_a_response_done_before_the_walkout_leaves_nothing_to_wait_for(tmp_path: Path) -> None:
    """A response finished before the client left is billed as usual, and the abort closes at once."""
    async with stack(tmp_path, walkout_wait_s=3600.0, entries=None) as s:
        client = s.sidecar.openai(USER_KEY)
        async with client.realtime.connect(model="gpt-realtime") as conn:
            await conn.response.create()
            async for event in conn:
                if event.type == "response.done":
                    break
            await _leave(conn, "abort")
        row = await s.final_row()
        assert _cancels(s) == []
    assert (row.input_tokens, row.output_tokens) == (RESPONSE_INPUT_TOKENS, RESPONSE_OUTPUT_TOKENS)
    assert "walkout" not in orjson.loads(row.upstream_usage or "{}")
