"""The billing consumer's throughput: N usage events from a fresh stream into a fresh PostgreSQL database.

    python -m bench.consumer_bench [--events 20000] [--per-session 5] [--batch 500]

The events are those a real sidecar publishes: sessions of `per-session` events (checkpoints with seq
1, 2, ... then a final), every value a string via `UsageEvent.to_fields`. They are XADDed (pipelined,
not timed) into a stream of a fresh name; then `UsageConsumer.run_once` is called, as `run` does, until
every entry is handled. The time is from the first call to the last one's return; only then is the
database checked (every event stored once, one row per session), and dropped with the stream.

Prints one JSON line: events, sessions, seconds, events_per_s, batch, verified.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any, Final

import psycopg
import redis.asyncio as aioredis
from sqlalchemy import text

from sidecar.billing.consumer import UsageConsumer
from sidecar.billing.writer import BillingWriter, make_engine, upgrade
from sidecar.testing.factories import usage_event
from sidecar.usage import UsageEvent

PG_ADMIN_DSN: Final = "postgresql://postgres@127.0.0.1:5432/test"
DEADLINE_S: Final = 300.0
XADD_PIPELINE: Final = 1000


def usage_events(count: int, *, per_session: int, started: datetime) -> list[UsageEvent]:
    """`count` events: sessions of `per_session` (checkpoints, then a final), cumulative figures."""
    events: list[UsageEvent] = []
    session = ""
    for index in range(count):
        seq = index % per_session + 1
        if seq == 1:
            session = "rs_" + uuid.uuid4().hex
        final = seq == per_session or index == count - 1
        events.append(usage_event(session, seq, final=final, started_at=started))
    return events


async def _publish(redis: aioredis.Redis, stream: str, events: list[UsageEvent]) -> None:
    for start in range(0, len(events), XADD_PIPELINE):
        async with redis.pipeline(transaction=False) as pipe:
            for event in events[start : start + XADD_PIPELINE]:
                pipe.xadd(stream, event.to_fields())  # type: ignore[arg-type]
            await pipe.execute()


async def _drain(consumer: UsageConsumer, expected: int) -> tuple[int, float]:
    """Call run_once until `expected` entries are handled (or the deadline); (handled, seconds)."""
    handled = 0
    started = time.perf_counter()
    deadline = started + DEADLINE_S
    while handled < expected and time.perf_counter() < deadline:
        handled += await consumer.run_once()
    return handled, time.perf_counter() - started


def _count(url: str) -> tuple[int, int]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            events = conn.execute(text("SELECT count(*) FROM realtime_usage_event")).scalar_one()
            sessions = conn.execute(text("SELECT count(*) FROM realtime_usage")).scalar_one()
        return int(events), int(sessions)
    finally:
        engine.dispose()


async def measure(*, events: int, per_session: int, batch: int, redis_url: str, admin_dsn: str) -> dict[str, Any]:
    """Run the benchmark on a fresh stream and database; both are removed afterwards."""
    token = uuid.uuid4().hex[:12]
    stream = f"bench:{token}:realtime:usage"
    database = f"sidecar_bench_{token}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    url = admin_dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{database}"
    redis = aioredis.Redis.from_url(redis_url)
    engine = make_engine(url)
    try:
        upgrade(engine)
        batch_events = usage_events(events, per_session=per_session, started=datetime.now(UTC))
        await _publish(redis, stream, batch_events)
        consumer = UsageConsumer(redis, BillingWriter(engine), stream=stream, batch=batch, block_ms=0)
        await consumer.ensure_group()
        handled, seconds = await _drain(consumer, events)
        stored, sessions = _count(url)
    finally:
        engine.dispose()
        await redis.delete(stream, f"{stream}:dead")
        await redis.aclose()
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    expected_sessions = -(-events // per_session)
    return {
        "events": events,
        "sessions": expected_sessions,
        "per_session": per_session,
        "batch": batch,
        "handled": handled,
        "seconds": round(seconds, 3),
        "events_per_s": round(handled / seconds) if seconds > 0 else None,
        "verified": stored == events and sessions == expected_sessions,
        "stored_events": stored,
        "stored_sessions": sessions,
    }


def main(argv: list[str] | None = None) -> None:
    """Run the consumer benchmark and print its JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench.consumer_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--per-session", type=int, default=5, help="events per session (the last is the final)")
    parser.add_argument("--batch", type=int, default=500, help="entries per XREADGROUP (the consumer's default)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--pg-dsn", default=PG_ADMIN_DSN, help="an admin DSN; a fresh database is made beside it")
    args = parser.parse_args(argv)
    result = asyncio.run(
        measure(
            events=args.events,
            per_session=args.per_session,
            batch=args.batch,
            redis_url=args.redis_url,
            admin_dsn=args.pg_dsn,
        )
    )
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
