"""One unstorable usage event never holds back the others: it is dead-lettered, everything else is billed."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from sqlalchemy import Engine
from sqlmodel import Session, select

from sidecar.app import _default_publisher
from sidecar.billing import (
    BillingDatabaseError,
    BillingDataError,
    BillingWriter,
    RealtimeUsageDead,
    UsageConsumer,
    make_engine,
    upgrade,
)
from sidecar.config import Settings
from sidecar.publisher import EmbeddedPublisher, RedisPublisher, SpoolingPublisher
from sidecar.spool import Spool
from sidecar.testing.factories import T0, usage_event
from sidecar.usage import UsageEvent
from tests.billing_support import DEADLINE_S, drain, read_billing

NUL_ALIAS = "alice\x00key"


@pytest.fixture
def engine(database_url: str) -> Engine:
    """A fresh billing DB (SQLite and PostgreSQL) with its tables."""
    engine = make_engine(database_url)
    upgrade(engine)
    return engine


def dead_letters(engine: Engine) -> list[RealtimeUsageDead]:
    """Every row of realtime_usage_dead."""
    with Session(engine) as db:
        return list(db.exec(select(RealtimeUsageDead)).all())


def billed_sessions(engine: Engine) -> set[str]:
    """The session ids that have a billing record."""
    return {row.session_id for row in read_billing(engine).rows}


def test_unstorable_event_is_dead_lettered_and_the_rest_of_the_batch_billed(engine: Engine) -> None:
    """A NUL in one event's key alias: that event goes to realtime_usage_dead with its reason, the others land."""
    writer = BillingWriter(engine)
    good = [usage_event(f"s{i}", 1) for i in range(3)]
    bad = usage_event("s-bad", 1, key_alias=NUL_ALIAS)
    assert writer.write_or_dead_letter([good[0], bad, *good[1:]], now=T0) == 3
    assert billed_sessions(engine) == {"s0", "s1", "s2"}
    (letter,) = dead_letters(engine)
    assert (letter.event_id, letter.session_id, letter.dead_at) == (bad.event_id, "s-bad", T0)
    assert letter.reason == "key_alias: contains a NUL character"
    assert UsageEvent.from_fields(json.loads(letter.fields)) == bad  # the whole event, NUL included


def test_dead_lettering_is_idempotent_and_logged_once(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    """Replaying a batch (after a DB outage) stores nothing twice and logs the dead letter once."""
    writer = BillingWriter(engine)
    batch = [usage_event("s1", 1), usage_event("s-bad", 1, user_id="bob\x00")]
    with caplog.at_level(logging.WARNING, logger="sidecar.billing"):
        assert writer.write_or_dead_letter(batch, now=T0) == 1
        assert writer.write_or_dead_letter(batch, now=T0) == 0
    assert len(dead_letters(engine)) == 1
    assert len(read_billing(engine).events) == 1
    lines = [r for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "user_id: contains a NUL character" in lines[0].getMessage()


def test_lone_surrogate_is_dead_lettered_not_sent_to_the_database(engine: Engine) -> None:
    """Text no UTF-8 database holds (a lone surrogate from LiteLLM's JSON) is refused by name and dead-lettered."""
    writer = BillingWriter(engine)
    bad = usage_event("s-bad", 1, team_id="team-\ud800")
    assert writer.write_or_dead_letter([bad, usage_event("s1", 1)], now=T0) == 1
    (letter,) = dead_letters(engine)
    assert letter.reason == "team_id: not valid Unicode (a lone surrogate)"
    assert UsageEvent.from_fields(json.loads(letter.fields)) == bad
    assert billed_sessions(engine) == {"s1"}


class RefusesOne(BillingWriter):
    """A real writer whose database refuses one event that passes check_storable (as a constraint would)."""

    def __init__(self, engine: Engine, refused: str) -> None:
        super().__init__(engine)
        self.refused = refused

    def write(self, events: Sequence[UsageEvent], *, now: datetime) -> int:
        if any(e.event_id == self.refused for e in events):
            raise BillingDataError("billing write: the database refused a value: CheckViolation")
        return super().write(events, now=now)


def test_a_value_the_database_refuses_is_found_event_by_event(engine: Engine) -> None:
    """The DB refuses a batch for one event the checks let through: it alone is dead-lettered, the rest land."""
    events = [usage_event(f"s{i}", 1) for i in range(5)]
    writer = RefusesOne(engine, refused=events[2].event_id)
    assert writer.write_or_dead_letter(events, now=T0) == 4
    assert billed_sessions(engine) == {"s0", "s1", "s3", "s4"}
    (letter,) = dead_letters(engine)
    assert (letter.session_id, letter.reason) == ("s2", "billing write: the database refused a value: CheckViolation")


async def test_embedded_mode_bills_every_other_event_after_a_poison_one(database_url: str, tmp_path: Path) -> None:
    """The embedded publisher `sidecar serve` builds: a NUL event first, 100 good ones behind it, all 100 billed."""
    settings = Settings(litellm_config=tmp_path / "unused.yaml", database_url=database_url, spool_dir=tmp_path / "s")
    async with _default_publisher(settings, None) as publisher:
        assert isinstance(publisher, SpoolingPublisher)
        publisher.submit(usage_event("s-bad", 1, key_alias=NUL_ALIAS))
        for i in range(100):
            publisher.submit(usage_event(f"s{i}", 1))
        async with asyncio.timeout(DEADLINE_S):
            await publisher.drained()
        assert publisher.spool_depth == 0
    engine = make_engine(database_url)
    assert billed_sessions(engine) == {f"s{i}" for i in range(100)}
    assert [letter.session_id for letter in dead_letters(engine)] == ["s-bad"]
    engine.dispose()


class DownThenUp(BillingWriter):
    """A real writer whose first `failures` writes fail as if the DB were unreachable."""

    def __init__(self, engine: Engine, *, failures: int) -> None:
        super().__init__(engine)
        self.failures = failures

    def write(self, events: Sequence[UsageEvent], *, now: datetime) -> int:
        if self.failures:
            self.failures -= 1
            raise BillingDatabaseError("billing write: database failure: connection refused")
        return super().write(events, now=now)


async def test_database_down_still_spools_and_replays_without_dead_letters(engine: Engine, tmp_path: Path) -> None:
    """A DB failure is not a data error: the batch spools, is replayed once the DB answers, nothing is dead."""
    writer = DownThenUp(engine, failures=2)
    with Spool(tmp_path / "spool") as spool:
        publisher = EmbeddedPublisher(
            lambda events: writer.write_or_dead_letter(events, now=datetime.now(UTC)), spool=spool, retry_s=0.01
        )
        await publisher.start()
        for i in range(10):
            publisher.submit(usage_event(f"s{i}", 1))
        async with asyncio.timeout(DEADLINE_S):
            await publisher.drained()
        await publisher.aclose()
    assert publisher.publish_failures == 2
    assert billed_sessions(engine) == {f"s{i}" for i in range(10)}
    assert dead_letters(engine) == []


@pytest.mark.parametrize("field", ["key_alias", "user_id", "team_id"])
async def test_redis_mode_dead_letters_nul_in_litellm_metadata(
    field: str, pg_url: str, redis_client: aioredis.Redis, usage_stream: str, tmp_path: Path
) -> None:
    """Redis mode: a NUL in a key's alias, user or team reaches `<stream>:dead` with its reason; the rest land."""
    engine = make_engine(pg_url)
    upgrade(engine)
    events = [usage_event("s-bad", 1, **{field: "x\x00y"}), usage_event("s1", 1), usage_event("s2", 1)]
    await publish_all(redis_client, usage_stream, events, tmp_path)
    consumer = UsageConsumer(redis_client, BillingWriter(engine), stream=usage_stream, block_ms=0)
    assert await drain(consumer) == 3
    letters = await redis_client.xrange(f"{usage_stream}:dead")
    assert [fields[b"reason"].decode() for _, fields in letters] == [f"{field}: contains a NUL character"]
    assert billed_sessions(engine) == {"s1", "s2"}
    engine.dispose()


async def test_redis_publisher_passes_a_lone_surrogate_on_to_the_dead_letter_stream(
    pg_url: str, redis_client: aioredis.Redis, usage_stream: str, tmp_path: Path
) -> None:
    """Redis mode: an event redis-py cannot encode does not jam the publisher; the consumer dead-letters it."""
    engine = make_engine(pg_url)
    upgrade(engine)
    events = [usage_event("s-bad", 1, key_alias="\udcff"), usage_event("s1", 1)]
    await publish_all(redis_client, usage_stream, events, tmp_path)
    consumer = UsageConsumer(redis_client, BillingWriter(engine), stream=usage_stream, block_ms=0)
    assert await drain(consumer) == 2
    letters = await redis_client.xrange(f"{usage_stream}:dead")
    assert [fields[b"reason"].decode() for _, fields in letters] == ["entry: a field is not UTF-8 text"]
    assert billed_sessions(engine) == {"s1"}
    engine.dispose()


async def publish_all(redis: aioredis.Redis, stream: str, events: Sequence[UsageEvent], tmp_path: Path) -> None:
    """Publish `events` through a real RedisPublisher and wait until every one is in the stream."""
    with Spool(tmp_path / "spool-redis") as spool:
        publisher = RedisPublisher(redis, stream=stream, spool=spool, retry_s=0.01)
        await publisher.start()
        for event in events:
            publisher.submit(event)
        async with asyncio.timeout(DEADLINE_S):
            await publisher.drained()
        await publisher.aclose()


def test_spool_keeps_an_event_with_a_lone_surrogate(tmp_path: Path) -> None:
    """An event orjson cannot encode is spooled durably (not held in memory) and read back unchanged."""
    events = [usage_event("s-bad", 1, key_alias="\ud800"), usage_event("s1", 1)]
    with Spool(tmp_path / "spool") as spool:
        spool.append(events)
        assert spool.pending() == events
        spool.drop_first(1)
        assert spool.pending() == events[1:]
