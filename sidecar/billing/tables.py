"""The billing tables (docs/api.md, "Metering and billing").

`realtime_usage_event` keeps every usage event once (unique `event_id`); `realtime_usage` keeps one row
per session: the figures of its highest `seq`, and whether it is `open`, `final` or `lost`;
`realtime_usage_dead` keeps the events embedded mode could not store (the dead letters), with the reason.

Two column types keep both backends exact and comparable:

- `UTCDateTime`: always an aware UTC datetime in Python. PostgreSQL stores `timestamptz`; SQLite,
  which has no time zones, stores naive UTC text in a fixed format, so SQL comparisons stay correct.
- `Amount`: Decimal figures as `NUMERIC(20, 10)` on PostgreSQL. SQLite has no decimal type (its
  NUMERIC is a float), so there the figure is stored as exact text rounded to 10 places, as PostgreSQL
  rounds it; reading gives back the same Decimal on both.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Context, Decimal
from typing import Any, Final

from sqlalchemy import BigInteger, DateTime, Dialect, Index, Integer, Numeric, String, Table, Text
from sqlalchemy.types import TypeDecorator, TypeEngine
from sqlmodel import Field, SQLModel

SCALE: Final = Decimal("1E-10")
"""Every Decimal figure is stored rounded to 10 decimal places (half away from zero, like PostgreSQL)."""
AMOUNT_LIMIT: Final = Decimal("1E10")
"""NUMERIC(20, 10) holds magnitudes below this."""

_CONTEXT: Final = Context(prec=60)
_INT64: Final = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER keys only


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp that always reads back as aware UTC. Naive datetimes are refused."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: billing timestamps must be timezone-aware")
        utc = value.astimezone(UTC)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Amount(TypeDecorator[Decimal]):
    """An exact Decimal: NUMERIC(20, 10) on PostgreSQL, exact text on SQLite (see the module docstring)."""

    impl = Numeric(20, 10)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(32))
        return dialect.type_descriptor(Numeric(20, 10, asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Decimal | str | None:
        if value is None or dialect.name != "sqlite":
            return value
        return format(quantize(value), "f")

    def process_result_value(self, value: object, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        # SQLite gives text for stored figures, but a float for aggregates such as SUM().
        return quantize(Decimal(repr(value) if isinstance(value, float) else str(value)))


def quantize(value: Decimal) -> Decimal:
    """`value` rounded to the stored scale. Raises decimal.InvalidOperation for a non-finite value."""
    return value.quantize(SCALE, rounding=ROUND_HALF_UP, context=_CONTEXT)


class UsageFigures(SQLModel):
    """The contract's per-event figures, shared by both tables (not a table itself)."""

    key_alias: str
    user_id: str
    team_id: str
    model: str
    provider_model: str
    kind: str
    unit: str
    quantity: Decimal = Field(sa_type=Amount)
    audio_seconds: Decimal = Field(sa_type=Amount)
    audio_bytes: int = Field(sa_type=BigInteger)
    input_tokens: int = Field(sa_type=BigInteger)
    output_tokens: int = Field(sa_type=BigInteger)
    cost_usd: Decimal = Field(sa_type=Amount)
    started_at: datetime = Field(sa_type=UTCDateTime)
    ended_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    close_reason: str = ""
    upstream_usage: str = Field(default="", sa_type=Text)


class RealtimeUsageEvent(UsageFigures, table=True):
    """Every usage event once, as it came from the stream (unique `event_id`), and when it was stored."""

    __tablename__ = "realtime_usage_event"

    id: int | None = Field(default=None, primary_key=True, sa_type=_INT64)
    event_id: str = Field(unique=True)
    session_id: str = Field(index=True)
    seq: int = Field(sa_type=BigInteger)
    type: str
    key_hash: str
    received_at: datetime = Field(sa_type=UTCDateTime)


class RealtimeUsage(UsageFigures, table=True):
    """One billing record per session: the figures of its highest `seq` (`last_seq`, `last_event_id`).

    `status` is `open` (checkpoints only), `final` (its final event arrived) or `lost` (no event for the
    lost horizon: closed at its last checkpoint, `ended_at` = `last_event_at`, `close_reason` `lost`).
    `last_event_at` is when the winning event was stored (the consumer's clock), not a relay time:
    the relay leaves `ended_at` empty on checkpoints, and the consumer's clock is the one the lost sweep
    compares with. `updated_at` is when the row last changed.
    """

    __tablename__ = "realtime_usage"
    __table_args__ = (Index("ix_realtime_usage_status_last_event_at", "status", "last_event_at"),)

    session_id: str = Field(primary_key=True)
    last_seq: int = Field(sa_type=BigInteger)
    last_event_id: str
    status: str
    key_hash: str = Field(index=True)
    last_event_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class RealtimeUsageDead(SQLModel, table=True):
    """A usage event the billing DB could not store (embedded mode's dead letters; Redis mode has the stream
    `<stream>:dead`), once per `event_id`, with the reason.

    `fields` is the event's stream fields as ASCII JSON (`\\u0000` for a NUL), so any event fits; `event_id`,
    `session_id` and `key_hash` are copies for queries, with anything unstorable replaced by U+FFFD.
    """

    __tablename__ = "realtime_usage_dead"

    id: int | None = Field(default=None, primary_key=True, sa_type=_INT64)
    event_id: str = Field(unique=True)
    session_id: str = Field(index=True)
    key_hash: str
    reason: str = Field(sa_type=Text)
    fields: str = Field(sa_type=Text)
    dead_at: datetime = Field(sa_type=UTCDateTime)


EVENT_TABLE: Final[Table] = RealtimeUsageEvent.__table__  # type: ignore[attr-defined]
USAGE_TABLE: Final[Table] = RealtimeUsage.__table__  # type: ignore[attr-defined]
DEAD_TABLE: Final[Table] = RealtimeUsageDead.__table__  # type: ignore[attr-defined]
TABLES: Final = (EVENT_TABLE, USAGE_TABLE, DEAD_TABLE)
