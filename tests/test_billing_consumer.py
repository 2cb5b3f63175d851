"""UsageConsumer against real Redis and PostgreSQL: commit then ack, reclaim, dead letters, safe trimming."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sqlalchemy import Engine
from sqlmodel import Session, func, select

from sidecar.billing import (
    GROUP,
    BillingDatabaseError,
    BillingWriter,
    RealtimeUsage,
    RealtimeUsageEvent,
    UsageConsumer,
    make_engine,
    upgrade,
)
from sidecar.testing.factories import T0, usage_event
from sidecar.usage import UsageEvent

WAIT_S = 30  # a safety net for waits on events that must happen, never a synchronisation


class FakeClock:
    """A settable clock for the consumer."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class RecordingWriter(BillingWriter):
    """A real writer that remembers which events it was given and how many were new."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.seen: list[str] = []
        self.new: list[int] = []

    def write(self, events: Sequence[UsageEvent], *, now: datetime) -> int:
        new = super().write(events, now=now)
        self.seen.extend(e.event_id for e in events)
        self.new.append(new)
        return new


class CommitThenCrash(BillingWriter):
    """Commits, then dies before the consumer can acknowledge."""

    def write(self, events: Sequence[UsageEvent], *, now: datetime) -> int:
        super().write(events, now=now)
        raise RuntimeError("killed between commit and XACK")


class CommitThenBlock(BillingWriter):
    """Commits, signals it, then holds the worker thread until released (so the task can be cancelled)."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.committed = threading.Event()
        self.release = threading.Event()

    def write(self, events: Sequence[UsageEvent], *, now: datetime) -> int:
        new = super().write(events, now=now)
        self.committed.set()
        self.release.wait(WAIT_S)
        return new


class DownThenUp(BillingWriter):
    """The database is down for the first `failures` writes, then commits normally and signals it."""

    def __init__(self, engine: Engine, *, failures: int) -> None:
        super().__init__(engine)
        self.failures = failures
        self.stored = threading.Event()

    def write(self, events: Sequence[UsageEvent], *, now: datetime) -> int:
        if self.failures:
            self.failures -= 1
            raise BillingDatabaseError("database down")
        new = super().write(events, now=now)
        self.stored.set()
        return new


@pytest.fixture
def engine(pg_url: str) -> Iterator[Engine]:
    """An upgraded PostgreSQL billing DB."""
    engine = make_engine(pg_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def consumer_for(redis: aioredis.Redis, writer: BillingWriter, stream: str, **options: object) -> UsageConsumer:
    """A consumer that does not block on an empty stream (tests loop until it reports 0)."""
    settings: dict[str, object] = {"stream": stream, "block_ms": 0, **options}
    return UsageConsumer(redis, writer, **settings)  # type: ignore[arg-type]


async def publish(redis: aioredis.Redis, stream: str, events: Sequence[UsageEvent]) -> list[str]:
    """XADD the events as the relay does; return the entry ids."""
    async with redis.pipeline(transaction=False) as pipe:
        for event in events:
            pipe.xadd(stream, event.to_fields())  # type: ignore[arg-type]
        ids = await pipe.execute()
    return [i.decode() for i in ids]


async def drain(*consumers: UsageConsumer) -> int:
    """Run the consumers side by side until none of them finds anything; return entries handled."""
    total = 0
    while handled := sum(await asyncio.gather(*(c.run_once() for c in consumers))):
        total += handled
    return total


async def pending(redis: aioredis.Redis, stream: str, group: str = GROUP) -> int:
    return int((await redis.xpending(stream, group))["pending"])


async def entry_ids(redis: aioredis.Redis, stream: str) -> list[str]:
    return [entry_id.decode() for entry_id, _ in await redis.xrange(stream)]


def event_count(engine: Engine) -> int:
    with Session(engine) as session:
        return session.exec(select(func.count()).select_from(RealtimeUsageEvent)).one()


def usage_rows(engine: Engine) -> dict[str, RealtimeUsage]:
    with Session(engine) as session:
        return {row.session_id: row for row in session.exec(select(RealtimeUsage))}


async def test_published_events_land_in_db_and_nothing_stays_pending(
    redis_client: aioredis.Redis, usage_stream: str, engine: Engine
) -> None:
    """Events XADDed to the stream are stored, the session row is final, and every entry is acked."""
    consumer = consumer_for(redis_client, BillingWriter(engine), usage_stream)
    await consumer.ensure_group()
    await publish(redis_client, usage_stream, [usage_event("s1", 1), usage_event("s1", 2, final=True)])
    assert await drain(consumer) == 2
    assert event_count(engine) == 2
    row = usage_rows(engine)["s1"]
    assert (row.status, row.last_seq, row.quantity) == ("final", 2, Decimal(10))
    assert await pending(redis_client, usage_stream) == 0


async def test_ensure_group_is_idempotent(redis_client: aioredis.Redis, usage_stream: str, engine: Engine) -> None:
    """Creating the group twice keeps one group, reading from the stream's start."""
    consumer = consumer_for(redis_client, BillingWriter(engine), usage_stream)
    await consumer.ensure_group()
    await consumer.ensure_group()
    groups = await redis_client.xinfo_groups(usage_stream)
    assert [(g["name"], g["last-delivered-id"]) for g in groups] == [(GROUP.encode(), b"0-0")]


async def test_poison_messages_are_dead_lettered_with_reason_and_acked(
    redis_client: aioredis.Redis, usage_stream: str, engine: Engine
) -> None:
    """Unparsable or unstorable entries go to `<stream>:dead` with reason and original id; the rest land."""
    consumer = consumer_for(redis_client, BillingWriter(engine), usage_stream)
    await consumer.ensure_group()
    good = usage_event("s1", 1)
    poison: list[dict[str, str | bytes]] = [
        {"foo": "bar"},
        {**good.to_fields(), "schema": "realtime.usage.v0"},
        {**good.to_fields(), "seq": "three"},
        {**good.to_fields(), "cost_usd": "1E12"},
        {**good.to_fields(), "key_alias": b"\xff\xfe"},
    ]
    poison_ids = [(await redis_client.xadd(usage_stream, fields)).decode() for fields in poison]  # type: ignore[arg-type]
    await publish(redis_client, usage_stream, [good])
    assert await drain(consumer) == 6
    letters = await redis_client.xrange(f"{usage_stream}:dead")
    assert [fields[b"original_id"].decode() for _, fields in letters] == poison_ids
    reasons = [fields[b"reason"].decode() for _, fields in letters]
    assert [r.split(":")[0] for r in reasons] == ["schema", "schema", "seq", "cost_usd", "entry"]
    assert letters[0][1][b"foo"] == b"bar"
    assert letters[4][1][b"key_alias"] == b"\xff\xfe"
    assert await pending(redis_client, usage_stream) == 0
    assert event_count(engine) == 1


@pytest.mark.parametrize("death", ["crash", "cancel"])
async def test_consumer_killed_between_commit_and_ack_is_reclaimed_without_double_count(
    redis_client: aioredis.Redis, usage_stream: str, engine: Engine, death: str
) -> None:
    """A consumer dying after the commit leaves its entries pending; another reclaims them, no double count."""
    await publish(redis_client, usage_stream, [usage_event("s1", seq) for seq in (1, 2, 3)])
    if death == "crash":
        doomed = consumer_for(redis_client, CommitThenCrash(engine), usage_stream, consumer="doomed")
        await doomed.ensure_group()
        with pytest.raises(RuntimeError, match="killed"):
            await doomed.run_once()
    else:
        blocking = CommitThenBlock(engine)
        doomed = consumer_for(redis_client, blocking, usage_stream, consumer="doomed")
        await doomed.ensure_group()
        task = asyncio.create_task(doomed.run_once())
        assert await asyncio.to_thread(blocking.committed.wait, WAIT_S)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        blocking.release.set()
    assert (await pending(redis_client, usage_stream), event_count(engine)) == (3, 3)
    before = usage_rows(engine)["s1"]

    writer = RecordingWriter(engine)
    rescuer = consumer_for(redis_client, writer, usage_stream, consumer="rescuer", claim_idle_ms=0)
    assert await rescuer.run_once() == 3
    assert writer.new == [0]
    assert await pending(redis_client, usage_stream) == 0
    assert event_count(engine) == 3
    after = usage_rows(engine)["s1"]
    assert (after.last_seq, after.quantity, after.last_event_at) == (3, Decimal(15), before.last_event_at)


async def test_two_consumers_split_the_stream_without_duplicates(
    redis_client: aioredis.Redis, usage_stream: str, engine: Engine
) -> None:
    """Two consumers in one group each take a share; every event is written once, all rows complete."""
    events = [usage_event(f"s{i % 20}", i // 20 + 1) for i in range(200)]
    await publish(redis_client, usage_stream, events)
    first, second = RecordingWriter(engine), RecordingWriter(engine)
    one = consumer_for(redis_client, first, usage_stream, consumer="one", batch=25)
    two = consumer_for(redis_client, second, usage_stream, consumer="two", batch=25)
    await one.ensure_group()
    assert await drain(one, two) == 200
    assert first.seen and second.seen
    assert set(first.seen).isdisjoint(second.seen)
    assert sorted(first.seen + second.seen) == sorted(e.event_id for e in events)
    assert event_count(engine) == 200
    rows = usage_rows(engine)
    assert len(rows) == 20
    assert {row.last_seq for row in rows.values()} == {10}
    assert await pending(redis_client, usage_stream) == 0


async def test_trim_removes_acked_entries_and_never_an_unacked_one(
    redis_client: aioredis.Redis, usage_stream: str, engine: Engine
) -> None:
    """Acked entries are trimmed; an entry left pending, and everything after it, stays until acked."""
    ids = await publish(redis_client, usage_stream, [usage_event("s1", seq) for seq in range(1, 11)])
    acker = consumer_for(redis_client, BillingWriter(engine), usage_stream, consumer="acker", batch=3)
    await acker.ensure_group()
    assert await acker.run_once() == 3
    assert await entry_ids(redis_client, usage_stream) == ids[3:]

    doomed = consumer_for(redis_client, CommitThenCrash(engine), usage_stream, consumer="doomed", batch=1)
    with pytest.raises(RuntimeError):
        await doomed.run_once()
    assert await drain(acker) == 6
    assert await acker.trim() == 0
    assert await entry_ids(redis_client, usage_stream) == ids[3:]
    assert await pending(redis_client, usage_stream) == 1

    rescuer = consumer_for(redis_client, BillingWriter(engine), usage_stream, consumer="rescuer", claim_idle_ms=0)
    assert await rescuer.run_once() == 1
    assert await redis_client.xlen(usage_stream) == 0
    assert usage_rows(engine)["s1"].last_seq == 10


async def test_trim_keeps_entries_another_group_has_not_read(
    redis_client: aioredis.Redis, usage_stream: str, engine: Engine
) -> None:
    """Another group on the stream keeps what it has not read or not acked, whatever billing has done."""
    ids = await publish(redis_client, usage_stream, [usage_event("s1", seq) for seq in range(1, 6)])
    consumer = consumer_for(redis_client, BillingWriter(engine), usage_stream)
    await consumer.ensure_group()
    await redis_client.xgroup_create(usage_stream, "audit", id="0")
    assert await drain(consumer) == 5
    assert await entry_ids(redis_client, usage_stream) == ids

    read = await redis_client.xreadgroup("audit", "auditor", {usage_stream: ">"}, count=3)
    await redis_client.xack(usage_stream, "audit", ids[0], ids[1])  # ids[2] stays pending in audit
    assert [entry_id.decode() for entry_id, _ in read[0][1]] == ids[:3]
    assert await consumer.trim() == 2
    assert await entry_ids(redis_client, usage_stream) == ids[2:]


async def test_trim_runs_at_most_every_trim_every_s_while_entries_keep_coming(
    redis_client: aioredis.Redis, usage_stream: str, engine: Engine
) -> None:
    """Batch after batch within `trim_every_s` trims only the first time; caught up (nothing waiting), it trims
    at once; a trim still never passes an entry left pending."""
    ids = await publish(redis_client, usage_stream, [usage_event("s1", seq) for seq in range(1, 11)])
    consumer = consumer_for(redis_client, BillingWriter(engine), usage_stream, batch=2, trim_every_s=3600)
    await consumer.ensure_group()
    assert await consumer.run_once() == 2
    assert await entry_ids(redis_client, usage_stream) == ids[2:]  # the first batch trims
    for _ in range(3):
        assert await consumer.run_once() == 2
    assert await entry_ids(redis_client, usage_stream) == ids[2:]  # not due again: acked entries stay

    doomed = consumer_for(redis_client, CommitThenCrash(engine), usage_stream, consumer="doomed", batch=1)
    with pytest.raises(RuntimeError):
        await doomed.run_once()  # ids[8] left pending
    assert await consumer.run_once() == 1
    assert await consumer.run_once() == 0  # caught up: trims at once, below the pending entry
    assert await entry_ids(redis_client, usage_stream) == ids[8:]
    assert await pending(redis_client, usage_stream) == 1


async def test_sweep_lost_marks_stale_session_lost(
    redis_client: aioredis.Redis, usage_stream: str, engine: Engine
) -> None:
    """A session silent beyond lost_after_s is closed lost at its last checkpoint; finals are kept."""
    clock = FakeClock(T0)
    consumer = consumer_for(redis_client, BillingWriter(engine), usage_stream, clock=clock, lost_after_s=60)
    await consumer.ensure_group()
    await publish(redis_client, usage_stream, [usage_event("live", 1), usage_event("done", 1, final=True)])
    await drain(consumer)
    clock.now = T0 + timedelta(seconds=30)
    assert await consumer.sweep_lost() == 0
    clock.now = T0 + timedelta(seconds=61)
    assert await consumer.sweep_lost() == 1
    rows = usage_rows(engine)
    assert (rows["live"].status, rows["live"].close_reason, rows["live"].ended_at) == ("lost", "lost", T0)
    assert rows["done"].status == "final"


async def test_run_survives_a_database_outage_and_acks_only_after_commit(
    redis_client: aioredis.Redis, usage_stream: str, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """`run` logs a DB failure, keeps the entries pending, retries, and stores them once the DB is back."""
    writer = DownThenUp(engine, failures=2)
    consumer = consumer_for(redis_client, writer, usage_stream, block_ms=50, backoff_s=0.01, claim_idle_ms=0)
    await publish(redis_client, usage_stream, [usage_event("s1", 1), usage_event("s1", 2)])
    stop = asyncio.Event()
    with caplog.at_level(logging.WARNING, logger="sidecar.billing"):
        task = asyncio.create_task(consumer.run(stop))
        assert await asyncio.to_thread(writer.stored.wait, WAIT_S)
        stop.set()
        await task
    assert "database down" in caplog.text
    assert event_count(engine) == 2
    assert await pending(redis_client, usage_stream) == 0


async def test_run_survives_redis_being_unreachable_and_stops(engine: Engine, usage_stream: str) -> None:
    """With Redis unreachable, `run` keeps retrying with back-off and still returns when stopped."""
    stop = asyncio.Event()

    class Counting(UsageConsumer):
        attempts = 0

        async def ensure_group(self) -> None:
            self.attempts += 1
            if self.attempts == 3:
                stop.set()
            await super().ensure_group()

    unreachable = aioredis.Redis(host="127.0.0.1", port=1, retry=Retry(NoBackoff(), 0))  # fail at once
    consumer = Counting(unreachable, BillingWriter(engine), stream=usage_stream, backoff_s=0.01)
    await consumer.run(stop)
    assert consumer.attempts == 3
    await unreachable.aclose()


async def test_throughput_5000_events_into_postgresql(
    redis_client: aioredis.Redis, usage_stream: str, engine: Engine
) -> None:
    """5,000 events (500 sessions x 10 checkpoints) go through run_once into PostgreSQL; rate printed."""
    events = [usage_event(f"s{i % 500}", i // 500 + 1) for i in range(5000)]
    await publish(redis_client, usage_stream, events)
    consumer = consumer_for(redis_client, BillingWriter(engine), usage_stream, batch=500)
    await consumer.ensure_group()
    started = time.perf_counter()
    handled = await drain(consumer)
    elapsed = time.perf_counter() - started
    print(f"\nbilling consumer: {handled} events in {elapsed:.2f}s = {handled / elapsed:,.0f} events/s")
    assert handled == 5000
    assert event_count(engine) == 5000
    rows = usage_rows(engine)
    assert len(rows) == 500
    assert {row.last_seq for row in rows.values()} == {10}
    assert await pending(redis_client, usage_stream) == 0
    assert await redis_client.xlen(usage_stream) == 0
