"""The `litellm` consumer group against real Redis and LiteLLM's real schema: exactly once into LiteLLM's ledger.

UsageConsumer + LedgerSink in-process (tests/test_ledger_cli.py runs `sidecar consume` as a real process)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis
from psycopg.conninfo import conninfo_to_dict

from sidecar.billing import BillingDatabaseError, UsageConsumer
from sidecar.billing.consumer import LITELLM_GROUP
from sidecar.billing.metrics import ConsumeMetrics
from sidecar.ledger.sink import LedgerSchemaError, LedgerSink, connect_params
from sidecar.ledger.writer import Outcome
from sidecar.testing.factories import usage_event
from sidecar.usage import UsageEvent
from tests.billing_support import DEADLINE_S, drain, poll
from tests.litellm_schema import Principal, seed_principal
from tests.test_consumer_stall import FreezableProxy, Warnings, watching

TIMEOUT_S = 0.5
"""A tiny SIDECAR_DB_TIMEOUT_S for the outage tests: awaited, never measured."""
ENTITY_SPEND = {
    "key": 'SELECT spend FROM "LiteLLM_VerificationToken" WHERE token = %s',
    "team": 'SELECT spend FROM "LiteLLM_TeamTable" WHERE team_id = %s',
    "user": 'SELECT spend FROM "LiteLLM_UserTable" WHERE user_id = %s',
    "org": 'SELECT spend FROM "LiteLLM_OrganizationTable" WHERE organization_id = %s',
    "team_member": 'SELECT spend FROM "LiteLLM_TeamMembership" WHERE user_id = %s AND team_id = %s',
    "org_member": 'SELECT spend FROM "LiteLLM_OrganizationMembership" WHERE user_id = %s AND organization_id = %s',
}


# ---- helpers ------------------------------------------------------------------------------------------


def principal_of(dsn: str, n: int = 1) -> Principal:
    """The n-th seeded key with its own user, team and organization."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return seed_principal(
            conn, key=f"sk-ledger-{n}", key_alias=f"key-{n}", user_id=f"user-{n}", team_id=f"team-{n}",
            organization_id=f"org-{n}",
        )  # fmt: skip


def session_events(p: Principal, session_id: str, seqs: int = 3) -> list[UsageEvent]:
    """Checkpoints 1..seqs-1 and the final, cumulative, charged to `p`."""
    return [
        usage_event(
            session_id,
            seq,
            final=seq == seqs,
            key_hash=p.key_hash,
            key_alias=p.key_alias,
            user_id=p.user_id,
            team_id=p.team_id,
            input_tokens=100 * seq,
            output_tokens=40 * seq,
        )
        for seq in range(1, seqs + 1)
    ]


def spend_of(dsn: str, p: Principal) -> dict[str, float]:
    """The SpendLogs sum of `p`'s key and the spend of each of its rows."""
    args = {
        "key": (p.key_hash,),
        "team": (p.team_id,),
        "user": (p.user_id,),
        "org": (p.organization_id,),
        "team_member": (p.user_id, p.team_id),
        "org_member": (p.user_id, p.organization_id),
    }
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute('SELECT sum(spend) FROM "LiteLLM_SpendLogs" WHERE api_key = %s', (p.key_hash,)).fetchone()
        found = {"logs": float(row[0] or 0) if row else 0.0}
        for name, query in ENTITY_SPEND.items():
            value = conn.execute(query, args[name]).fetchone()
            found[name] = float(value[0] or 0) if value else math.nan
    return found


def spend_log_ids(dsn: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [str(r[0]) for r in conn.execute('SELECT request_id FROM "LiteLLM_SpendLogs" ORDER BY 1').fetchall()]


def assert_charged_once(dsn: str, p: Principal, finals: Sequence[UsageEvent]) -> None:
    """SpendLogs and every row of `p` rose by exactly the sessions' final cost (to float precision)."""
    expected = float(sum((e.cost_usd for e in finals), Decimal(0)))
    for name, value in spend_of(dsn, p).items():
        assert math.isclose(value, expected, rel_tol=1e-9), f"{name}: {value} != {expected}"


async def publish(redis: aioredis.Redis, stream: str, events: Sequence[UsageEvent]) -> list[str]:
    """XADD the events as the relay does; return the entry ids."""
    ids = [await redis.xadd(stream, e.to_fields()) for e in events]  # type: ignore[arg-type]
    return [i.decode() for i in ids]


async def pending(redis: aioredis.Redis, stream: str) -> int:
    return int((await redis.xpending(stream, LITELLM_GROUP))["pending"])


def consumer_for(redis: aioredis.Redis, sink: Any, stream: str, **options: Any) -> UsageConsumer:
    """A litellm-group consumer that does not block on an empty stream."""
    return UsageConsumer(redis, sink, stream=stream, group=LITELLM_GROUP, **{"block_ms": 0, **options})


@pytest.fixture
def sink(litellm_db: str) -> Iterator[LedgerSink]:
    """A LedgerSink on the test's copy of LiteLLM's schema."""
    s = LedgerSink(litellm_db)
    yield s
    s.close()


@contextlib.asynccontextmanager
async def proxied(dsn: str) -> AsyncIterator[tuple[FreezableProxy, str]]:
    """A FreezableProxy in front of the test's PostgreSQL, and `dsn` through it."""
    params = conninfo_to_dict(dsn)
    proxy = FreezableProxy((str(params.get("host", "127.0.0.1")), int(params.get("port", 5432))))
    await proxy.start()
    try:
        yield proxy, f"postgresql://{params.get('user', 'postgres')}@127.0.0.1:{proxy.port}/{params['dbname']}"
    finally:
        await proxy.stop()


# ---- the sink through the consumer ---------------------------------------------------------------------


async def test_events_through_the_stream_land_once_in_litellms_ledger(
    redis_client: aioredis.Redis, usage_stream: str, litellm_db: str, sink: LedgerSink
) -> None:
    """Checkpoints and finals of two sessions: SpendLogs sum and every spend row equal the final costs; all acked."""
    p = principal_of(litellm_db)
    first, second = session_events(p, "rs_a"), session_events(p, "rs_b", seqs=2)
    consumer = consumer_for(redis_client, sink, usage_stream)
    await consumer.ensure_group()
    await publish(redis_client, usage_stream, first + second)
    assert await drain(consumer) == 5
    assert_charged_once(litellm_db, p, [first[-1], second[-1]])
    assert spend_log_ids(litellm_db) == ["rs_a:1", "rs_a:2", "rs_a:3", "rs_b:1", "rs_b:2"]
    assert await pending(redis_client, usage_stream) == 0
    assert await redis_client.xlen(f"{usage_stream}:dead") == 0


async def test_repeats_and_out_of_order_delivery_change_nothing(
    redis_client: aioredis.Redis, usage_stream: str, litellm_db: str, sink: LedgerSink
) -> None:
    """A later checkpoint before an earlier one, and every event delivered twice: the final totals, once."""
    p = principal_of(litellm_db)
    e1, e2, e3 = session_events(p, "rs_o")
    consumer = consumer_for(redis_client, sink, usage_stream, batch=2)
    await consumer.ensure_group()
    await publish(redis_client, usage_stream, [e2, e1, e2, e3, e1, e3])
    assert await drain(consumer) == 6
    assert_charged_once(litellm_db, p, [e3])
    assert spend_log_ids(litellm_db) == ["rs_o:2", "rs_o:3"]  # seq 1 came late: seq 2 already covered it
    await publish(redis_client, usage_stream, [e3, e2, e1])
    assert await drain(consumer) == 3
    assert_charged_once(litellm_db, p, [e3])
    assert await pending(redis_client, usage_stream) == 0


class BarrierSink(LedgerSink):
    """A real sink whose first write waits until another sink's write starts too (same entries, same moment)."""

    def __init__(self, dsn: str, barrier: threading.Barrier) -> None:
        super().__init__(dsn)
        self.barrier = barrier
        self.outcomes: list[Outcome] = []

    def write(self, events: Sequence[UsageEvent], *, now: datetime) -> list[Outcome]:
        if not self.barrier.broken:
            self.barrier.wait(DEADLINE_S)
        outcomes = super().write(events, now=now)
        self.outcomes += outcomes
        return outcomes


async def test_two_consumers_writing_the_same_entries_at_once_charge_once(
    redis_client: aioredis.Redis, usage_stream: str, litellm_db: str
) -> None:
    """One consumer reads every entry, another takes them over (XAUTOCLAIM) and both write them concurrently."""
    principals = [principal_of(litellm_db, n) for n in (1, 2)]
    sessions = {p.key_hash: [session_events(p, f"rs_{p.user_id}_{i}", seqs=4) for i in range(5)] for p in principals}
    events = [e for per_key in sessions.values() for session in per_key for e in session]
    await publish(redis_client, usage_stream, events)
    barrier = threading.Barrier(2)
    one_sink, two_sink = BarrierSink(litellm_db, barrier), BarrierSink(litellm_db, barrier)
    one = consumer_for(redis_client, one_sink, usage_stream, consumer="one")
    two = consumer_for(redis_client, two_sink, usage_stream, consumer="two", claim_idle_ms=0)
    await one.ensure_group()
    try:
        first = asyncio.create_task(one.run_once())
        await poll(lambda: _pending_is(redis_client, usage_stream, len(events)), what="one's read")
        assert await asyncio.gather(first, two.run_once()) == [len(events), len(events)]
    finally:
        one_sink.close()
        two_sink.close()
    kinds = sorted(o.kind for o in one_sink.outcomes + two_sink.outcomes)
    assert kinds == ["applied"] * len(events) + ["skipped"] * len(events)
    for p in principals:
        assert_charged_once(litellm_db, p, [s[-1] for s in sessions[p.key_hash]])
    assert len(spend_log_ids(litellm_db)) == len(events)
    assert await pending(redis_client, usage_stream) == 0


async def _pending_is(redis: aioredis.Redis, stream: str, count: int) -> bool:
    return await pending(redis, stream) == count


async def test_negative_delta_is_dead_lettered_with_its_group_and_the_rest_applied(
    redis_client: aioredis.Redis, usage_stream: str, litellm_db: str, sink: LedgerSink
) -> None:
    """A cost that went backwards lands in `<stream>:dead` with group=litellm and the reason; nothing of it applied."""
    p = principal_of(litellm_db)
    e1, e2, e3 = session_events(p, "rs_neg")
    backwards = e2.with_changes(cost_usd=e1.cost_usd / 2)
    consumer = consumer_for(redis_client, sink, usage_stream)
    await consumer.ensure_group()
    ids = await publish(redis_client, usage_stream, [e1, backwards, e3])
    assert await drain(consumer) == 3
    (letter,) = await redis_client.xrange(f"{usage_stream}:dead")
    fields = letter[1]
    assert (fields[b"group"], fields[b"original_id"].decode()) == (b"litellm", ids[1])
    assert b"negative delta" in fields[b"reason"]
    assert fields[b"event_id"].decode() == backwards.event_id
    assert_charged_once(litellm_db, p, [e3])
    assert spend_log_ids(litellm_db) == ["rs_neg:1", "rs_neg:3"]
    assert await pending(redis_client, usage_stream) == 0


async def test_after_commit_hook_runs_before_the_ack_with_the_outcomes(
    redis_client: aioredis.Redis, usage_stream: str, litellm_db: str, sink: LedgerSink
) -> None:
    """The hook gets each committed event and its outcome while the entries are still pending; a failing hook is
    logged and the entries are acknowledged all the same."""
    p = principal_of(litellm_db)
    events = session_events(p, "rs_hook")
    seen: list[tuple[str, str, int]] = []

    async def hook(batch: Sequence[UsageEvent], outcomes: Sequence[Outcome]) -> None:
        still_pending = await pending(redis_client, usage_stream)
        seen.extend((e.event_id, o.kind, still_pending) for e, o in zip(batch, outcomes, strict=True))
        raise RuntimeError("the proxy's Redis is down")

    consumer = consumer_for(redis_client, sink, usage_stream, after_commit=hook)
    await consumer.ensure_group()
    await publish(redis_client, usage_stream, [*events, events[0]])
    with watching(Warnings("after-commit hook failed"), "sidecar.billing") as warnings:
        assert await drain(consumer) == 4
    assert warnings.lines and "the proxy's Redis is down" in warnings.lines[0]
    assert seen == [(e.event_id, "applied", 4) for e in events] + [(events[0].event_id, "skipped", 4)]
    assert await pending(redis_client, usage_stream) == 0
    assert_charged_once(litellm_db, p, [events[-1]])


async def test_unknown_key_writes_spend_logs_only(
    redis_client: aioredis.Redis, usage_stream: str, litellm_db: str, sink: LedgerSink
) -> None:
    """A key hash LiteLLM does not know: its SpendLogs rows are written, no spend row moves."""
    p = principal_of(litellm_db)
    stranger = [e.with_changes(key_hash="cd" * 32) for e in session_events(p, "rs_x")]
    consumer = consumer_for(redis_client, sink, usage_stream)
    await consumer.ensure_group()
    await publish(redis_client, usage_stream, stranger)
    assert await drain(consumer) == 3
    assert spend_log_ids(litellm_db) == ["rs_x:1", "rs_x:2", "rs_x:3"]
    assert {k: v for k, v in spend_of(litellm_db, p).items() if k != "logs"} == dict.fromkeys(ENTITY_SPEND, 0.0)


# ---- faults -----------------------------------------------------------------------------------------------


async def test_litellm_database_down_keeps_entries_pending_then_applies_them_once(
    redis_client: aioredis.Redis, usage_stream: str, litellm_db: str
) -> None:
    """LiteLLM's DB stops answering while sessions end: warnings, nothing acked or written; once back, all once."""
    p = principal_of(litellm_db)
    async with proxied(litellm_db) as (proxy, url):
        metrics = ConsumeMetrics()
        sink = LedgerSink(url, timeout_s=TIMEOUT_S, observer=metrics)
        consumer = consumer_for(redis_client, sink, usage_stream, block_ms=50, backoff_s=0.05)
        await consumer.ensure_group()
        warm = session_events(p, "rs_warm", seqs=1)
        await publish(redis_client, usage_stream, warm)
        assert await drain(consumer) == 1  # connected and probed through the proxy
        proxy.freeze()
        sessions = [session_events(p, f"rs_{i}") for i in range(4)]
        await publish(redis_client, usage_stream, [e for s in sessions for e in s])
        stop = asyncio.Event()
        with watching(Warnings("no answer from the database"), "sidecar.billing") as warnings:
            task = asyncio.create_task(consumer.run(stop))
            await warnings.seen()
            assert await pending(redis_client, usage_stream) == 12  # nothing acknowledged uncommitted
            assert spend_log_ids(litellm_db) == ["rs_warm:1"]
            proxy.thaw()
            await poll(lambda: _pending_is(redis_client, usage_stream, 0), what="the backlog applied after the thaw")
            stop.set()
            await task
        sink.close()
    assert any("retrying in" in line for line in warnings.lines)
    assert_charged_once(litellm_db, p, [warm[-1], *(s[-1] for s in sessions)])
    assert len(spend_log_ids(litellm_db)) == 13
    assert metrics.ledger_events.labels("applied")._value.get() >= 13


async def test_litellm_database_unreachable_is_a_database_error(litellm_db: str) -> None:
    """Nothing listens at the URL: the write raises BillingDatabaseError (retried by the consumer), no traceback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        sink = LedgerSink(f"postgresql://postgres@127.0.0.1:{port}/x", timeout_s=TIMEOUT_S)
        with pytest.raises(BillingDatabaseError, match="database failure"):
            await asyncio.to_thread(sink.write, [usage_event("rs_1", 1)], now=datetime.now().astimezone())


async def test_missing_required_table_is_refused_until_restored(
    redis_client: aioredis.Redis, usage_stream: str, litellm_db: str
) -> None:
    """A required table missing: every attempt refused with a warning naming it, nothing acked or written; once
    it is back, the pending entries are applied once."""
    p = principal_of(litellm_db)
    with psycopg.connect(litellm_db, autocommit=True) as admin:
        admin.execute('ALTER TABLE "LiteLLM_TeamMembership" RENAME TO "hidden_membership"')
        metrics = ConsumeMetrics()
        sink = LedgerSink(litellm_db, observer=metrics)
        with pytest.raises(LedgerSchemaError, match="lacks table LiteLLM_TeamMembership"):
            await asyncio.to_thread(sink.check)
        assert metrics.ledger_schema_ready._value.get() == 0
        events = session_events(p, "rs_m")
        await publish(redis_client, usage_stream, events)
        consumer = consumer_for(redis_client, sink, usage_stream, block_ms=50, backoff_s=0.01)
        stop = asyncio.Event()
        with watching(Warnings("lacks table LiteLLM_TeamMembership"), "sidecar.billing") as warnings:
            task = asyncio.create_task(consumer.run(stop))
            await warnings.seen()
            assert await pending(redis_client, usage_stream) == 3
            assert spend_log_ids(litellm_db) == []
            admin.execute('ALTER TABLE "hidden_membership" RENAME TO "LiteLLM_TeamMembership"')
            await poll(lambda: _pending_is(redis_client, usage_stream, 0), what="the entries applied once restored")
            stop.set()
            await task
        sink.close()
    assert "the LiteLLM sink writes nothing until it is there" in warnings.lines[0]
    assert metrics.ledger_schema_ready._value.get() == 1
    assert_charged_once(litellm_db, p, [events[-1]])


def test_a_constraint_the_schema_adds_is_retried_never_dead_lettered(litellm_db: str, sink: LedgerSink) -> None:
    """A NOT NULL column without default (a LiteLLM upgrade the sink does not know) fails every write as a database
    error, so the entries stay pending; once the schema accepts the rows again, the same events apply."""
    p = principal_of(litellm_db)
    events = session_events(p, "rs_nn")
    now = datetime.now().astimezone()
    with psycopg.connect(litellm_db, autocommit=True) as admin:
        admin.execute('ALTER TABLE "LiteLLM_SpendLogs" ADD COLUMN required_now text NOT NULL')
        with pytest.raises(BillingDatabaseError, match="NotNullViolation"):
            sink.write(events, now=now)
        admin.execute('ALTER TABLE "LiteLLM_SpendLogs" DROP COLUMN required_now')
    assert [o.kind for o in sink.write(events, now=now)] == ["applied"] * 3
    assert_charged_once(litellm_db, p, [events[-1]])


class Clock:
    """A settable monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_schema_is_probed_again_after_reprobe_s(litellm_db: str) -> None:
    """A column LiteLLM drops while the sink runs is seen at the next probe, `reprobe_s` after the last, not before."""
    clock = Clock()
    sink = LedgerSink(litellm_db, reprobe_s=60, monotonic=clock)
    try:
        assert sink.check().has_column("LiteLLM_VerificationToken", "last_active")
        with psycopg.connect(litellm_db, autocommit=True) as admin:
            admin.execute('ALTER TABLE "LiteLLM_VerificationToken" RENAME COLUMN last_active TO gone')
        clock.now += 59.9
        assert sink.check().has_column("LiteLLM_VerificationToken", "last_active")
        clock.now += 0.1
        assert not sink.check().has_column("LiteLLM_VerificationToken", "last_active")
    finally:
        sink.close()


def test_connect_params_drop_prismas_parameters_and_keep_the_schema() -> None:
    """LiteLLM's DATABASE_URL as Prisma takes it: Prisma-only parameters dropped, `schema=` becomes the search path,
    the URL's libpq parameters win over the derived timeouts."""
    params, namespace = connect_params(
        "postgres://u:pw@db:5433/litellm?schema=llm&connection_limit=5&pgbouncer=true&connect_timeout=7", timeout_s=3
    )
    assert namespace == "llm"
    assert (params["host"], params["port"], params["dbname"], params["connect_timeout"]) == (
        "db",
        "5433",
        "litellm",
        "7",
    )
    assert params["options"].endswith("-c search_path=llm,public")
    assert "statement_timeout=3000" in params["options"]
    assert not {"schema", "connection_limit", "pgbouncer"} & set(params)
    assert connect_params("postgresql://u@db/litellm", timeout_s=3)[1] == "public"


def test_prisma_pgbouncer_flag_turns_prepared_statements_off(litellm_db: str) -> None:
    """`pgbouncer=true` (PgBouncer in transaction mode cannot keep prepared statements): psycopg prepares none, and
    the sink still writes; without it psycopg's default applies."""
    params, _ = connect_params(f"{litellm_db}?pgbouncer=true", timeout_s=3)
    assert params["prepare_threshold"] is None
    assert "prepare_threshold" not in connect_params(litellm_db, timeout_s=3)[0]
    p = principal_of(litellm_db)
    sink = LedgerSink(f"{litellm_db}?pgbouncer=true")
    try:
        events = [e for n in range(3) for e in session_events(p, f"rs_pgb{n}")]
        assert {o.kind for o in sink.write(events, now=datetime.now().astimezone())} == {"applied"}
        assert sink.write(events, now=datetime.now().astimezone())[0].kind == "skipped"
    finally:
        sink.close()
    assert_charged_once(litellm_db, p, [session_events(p, f"rs_pgb{n}")[-1] for n in range(3)])


def test_a_database_failure_never_names_the_password() -> None:
    """The error the consumer logs names the cause, never the URL's password."""
    sink = LedgerSink("postgresql://u:s3cret-pw@127.0.0.1:1/x", timeout_s=TIMEOUT_S)
    with pytest.raises(BillingDatabaseError, match="database failure") as caught:
        sink.check()
    assert "s3cret-pw" not in str(caught.value)
