"""Billing survives crashes and outages (docs/api.md, "Metering and billing"): a SIGKILLed sidecar is closed
`lost` at its last checkpoint, a Redis restart mid-session or a billing DB outage loses and doubles nothing.

Real processes: `sidecar serve` as a subprocess, a throwaway `redis-server` per test on its own port (so the
fixed stream name `realtime:usage` collides with nobody), PostgreSQL. The consumer-side failures (killed
between commit and XACK, duplicates, out-of-order events) are in tests/test_billing_consumer.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
import yaml
from openai import AsyncOpenAI
from sqlalchemy import Engine

from sidecar.billing import BillingWriter, UsageConsumer, make_engine, upgrade
from sidecar.publisher import EmbeddedPublisher, RedisPublisher
from sidecar.spool import Spool
from sidecar.testing.fake_provider import FakeProvider
from sidecar.usage import UsageDecodeError, UsageEvent
from tests.billing_support import (
    DEADLINE_S,
    MODEL,
    PCM16_BYTES_PER_SECOND,
    FakeClock,
    PacedStreamer,
    RedisServer,
    SidecarProcess,
    TappedPublisher,
    assert_billed_once,
    drain,
    free_port,
    next_event,
    poll,
    quick_redis,
    read_billing,
    serve_env,
    stream_speech,
    until_closed,
)
from tests.relay_stack import MASTER_KEY, USER_KEY, entry, stack
from tests.support import TRANSCRIBE, chunks

STREAM = "realtime:usage"  # fixed for `sidecar serve`; each test has its own redis-server
SPEECH_BYTES = 320_022
T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A throwaway redis-server with an append-only file, so its data survives SHUTDOWN and restart."""
    server = RedisServer(tmp_path / "redis", appendonly=True)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client of the throwaway server that fails at once while it is down."""
    client = quick_redis(redis_server.url)
    yield client
    await client.aclose()


async def stream_events(redis: aioredis.Redis) -> list[UsageEvent]:
    """The usage events in the stream, oldest first."""
    entries: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(STREAM)  # type: ignore[assignment]
    return [UsageEvent.from_fields(fields) for _, fields in entries]


async def until_seq(redis: aioredis.Redis, seq: int) -> None:
    """Block (XREAD) until the stream holds an event with at least `seq`."""
    last: bytes | str = "0-0"
    async with asyncio.timeout(DEADLINE_S):
        while True:
            reply: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] = await redis.xread(  # type: ignore[assignment]
                {STREAM: last}, block=1000
            )
            for _, entries in reply:
                for entry_id, fields in entries:
                    last = entry_id
                    if UsageEvent.from_fields(fields).seq >= seq:
                        return


async def test_sigkilled_sidecar_is_billed_lost_at_its_last_checkpoint(
    tmp_path: Path, speech_pcm16: bytes, redis_server: RedisServer, redis: aioredis.Redis, pg_url: str
) -> None:
    """`sidecar serve` SIGKILLed mid-stream: one `lost` record with its last checkpoint's figures, < 1 s lost."""
    async with FakeProvider() as provider:
        env = serve_env(tmp_path, provider, redis_url=redis_server.url, checkpoint_s="1")
        sidecar = SidecarProcess(env, workdir=tmp_path / "serve")
        await sidecar.start()
        try:
            client = AsyncOpenAI(base_url=f"{sidecar.http}/v1", api_key=MASTER_KEY, max_retries=0)
            async with client.realtime.connect(model=MODEL, extra_query=TRANSCRIBE) as conn:
                await next_event(conn, "session.created")
                streamer = PacedStreamer(conn, speech_pcm16)
                streaming = asyncio.create_task(streamer.run())
                await until_seq(redis, 3)  # seq 1 at the start, then two interval checkpoints
                await streamer.reach(streamer.sent_chunks + 5)  # half an interval after a checkpoint
                sent = streamer.sent_bytes
                await sidecar.kill()
                streaming.cancel()
                await asyncio.gather(streaming, return_exceptions=True)
        finally:
            await sidecar.kill()
    published = await stream_events(redis)
    assert [e.type for e in published] == ["checkpoint"] * len(published), "no final from a killed process"
    last = published[-1]

    engine = make_engine(pg_url)
    upgrade(engine)
    clock = FakeClock(T0)
    consumer = UsageConsumer(redis, BillingWriter(engine), stream=STREAM, block_ms=0, lost_after_s=5.0, clock=clock)
    await drain(consumer)
    assert [row.status for row in read_billing(engine).rows] == ["open"]
    clock.now = T0 + timedelta(seconds=6)
    assert await consumer.sweep_lost() == 1
    billed = read_billing(engine)
    engine.dispose()

    row = assert_billed_once(
        billed, published, audio_bytes=last.audio_bytes, close_reason="lost", status="lost", key=MASTER_KEY
    )
    assert (row.last_seq, row.ended_at) == (last.seq, T0)
    loss = sent - row.audio_bytes
    print(f"\nSIGKILL: streamed {sent} bytes, billed {row.audio_bytes} (seq {last.seq}), lost {loss} bytes")
    assert 0 <= loss <= PCM16_BYTES_PER_SECOND * 1, "at most one checkpoint interval (1 s) of audio is lost"


async def test_sigkilled_sidecar_bills_a_gpt_live_session_lost_at_its_last_checkpoint(
    tmp_path: Path, redis_server: RedisServer, redis: aioredis.Redis, pg_url: str
) -> None:
    """`sidecar serve` SIGKILLed during a GPT-Live session (the SDK's live.connect): its checkpoints carry the
    session seconds so far (unit session_second), and the consumer closes it `lost` at the last one."""
    async with FakeProvider() as provider:
        env = serve_env(tmp_path, provider, redis_url=redis_server.url, checkpoint_s="1")
        config = {
            "model_list": [entry("gpt-live-1", "openai/gpt-live-1", provider.url, provider.api_key)],
            "general_settings": {"master_key": MASTER_KEY},
        }
        (tmp_path / "live.yaml").write_text(yaml.safe_dump(config))
        env["SIDECAR_LITELLM_CONFIG"] = str(tmp_path / "live.yaml")
        sidecar = SidecarProcess(env, workdir=tmp_path / "serve")
        await sidecar.start()
        try:
            client = AsyncOpenAI(base_url=f"{sidecar.http}/v1", api_key=MASTER_KEY, max_retries=0)
            async with client.live.connect() as conn:
                await conn.session.start(session={"model": "gpt-live-1"})
                await next_event(conn, "session.started")
                await until_seq(redis, 3)  # seq 1 at the start, then two interval checkpoints
                await sidecar.kill()
        finally:
            await sidecar.kill()
    published = await stream_events(redis)
    assert [e.type for e in published] == ["checkpoint"] * len(published), "no final from a killed process"
    last = published[-1]
    assert (last.model, last.kind, last.unit) == ("gpt-live-1", "live-session", "session_second")
    assert last.quantity > 0 and last.cost_usd > 0
    engine = make_engine(pg_url)
    upgrade(engine)
    clock = FakeClock(T0)
    consumer = UsageConsumer(redis, BillingWriter(engine), stream=STREAM, block_ms=0, lost_after_s=5.0, clock=clock)
    await drain(consumer)
    clock.now = T0 + timedelta(seconds=6)
    assert await consumer.sweep_lost() == 1
    rows = read_billing(engine).rows
    engine.dispose()
    assert [(r.status, r.close_reason, r.last_seq) for r in rows] == [("lost", "lost", last.seq)]
    assert (rows[0].unit, rows[0].quantity, rows[0].cost_usd) == ("session_second", last.quantity, last.cost_usd)


async def test_sigterm_drains_and_bills_the_live_session_before_exit(
    tmp_path: Path, speech_pcm16: bytes, redis_server: RedisServer, redis: aioredis.Redis, pg_url: str
) -> None:
    """`sidecar serve` SIGTERMed mid-session: server_shutdown error, 1001, final published, exit 0."""
    async with FakeProvider() as provider:
        env = serve_env(tmp_path, provider, redis_url=redis_server.url, drain_grace_s="0.5")
        sidecar = SidecarProcess(env, workdir=tmp_path / "serve")
        await sidecar.start()
        try:
            client = AsyncOpenAI(base_url=f"{sidecar.http}/v1", api_key=MASTER_KEY, max_retries=0)
            async with client.realtime.connect(model=MODEL, extra_query=TRANSCRIBE) as conn:
                await stream_speech(conn, speech_pcm16)
                stopping = asyncio.create_task(sidecar.terminate())
                events, code = await until_closed(conn)
            exit_code = await stopping
        finally:
            await sidecar.kill()
    assert (code, events[-1].type, events[-1].error.code) == (1001, "error", "server_shutdown")
    assert exit_code == 0
    published = await stream_events(redis)
    assert published[-1].type == "final", "the final was published before the process exited"

    engine = make_engine(pg_url)
    upgrade(engine)
    await drain(UsageConsumer(redis, BillingWriter(engine), stream=STREAM, block_ms=0))
    billed = read_billing(engine)
    engine.dispose()
    assert_billed_once(billed, published, audio_bytes=SPEECH_BYTES, close_reason="server_shutdown", key=MASTER_KEY)


def spooled(directory: Path) -> list[UsageEvent]:
    """The readable usage events in a spool directory's files (another process's spool)."""
    events = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            with contextlib.suppress(ValueError, UsageDecodeError):  # a torn last line
                events.append(UsageEvent.from_fields(orjson.loads(line)))
    return events


async def test_sigkill_during_redis_outage_next_sidecar_publishes_the_spool(
    tmp_path: Path, speech_pcm16: bytes, redis_server: RedisServer, redis: aioredis.Redis, pg_url: str
) -> None:
    """Killed while Redis is down: the next `sidecar serve` on the spool publishes it; lost at the last checkpoint."""
    spool_dir = tmp_path / "spool-serve"
    async with FakeProvider() as provider:
        env = serve_env(tmp_path, provider, redis_url=redis_server.url, checkpoint_s="1", spool_dir=str(spool_dir))
        first = SidecarProcess(env, workdir=tmp_path / "first")
        await first.start()
        try:
            client = AsyncOpenAI(base_url=f"{first.http}/v1", api_key=MASTER_KEY, max_retries=0)
            async with client.realtime.connect(model=MODEL, extra_query=TRANSCRIBE) as conn:
                await next_event(conn, "session.created")
                streaming = asyncio.create_task(PacedStreamer(conn, speech_pcm16).run())
                await until_seq(redis, 2)
                await redis_server.shutdown()
                await poll(lambda: _at_least(spool_dir, 2), what="two usage events in the dead sidecar's spool")
                await first.kill()
                streaming.cancel()
                await asyncio.gather(streaming, return_exceptions=True)
        finally:
            await first.kill()
        durable = await stream_events_after_restart(redis_server, redis, spooled(spool_dir))
        second = SidecarProcess(env, workdir=tmp_path / "second")
        await second.start()  # adopts the dead process's spool and publishes it
        try:
            await until_seq(redis, durable[-1].seq)
        finally:
            assert await second.terminate() == 0
    assert spooled(spool_dir) == [], "the spool was published and emptied"

    engine = make_engine(pg_url)
    upgrade(engine)
    clock = FakeClock(T0)
    consumer = UsageConsumer(redis, BillingWriter(engine), stream=STREAM, block_ms=0, lost_after_s=5.0, clock=clock)
    await drain(consumer)
    clock.now = T0 + timedelta(seconds=6)
    assert await consumer.sweep_lost() == 1
    billed = read_billing(engine)
    engine.dispose()
    assert_billed_once(
        billed, durable, audio_bytes=durable[-1].audio_bytes, close_reason="lost", status="lost", key=MASTER_KEY
    )


async def _at_least(directory: Path, count: int) -> bool:
    return len(spooled(directory)) >= count


async def stream_events_after_restart(
    server: RedisServer, redis: aioredis.Redis, spooled_events: list[UsageEvent]
) -> list[UsageEvent]:
    """Restart `server` (same port and append-only file); the durable events: what Redis kept, then the spool."""
    await server.start()
    kept = await stream_events(redis)
    assert kept, "the events published before the outage survived the restart"
    durable = kept + [e for e in spooled_events if e.event_id not in {k.event_id for k in kept}]
    assert [e.seq for e in durable] == list(range(1, len(durable) + 1)), "the spool continues where Redis stopped"
    return durable


async def test_embedded_sigkill_is_closed_lost_by_the_next_sidecar(tmp_path: Path, speech_pcm16: bytes) -> None:
    """Embedded mode (no Redis) SIGKILLed mid-stream: once a sidecar runs again, the record closes `lost`."""
    database = tmp_path / "billing.db"
    engine = make_engine(f"sqlite:///{database}")
    async with FakeProvider() as provider:
        env = serve_env(tmp_path, provider, database_url=f"sqlite:///{database}", checkpoint_s="1", lost_after_s="1")
        first = SidecarProcess(env, workdir=tmp_path / "first")
        await first.start()
        try:
            client = AsyncOpenAI(base_url=f"{first.http}/v1", api_key=MASTER_KEY, max_retries=0)
            async with client.realtime.connect(model=MODEL, extra_query=TRANSCRIBE) as conn:
                await next_event(conn, "session.created")
                streaming = asyncio.create_task(PacedStreamer(conn, speech_pcm16).run())
                await poll(lambda: _billed_seq(engine, 3), what="three checkpoints in the billing DB")
                await first.kill()
                streaming.cancel()
                await asyncio.gather(streaming, return_exceptions=True)
        finally:
            await first.kill()
        second = SidecarProcess(env, workdir=tmp_path / "second")
        await second.start()
        try:
            # The horizon is 1 s: a sweep every few seconds closes it well within this bound.
            await poll(lambda: _closed(engine), what="the dead session closed as lost", every_s=0.2, deadline_s=15)
        finally:
            assert await second.terminate() == 0
    billed = read_billing(engine)
    engine.dispose()
    last = billed.events[-1]
    assert_billed_once(
        billed, billed.events, audio_bytes=last.audio_bytes, close_reason="lost", status="lost", key=MASTER_KEY
    )


async def _billed_seq(engine: Engine, seq: int) -> bool:
    billed = await asyncio.to_thread(read_billing, engine)
    return any(event.seq >= seq for event in billed.events)


async def _closed(engine: Engine) -> bool:
    billed = await asyncio.to_thread(read_billing, engine)
    return bool(billed.rows) and billed.rows[0].status != "open"


async def test_redis_restart_mid_session_loses_and_doubles_nothing(
    tmp_path: Path, speech_pcm16: bytes, redis_server: RedisServer, redis: aioredis.Redis, pg_url: str
) -> None:
    """Redis stopped mid-session and started again: spooled events publish, one record of 6.667125 s."""
    pieces = list(chunks(speech_pcm16))
    half = len(pieces) // 2
    with Spool(tmp_path / "spool-outage") as spool:
        tap = TappedPublisher(RedisPublisher(redis, stream=STREAM, spool=spool, retry_s=0.1, timeout_s=5))
        await tap.start()
        try:
            async with stack(tmp_path, publisher=tap, checkpoint_s=0.2) as s:
                async with s.sidecar.openai(USER_KEY).realtime.connect(model=MODEL, extra_query=TRANSCRIBE) as conn:
                    await next_event(conn, "session.created")
                    for piece in pieces[:half]:
                        await conn.input_audio_buffer.append(audio=piece)
                    await tap.submitted(2)
                    await tap.inner.drained()  # seq 1 and 2 are in Redis
                    await redis_server.shutdown()
                    during = len(tap.events)
                    for piece in pieces[half:]:
                        await conn.input_audio_buffer.append(audio=piece)
                    await conn.input_audio_buffer.commit()
                    await next_event(conn, "conversation.item.input_audio_transcription.completed")
                    await tap.submitted(during + 2)  # two checkpoints while Redis is down
                await tap.final()
                await tap.inner.settled()
            assert tap.spool_depth > 0 and tap.publish_failures > 0, "the outage was felt and spooled"
            await redis_server.start()  # same port, same append-only file
            await tap.inner.drained()
        finally:
            await tap.aclose()
    in_stream = await stream_events(redis)
    assert sorted(e.event_id for e in in_stream) == sorted(e.event_id for e in tap.events), "nothing lost in Redis"

    engine = make_engine(pg_url)
    upgrade(engine)
    await drain(UsageConsumer(redis, BillingWriter(engine), stream=STREAM, block_ms=0))
    billed = read_billing(engine)
    engine.dispose()
    assert_billed_once(billed, tap.events, audio_bytes=SPEECH_BYTES, close_reason="client_close", key=USER_KEY)


class SwitchableWrite:
    """The embedded billing write: into an unreachable PostgreSQL until `recover()`, then into the real one."""

    def __init__(self, down_url: str, up_url: str) -> None:
        self.writers = [BillingWriter(make_engine(down_url)), BillingWriter(make_engine(up_url))]
        self.current = 0

    def recover(self) -> None:
        self.current = 1

    def __call__(self, events: Sequence[UsageEvent]) -> int:
        return self.writers[self.current].write(events, now=datetime.now(UTC))


async def test_embedded_database_outage_spools_then_bills_once(
    tmp_path: Path, speech_pcm16: bytes, pg_url: str
) -> None:
    """Embedded mode with the billing DB down: every event spools, and all land once when it is back."""
    engine = make_engine(pg_url)
    upgrade(engine)
    down = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test"  # nothing listens there
    write = SwitchableWrite(down, pg_url)
    with Spool(tmp_path / "spool-db-down") as spool:
        tap = TappedPublisher(EmbeddedPublisher(write, spool=spool, retry_s=0.1))
        await tap.start()
        try:
            async with stack(tmp_path, publisher=tap, checkpoint_s=0.2) as s:
                async with s.sidecar.openai(USER_KEY).realtime.connect(model=MODEL, extra_query=TRANSCRIBE) as conn:
                    await stream_speech(conn, speech_pcm16)
                    await tap.submitted(3)
            await tap.final()
            await tap.inner.settled()
            assert tap.spool_depth == len(tap.events) and tap.publish_failures > 0, "all spooled, none written"
            assert read_billing(engine).rows == []
            write.recover()
            await tap.inner.drained()
        finally:
            await tap.aclose()
    billed = read_billing(engine)
    engine.dispose()
    assert_billed_once(billed, tap.events, audio_bytes=SPEECH_BYTES, close_reason="client_close", key=USER_KEY)
