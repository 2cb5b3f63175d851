"""GPT-Live and realtime translation sessions go through the one billing path, end to end: embedded into SQLite,
and Redis stream -> `UsageConsumer` -> PostgreSQL. Each test asserts exactly one realtime_usage row with the
exact figures, and every usage event the relay submitted stored once (seqs 1..N)."""

from __future__ import annotations

import base64
import signal
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from sidecar.billing.tables import RealtimeUsage
from sidecar.testing.fake_provider import FakeProvider
from sidecar.testing.fake_translation import FRAME_BYTES
from tests.billing_support import Billed, EventLike, Sink, embedded_sink, redis_sink, until_closed
from tests.relay_stack import USER_KEY, entry, stack
from tests.test_live_route import Clock

LIVE_PRICE = Decimal("0.000833333333333")
TRANSLATE_PRICE = Decimal("0.000566666666667")


@pytest.fixture(params=["embedded-sqlite", "redis-postgresql"])
async def sink(
    request: pytest.FixtureRequest, tmp_path: Path, redis_url: str, usage_stream: str
) -> AsyncIterator[Sink]:
    """The billing sink: embedded into SQLite, or through Redis into PostgreSQL."""
    if request.param == "embedded-sqlite":
        async with embedded_sink(tmp_path) as embedded:
            yield embedded
        return
    database_url: str = request.getfixturevalue("pg_url")
    async with redis_sink(tmp_path, redis_url=redis_url, stream=usage_stream, database_url=database_url) as redis:
        yield redis


def billed_once(billed: Billed, submitted: list[EventLike]) -> RealtimeUsage:
    """The one row, after checking every submitted event was stored exactly once, seqs 1..N."""
    assert len(billed.rows) == 1
    stored = [(e.session_id, e.seq, e.event_id, e.type) for e in billed.events]
    assert stored == sorted((e.session_id, e.seq, e.event_id, e.type) for e in submitted)
    assert [e.seq for e in billed.events] == list(range(1, len(submitted) + 1))
    assert submitted[-1].type == "final"
    return billed.rows[0]


async def test_a_translation_session_is_billed_once_by_its_input_audio(
    tmp_path: Path, speech_pcm16: bytes, sink: Sink
) -> None:
    """The SDK's translation session of the shared speech: one final, 6.667125 s, unit second."""
    provider = FakeProvider()
    async with provider:
        entries = [entry("gpt-realtime-translate", "openai/gpt-realtime-translate", provider.url, provider.api_key)]
        async with stack(tmp_path, provider=provider, entries=entries, publisher=sink.tap) as s:
            client = s.sidecar.openai(USER_KEY)
            async with client.realtime.translations.connect(model="gpt-realtime-translate") as conn:
                await conn.recv()
                for offset in range(0, len(speech_pcm16), FRAME_BYTES):
                    chunk = base64.b64encode(speech_pcm16[offset : offset + FRAME_BYTES]).decode()
                    await conn.session.input_audio_buffer.append(audio=chunk)
                await conn.session.close()
                _ = [event async for event in conn]
            row = billed_once(await sink.billed(), list(sink.tap.events))
    assert (row.status, row.unit, row.kind, row.audio_bytes) == ("final", "second", "realtime-translation", 320022)
    assert Decimal(row.quantity) == Decimal("6.667125")
    assert Decimal(row.cost_usd) == (Decimal("6.667125") * TRANSLATE_PRICE).quantize(Decimal("1e-10"))


async def test_a_live_session_drained_at_shutdown_is_billed_once_in_session_seconds(tmp_path: Path, sink: Sink) -> None:
    """SIGTERM while a GPT-Live session is live: GPT-Live's error event server_shutdown, close 1001, one final
    billing its session seconds on the sidecar's clock (unit session_second), close_reason server_shutdown."""
    clock = Clock()
    provider = FakeProvider()
    async with provider:
        entries = [entry("gpt-live-1", "openai/gpt-live-1", provider.url, provider.api_key)]
        async with stack(tmp_path, provider=provider, entries=entries, publisher=sink.tap, clock_ns=clock) as s:
            async with s.sidecar.openai(USER_KEY).live.connect() as conn:
                await conn.session.start(session={"model": "gpt-live-1"})
                assert (await conn.recv()).type == "session.started"
                clock.advance(42.5)
                s.sidecar.server.handle_exit(signal.SIGTERM, None)  # what `sidecar serve` does on SIGTERM
                events, code = await until_closed(conn)
            row = billed_once(await sink.billed(), list(sink.tap.events))
    assert code == 1001 and (events[-1].type, events[-1].error.code) == ("error", "server_shutdown")
    assert (row.close_reason, row.unit, row.kind) == ("server_shutdown", "session_second", "live-session")
    assert Decimal(row.quantity) == Decimal("42.5")
    assert Decimal(row.cost_usd) == (Decimal("42.5") * LIVE_PRICE).quantize(Decimal("1e-10"))
