"""BillingWriter against real SQLite and PostgreSQL: idempotent, highest-seq-wins, lost sessions."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text
from sqlmodel import Session, col, func, select

from sidecar.billing import (
    BillingDatabaseError,
    BillingDataError,
    BillingWriter,
    RealtimeUsage,
    RealtimeUsageEvent,
    make_engine,
    upgrade,
)
from sidecar.errors import ConfigError, SidecarError
from sidecar.testing.factories import T0, usage_event


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """An upgraded billing DB on SQLite or PostgreSQL."""
    engine = make_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def writer(engine: Engine) -> BillingWriter:
    """A writer on the upgraded DB."""
    return BillingWriter(engine)


def usage_row(engine: Engine, session_id: str) -> RealtimeUsage:
    with Session(engine) as session:
        return session.exec(select(RealtimeUsage).where(RealtimeUsage.session_id == session_id)).one()


def stored_events(engine: Engine, session_id: str) -> list[RealtimeUsageEvent]:
    with Session(engine) as session:
        query = select(RealtimeUsageEvent).where(RealtimeUsageEvent.session_id == session_id)
        return list(session.exec(query.order_by(col(RealtimeUsageEvent.id))))


def usage_rows(engine: Engine) -> int:
    with Session(engine) as session:
        return session.exec(select(func.count()).select_from(RealtimeUsage)).one()


def test_checkpoint_then_final_leaves_one_row_with_final_figures(engine: Engine, writer: BillingWriter) -> None:
    """A checkpoint then the final: both events stored, one usage row carrying the final's figures."""
    checkpoint, final = usage_event("s1", 1), usage_event("s1", 2, final=True)
    assert writer.write([checkpoint], now=T0) == 1
    assert writer.write([final], now=T0 + timedelta(seconds=10)) == 1
    row = usage_row(engine, "s1")
    assert (row.status, row.last_seq, row.last_event_id) == ("final", 2, final.event_id)
    assert (row.quantity, row.cost_usd, row.audio_bytes) == (Decimal(10), Decimal("0.001"), 480_000)
    assert (row.ended_at, row.close_reason) == (T0 + timedelta(seconds=10), "client_close")
    assert row.last_event_at == T0 + timedelta(seconds=10)
    assert [e.seq for e in stored_events(engine, "s1")] == [1, 2]
    assert usage_rows(engine) == 1


def test_duplicate_event_in_one_batch_is_stored_once(engine: Engine, writer: BillingWriter) -> None:
    """The same event_id twice in one batch is stored and counted once."""
    event = usage_event("s1", 1)
    assert writer.write([event, event], now=T0) == 1
    assert len(stored_events(engine, "s1")) == 1


def test_duplicate_event_across_batches_is_stored_once(engine: Engine, writer: BillingWriter) -> None:
    """A redelivered batch stores nothing new and leaves the usage row as it was."""
    batch = [usage_event("s1", 1), usage_event("s1", 2)]
    assert writer.write(batch, now=T0) == 2
    assert writer.write(batch, now=T0 + timedelta(seconds=30)) == 0
    assert len(stored_events(engine, "s1")) == 2
    row = usage_row(engine, "s1")
    assert (row.last_seq, row.last_event_at) == (2, T0)


def test_out_of_order_final_keeps_highest_seq(engine: Engine, writer: BillingWriter) -> None:
    """A final seq 3 written before checkpoint seq 2: the row keeps seq 3 and stays final."""
    final, late = usage_event("s1", 3, final=True), usage_event("s1", 2)
    writer.write([final], now=T0)
    assert writer.write([late], now=T0 + timedelta(seconds=1)) == 1
    row = usage_row(engine, "s1")
    assert (row.status, row.last_seq, row.quantity, row.last_event_at) == ("final", 3, Decimal(15), T0)


def test_equal_seq_never_overwrites(engine: Engine, writer: BillingWriter) -> None:
    """A second event with the same seq (another event_id) is stored but does not change the row."""
    first = usage_event("s1", 1)
    writer.write([first], now=T0)
    writer.write([usage_event("s1", 1, final=True, quantity=Decimal(99))], now=T0)
    row = usage_row(engine, "s1")
    assert (row.status, row.last_event_id, row.quantity) == ("open", first.event_id, Decimal(5))


def test_close_lost_closes_only_stale_open_sessions(engine: Engine, writer: BillingWriter) -> None:
    """Only open sessions silent beyond the horizon become lost, at their last checkpoint."""
    writer.write([usage_event("stale", 1), usage_event("stale", 2)], now=T0)
    writer.write([usage_event("done", 1, final=True)], now=T0)
    writer.write([usage_event("fresh", 1)], now=T0 + timedelta(seconds=30))
    assert writer.close_lost(now=T0 + timedelta(seconds=61), horizon_s=60) == 1
    stale = usage_row(engine, "stale")
    assert (stale.status, stale.close_reason, stale.ended_at) == ("lost", "lost", T0)
    assert (stale.last_seq, stale.quantity, stale.cost_usd) == (2, Decimal(10), Decimal("0.001"))
    assert usage_row(engine, "done").status == "final"
    assert usage_row(engine, "fresh").status == "open"
    assert writer.close_lost(now=T0 + timedelta(seconds=61), horizon_s=60) == 0


def test_late_final_replaces_lost_row(engine: Engine, writer: BillingWriter) -> None:
    """A final with a higher seq arriving after the session was closed as lost replaces the lost row."""
    writer.write([usage_event("s1", 1)], now=T0)
    writer.close_lost(now=T0 + timedelta(seconds=120), horizon_s=60)
    final = usage_event("s1", 2, final=True)
    writer.write([final], now=T0 + timedelta(seconds=121))
    row = usage_row(engine, "s1")
    assert (row.status, row.last_seq, row.close_reason) == ("final", 2, "client_close")
    assert row.ended_at == final.ended_at


def test_lost_row_is_not_replaced_by_older_event(engine: Engine, writer: BillingWriter) -> None:
    """A late event with a lower seq leaves a lost row lost."""
    writer.write([usage_event("s1", 2)], now=T0)
    writer.close_lost(now=T0 + timedelta(seconds=120), horizon_s=60)
    writer.write([usage_event("s1", 1)], now=T0 + timedelta(seconds=121))
    assert usage_row(engine, "s1").status == "lost"


def test_upgrade_is_idempotent(engine: Engine, writer: BillingWriter) -> None:
    """Running upgrade again on a DB with data keeps the tables and the data."""
    writer.write([usage_event("s1", 1)], now=T0)
    upgrade(engine)
    upgrade(engine)
    assert len(stored_events(engine, "s1")) == 1


def test_figures_and_timestamps_round_trip_exactly(engine: Engine, writer: BillingWriter) -> None:
    """NUMERIC(20, 10) figures come back exact and timestamps come back aware UTC."""
    big = Decimal("9999999999.9999999999")
    tiny = Decimal("0.0000000001")
    started = datetime(2025, 1, 1, 13, 0, tzinfo=timezone(timedelta(hours=1)))  # = T0
    writer.write([usage_event("s1", 1, cost_usd=big, quantity=tiny, started_at=started)], now=T0)
    row = usage_row(engine, "s1")
    assert (row.cost_usd, row.quantity) == (big, tiny)
    assert row.started_at == T0
    assert row.started_at.tzinfo == UTC


def test_unstorable_event_raises_data_error_and_writes_nothing(engine: Engine, writer: BillingWriter) -> None:
    """An event beyond NUMERIC(20, 10) fails the whole batch as BillingDataError; nothing is stored."""
    good, bad = usage_event("s1", 1), usage_event("s2", 1, cost_usd=Decimal("1E12"))
    with pytest.raises(BillingDataError, match="cost_usd"):
        writer.write([good, bad], now=T0)
    assert stored_events(engine, "s1") == []


def test_failed_transaction_writes_nothing(engine: Engine, writer: BillingWriter) -> None:
    """If the usage upsert fails after the events were inserted, the events are rolled back too."""
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE realtime_usage"))
    with pytest.raises(BillingDatabaseError) as caught:
        writer.write([usage_event("s1", 1)], now=T0)
    assert isinstance(caught.value, SidecarError)
    assert stored_events(engine, "s1") == []


def test_naive_now_is_refused(writer: BillingWriter) -> None:
    """`now` without a time zone is a caller bug: ValueError."""
    with pytest.raises(ValueError, match="timezone-aware"):
        writer.write([usage_event("s1", 1)], now=datetime(2025, 1, 1))


def test_write_to_unreachable_postgresql_raises_database_error() -> None:
    """PostgreSQL on a port nobody listens on: BillingDatabaseError, for writes, sweeps and upgrades."""
    engine = make_engine("postgresql://postgres@127.0.0.1:1/test")
    writer = BillingWriter(engine)
    with pytest.raises(BillingDatabaseError):
        writer.write([usage_event("s1", 1)], now=T0)
    with pytest.raises(BillingDatabaseError):
        writer.close_lost(now=T0, horizon_s=60)
    with pytest.raises(BillingDatabaseError):
        upgrade(engine)
    engine.dispose()


def test_make_engine_refuses_other_databases() -> None:
    """Only SQLite and PostgreSQL are billing databases; anything else is a ConfigError."""
    with pytest.raises(ConfigError):
        make_engine("mysql://root@127.0.0.1/billing")
    with pytest.raises(ConfigError):
        make_engine("not a url")


def test_make_engine_uses_psycopg_for_plain_postgresql_urls() -> None:
    """`postgresql://` and `postgres://` URLs get the psycopg 3 driver."""
    for url in ("postgresql://postgres@127.0.0.1/test", "postgres://postgres@127.0.0.1/test"):
        engine = make_engine(url)
        assert engine.url.drivername == "postgresql+psycopg"
        engine.dispose()


def test_in_memory_sqlite_is_shared_between_threads() -> None:
    """`sqlite://` (in memory) keeps one DB that a worker thread can write and the caller read."""
    engine = make_engine("sqlite://")
    upgrade(engine)
    writer = BillingWriter(engine)
    worker = threading.Thread(target=writer.write, args=([usage_event("s1", 1)],), kwargs={"now": T0})
    worker.start()
    worker.join()
    assert usage_row(engine, "s1").last_seq == 1
    engine.dispose()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), count=st.integers(min_value=1, max_value=6), ends=st.booleans())
def test_any_order_batching_and_duplication_gives_the_highest_seq(
    engine: Engine, writer: BillingWriter, data: st.DataObject, count: int, ends: bool
) -> None:
    """Whatever the order, batching and duplication of a session's events, its row is its highest seq."""
    session_id = f"prop-{uuid.uuid4()}"  # each example its own session: the DB is shared by examples
    events = [usage_event(session_id, seq, final=ends and seq == count) for seq in range(1, count + 1)]
    extra = data.draw(st.lists(st.sampled_from(events), max_size=4))
    stream = data.draw(st.permutations(events + extra))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=3)))
    bounds = [0, *cuts, len(stream)]
    new = sum(writer.write(stream[a:b], now=T0) for a, b in pairwise(bounds))
    assert new == count
    row = usage_row(engine, session_id)
    assert (row.last_seq, row.last_event_id) == (count, events[-1].event_id)
    assert row.status == ("final" if ends else "open")
    assert row.quantity == events[-1].quantity
