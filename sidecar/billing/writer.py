"""Idempotent writes of usage events into the billing DB (docs/api.md, "Metering and billing").

Both the stream consumer and the embedded mode (no Redis) write through `BillingWriter`. A write is one
transaction: the new events go into `realtime_usage_event` (unique `event_id`, so redeliveries and
duplicates are ignored) and each session's `realtime_usage` row takes the figures of its highest `seq`.
Replaying any mix of old events, in any order, changes nothing.

Embedded mode writes with `write_or_dead_letter`: an event the DB cannot store (a NUL in a key's alias,
a figure out of range) goes to `realtime_usage_dead` with its reason, and the rest of its batch is billed,
so one bad event never holds back the others. A DB that is down still fails the whole call (retry later).

    SidecarError
    └── BillingError                 a billing write or read failed
        ├── BillingDatabaseError     the DB is unreachable or refused the statement; retry later
        │   └── BillingTimeoutError  the DB did not answer within the timeout (stalled, black-holed)
        ├── BillingDataError         an event the DB cannot store (out of range, NUL); never retry it
        └── BillingStreamError       Redis failed under the consumer (sidecar.billing.consumer)
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from types import TracebackType
from typing import Any, Final, TypeVar

from sqlalchemy import Connection, Engine, Insert, bindparam, column, create_engine, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DataError,
    DBAPIError,
    IntegrityError,
    NoSuchModuleError,
    SQLAlchemyError,
    StatementError,
)
from sqlalchemy.pool import StaticPool
from sqlmodel import SQLModel

from sidecar.billing.tables import AMOUNT_LIMIT, DEAD_TABLE, EVENT_TABLE, TABLES, USAGE_TABLE, quantize
from sidecar.config import DEFAULT_DB_TIMEOUT_S
from sidecar.errors import ConfigError, SidecarError
from sidecar.usage import EVENT_TYPES, UsageEvent

log = logging.getLogger(__name__)

PG_CONNECT_TIMEOUT_S: Final = 10
"""libpq waits forever for an unanswered connect by default; a worker thread must not."""
PG_MIN_CONNECT_TIMEOUT_S: Final = 2
"""libpq's smallest connect timeout (it reads 1 as 2)."""

_T = TypeVar("_T")

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_INTS: Final = ("seq", "audio_bytes", "input_tokens", "output_tokens")
_AMOUNTS: Final = ("quantity", "audio_seconds", "cost_usd")
_TEXTS: Final = (
    "event_id",
    "session_id",
    "key_hash",
    "key_alias",
    "user_id",
    "team_id",
    "model",
    "provider_model",
    "kind",
    "unit",
    "close_reason",
    "upstream_usage",
)
# The figures a usage row copies from the event of the session's highest seq. `budget_windows` is left out
# on purpose: it names the sidecar's budget counters for the LiteLLM sink's settle (sidecar/ledger/budget.py),
# not a billed figure; a dead letter keeps it among the event's stream fields.
_FIGURES: Final = (
    "key_hash",
    "key_alias",
    "user_id",
    "team_id",
    "model",
    "provider_model",
    "kind",
    "unit",
    "quantity",
    "audio_seconds",
    "audio_bytes",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "started_at",
    "ended_at",
    "close_reason",
    "upstream_usage",
)
_EVENT_COLUMNS: Final = ("event_id", "session_id", "seq", "type", *_FIGURES, "received_at")


class BillingError(SidecarError):
    """A billing write or read failed. The message names the cause, never SQL or bound values."""


class BillingDatabaseError(BillingError):
    """The billing DB is unreachable or failed the transaction; nothing of it was written. Retry later."""


class BillingTimeoutError(BillingDatabaseError):
    """The billing DB did not answer within the timeout; the connection was cut. Retry later."""


class BillingDataError(BillingError):
    """An event holds a value the billing DB cannot store. Retrying cannot help: dead-letter it."""


def make_engine(url: str, *, timeout_s: float = DEFAULT_DB_TIMEOUT_S) -> Engine:
    """An engine for a SQLite or PostgreSQL billing DB URL, safe to share between threads.

    `postgresql://` and `postgres://` mean the psycopg 3 driver. Bound values are kept out of error
    messages and logs. PostgreSQL connections get `pg_connect_args(timeout_s)` (a parameter given in the
    URL's query wins); a connection the DB dropped is replaced by `BillingWriter` (no ping per checkout:
    a ping to a frozen server would hang outside the writer's deadline). Raises ConfigError for a
    malformed URL or a backend other than SQLite and PostgreSQL; does not connect.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError("SIDECAR_DATABASE_URL is not a database URL") from exc
    backend = parsed.get_backend_name()
    options: dict[str, Any] = {"hide_parameters": True}
    if backend == "sqlite":
        options["connect_args"] = {"check_same_thread": False}
        if parsed.database in (None, "", ":memory:"):
            options["poolclass"] = StaticPool  # one shared connection, or each would see its own empty DB
    elif backend in ("postgresql", "postgres"):
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        args = pg_connect_args(timeout_s)
        options["connect_args"] = {name: value for name, value in args.items() if name not in parsed.query}
    else:
        raise ConfigError(f"unsupported billing database {backend!r}: use sqlite or postgresql")
    try:
        return create_engine(parsed, **options)
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        raise ConfigError(f"cannot use billing database driver {parsed.drivername!r}") from exc


def pg_connect_args(timeout_s: float) -> dict[str, Any]:
    """libpq parameters that bound every wait on PostgreSQL by about `timeout_s`.

    A connect timeout; a server-side statement timeout, and an idle-in-transaction timeout so that the
    server drops a transaction whose client vanished; TCP keepalives, so an idle connection to a dead
    host fails; and a TCP user timeout, so data the network swallows fails the connection. (A server
    that accepts data and never answers is cut by `BillingWriter`'s own deadline.)
    """
    ms = max(1, round(timeout_s * 1000))
    return {
        "connect_timeout": max(PG_MIN_CONNECT_TIMEOUT_S, min(PG_CONNECT_TIMEOUT_S, math.ceil(timeout_s))),
        "options": f"-c statement_timeout={ms} -c idle_in_transaction_session_timeout={ms}",
        "keepalives": 1,
        "keepalives_idle": max(1, math.ceil(timeout_s / 3)),
        "keepalives_interval": max(1, math.ceil(timeout_s / 9)),
        "keepalives_count": 3,
        "tcp_user_timeout": ms,
    }


def upgrade(engine: Engine) -> None:
    """Create the billing tables and indexes that are missing; existing ones are left as they are.

    Idempotent (`sidecar db upgrade`). Raises BillingDatabaseError if the DB cannot be reached.
    """
    with _translated("upgrade"):
        SQLModel.metadata.create_all(engine, tables=list(TABLES))


def check_storable(event: UsageEvent) -> None:
    """Raise BillingDataError if the billing DB could not store `event`, naming the field.

    Integers must fit 64 bits, figures NUMERIC(20, 10), timestamps must be aware, text must hold no NUL
    and be valid Unicode (no lone surrogate, which no UTF-8 database can hold).
    """
    if event.type not in EVENT_TYPES:
        raise BillingDataError(f"type: expected checkpoint or final, got {event.type!r}")
    for name in _INTS:
        if not _INT64_MIN <= getattr(event, name) <= _INT64_MAX:
            raise BillingDataError(f"{name}: out of range")
    for name in _AMOUNTS:
        if not _fits_amount(getattr(event, name)):
            raise BillingDataError(f"{name}: out of range for NUMERIC(20, 10)")
    for name in _TEXTS:
        value = getattr(event, name)
        if "\x00" in value:
            raise BillingDataError(f"{name}: contains a NUL character")
        if not value.isascii() and not _encodable(value):
            raise BillingDataError(f"{name}: not valid Unicode (a lone surrogate)")
    if event.started_at.tzinfo is None or (event.ended_at is not None and event.ended_at.tzinfo is None):
        raise BillingDataError("started_at/ended_at: naive datetime")


class BillingWriter:
    """Writes usage events idempotently and closes lost sessions. Thread-safe; blocking (use a thread).

    On PostgreSQL each transaction runs under a deadline of `timeout_s`: a DB that has not answered by
    then (a frozen server, a black-holed network) has the connection cut, and the call raises
    BillingTimeoutError instead of blocking its thread forever. A pooled connection found dead (the DB
    restarted) is replaced once, at no cost to the caller.
    """

    def __init__(self, engine: Engine, *, timeout_s: float = DEFAULT_DB_TIMEOUT_S) -> None:
        """Raises ConfigError if the engine's dialect is neither SQLite nor PostgreSQL."""
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise ConfigError(f"unsupported billing database {engine.dialect.name!r}")
        self._engine = engine
        self._timeout_s = timeout_s if engine.dialect.name == "postgresql" else None
        is_pg = engine.dialect.name == "postgresql"
        self._insert = postgresql.insert if is_pg else sqlite.insert
        self._unnest = _pg_insert_events() if is_pg else None

    @property
    def engine(self) -> Engine:
        """The billing database engine."""
        return self._engine

    def write(self, events: Sequence[UsageEvent], *, now: datetime) -> int:
        """Store the events not stored yet and update their sessions' usage rows; return how many were new.

        One transaction. An `event_id` already stored, or seen earlier in `events`, is ignored. Each
        session's row then takes the figures of its highest `seq`: a lower or equal `seq` never
        overwrites, whatever the row's status, and a higher one always does (so a late final replaces a
        `lost` row). Status becomes `final` for a final event, else `open`; `last_event_at` becomes `now`.

        Raises BillingDataError (nothing written) if an event cannot be stored (see `check_storable`),
        BillingDatabaseError (nothing written) if the DB fails, ValueError if `now` is naive.
        """
        _require_aware(now)
        unique = list(_first_per_event_id(events))
        for event in unique:
            check_storable(event)
        if not unique:
            return 0

        def work(conn: Connection) -> int:
            stored = self._insert_events(conn, unique, now)
            winners = _highest_seq_per_session(e for e in unique if e.event_id in stored)
            if winners:
                self._upsert_usage(conn, winners, now)
            return len(stored)

        return self._run("write", work)

    def write_or_dead_letter(self, events: Sequence[UsageEvent], *, now: datetime) -> int:
        """`write`, except that events the DB cannot store are dead-lettered instead of failing the batch.

        Events `check_storable` refuses go to `realtime_usage_dead` with the reason (once per `event_id`,
        logged); the rest are written in one transaction. Should the DB still refuse a value of that batch,
        its events are written one by one and the refused ones dead-lettered. Returns how many events were
        newly stored. Raises BillingDatabaseError if the DB fails (retry the whole call: writes and dead
        letters are both idempotent), ValueError if `now` is naive.
        """
        good: list[UsageEvent] = []
        dead: list[tuple[UsageEvent, str]] = []
        for event in _first_per_event_id(events):
            try:
                check_storable(event)
            except BillingDataError as exc:
                dead.append((event, str(exc)))
            else:
                good.append(event)
        if dead:
            self.dead_letter(dead, now=now)
        try:
            return self.write(good, now=now)
        except BillingDataError:
            pass
        stored = 0
        for event in good:
            try:
                stored += self.write([event], now=now)
            except BillingDataError as exc:
                self.dead_letter([(event, str(exc))], now=now)
        return stored

    def dead_letter(self, letters: Sequence[tuple[UsageEvent, str]], *, now: datetime) -> int:
        """Keep (event, reason) pairs in `realtime_usage_dead`, once per event_id; return how many were new.

        Each new one is logged as a warning. Raises BillingDatabaseError if the DB fails, ValueError if
        `now` is naive.
        """
        _require_aware(now)
        rows = {str(row["event_id"]): row for row in (_dead_row(event, reason, now) for event, reason in letters)}
        if not rows:
            return 0
        stmt = (
            self._insert(DEAD_TABLE)
            .on_conflict_do_nothing(index_elements=["event_id"])
            .returning(DEAD_TABLE.c.event_id)
        )
        new = self._run("dead_letter", lambda conn: set(conn.execute(stmt, [rows[k] for k in sorted(rows)]).scalars()))
        for event_id in sorted(new):
            row = rows[event_id]
            log.warning(
                "billing: usage event %s dead-lettered to realtime_usage_dead: %s",
                event_id,
                row["reason"],
                extra={"session_id": row["session_id"], "key_hash": row["key_hash"]},
            )
        return len(new)

    def close_lost(self, *, now: datetime, horizon_s: float) -> int:
        """Close every `open` session with no stored event for more than `horizon_s`; return how many.

        Such a session's sidecar died before its final event (docs/api.md: it "closes at its last
        checkpoint"): status and close_reason become `lost`, `ended_at` becomes `last_event_at` (when
        its last checkpoint was stored), and its figures stay those of that checkpoint. Raises
        BillingDatabaseError if the DB fails, ValueError if `now` is naive.
        """
        _require_aware(now)
        cutoff = now - timedelta(seconds=horizon_s)
        usage = USAGE_TABLE.c
        stmt = (
            update(USAGE_TABLE)
            .where(usage.status == "open", usage.last_event_at < cutoff)
            .values(status="lost", close_reason="lost", ended_at=usage.last_event_at, updated_at=now)
        )
        return self._run("close_lost", lambda conn: int(conn.execute(stmt).rowcount))

    def _run(self, action: str, work: Callable[[Connection], _T]) -> _T:
        """`work(conn)` in one transaction under the deadline, on a pooled connection replaced once if the DB
        had dropped it. Raises BillingDataError, BillingTimeoutError or BillingDatabaseError."""
        for attempt in (1, 2):
            try:
                with _translated(action), self._engine.connect() as conn, _Deadline(conn, self._timeout_s, action):
                    with conn.begin():
                        return work(conn)
            except BillingDatabaseError as exc:
                if attempt == 2 or not _dropped(exc):
                    raise
        raise AssertionError("unreachable")

    def _insert_events(self, conn: Connection, events: list[UsageEvent], now: datetime) -> set[str]:
        # Sorted by event_id so that concurrent writers take unique-index locks in one order (no deadlock).
        rows = [_event_row(e, now) for e in sorted(events, key=lambda e: e.event_id)]
        if self._unnest is not None:
            columns = {name: [row[name] for row in rows] for name in _EVENT_COLUMNS}
            return set(conn.execute(self._unnest, columns).scalars())
        stmt = (
            self._insert(EVENT_TABLE)
            .on_conflict_do_nothing(index_elements=["event_id"])
            .returning(EVENT_TABLE.c.event_id)
        )
        return set(conn.execute(stmt, rows).scalars())

    def _upsert_usage(self, conn: Connection, winners: Mapping[str, UsageEvent], now: datetime) -> None:
        # Sorted by session_id for the same reason; one row per session, as ON CONFLICT DO UPDATE requires.
        rows = [_usage_row(winners[sid], now) for sid in sorted(winners)]
        stmt = self._insert(USAGE_TABLE)
        new = stmt.excluded
        stmt = stmt.on_conflict_do_update(
            index_elements=["session_id"],
            set_={name: new[name] for name in rows[0] if name != "session_id"},
            where=USAGE_TABLE.c.last_seq < new.last_seq,
        )
        conn.execute(stmt, rows)


class _Deadline:
    """Cuts a PostgreSQL connection (shutdown of its socket) still busy `timeout_s` after entering.

    libpq has no client-side query timeout: a server that took the query and never answers (frozen, or
    behind a proxy that stopped forwarding) blocks the thread forever, and the server-side statement
    timeout cannot fire where the server is not running. The cut makes libpq fail at once; __exit__
    then raises BillingTimeoutError. The socket is cut only while the transaction still runs (a lock
    orders the timer against __exit__), so never after the connection went back to the pool.
    """

    def __init__(self, conn: Connection, timeout_s: float | None, action: str) -> None:
        self._fd = _socket_fd(conn) if timeout_s is not None else None
        self._timeout_s = timeout_s or 0.0
        self._action = action
        self._lock = threading.Lock()
        self._done = False
        self._expired = False
        self._timer = threading.Timer(self._timeout_s, self._expire) if self._fd is not None else None

    def __enter__(self) -> _Deadline:
        if self._timer is not None:
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        with self._lock:
            self._done = True
        if self._timer is not None:
            self._timer.cancel()
        if self._expired and exc is not None:
            message = f"billing {self._action}: no answer from the database within {self._timeout_s:g}s"
            raise BillingTimeoutError(message) from exc

    def _expire(self) -> None:
        with self._lock:
            if self._done or self._fd is None:
                return
            self._expired = True
            _cut(self._fd)


def _socket_fd(conn: Connection) -> int | None:
    """The file descriptor of a psycopg connection's socket, None for other drivers or a broken one."""
    try:
        fd = conn.connection.dbapi_connection.pgconn.socket  # type: ignore[union-attr]
    except Exception:  # no socket to watch: the statement runs without the client deadline
        return None
    return fd if isinstance(fd, int) else None


def _cut(fd: int) -> None:
    """Shut a socket down both ways (its owner's blocked read returns at once); the fd stays open."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _dropped(exc: BillingDatabaseError) -> bool:
    """True when the DB had dropped the (pooled) connection, so that a new one may simply work."""
    cause = exc.__cause__
    return (
        not isinstance(exc, BillingTimeoutError)
        and isinstance(cause, DBAPIError)
        and bool(cause.connection_invalidated)
    )


def _pg_insert_events() -> Insert:
    """INSERT ... SELECT FROM unnest(one array per column) ON CONFLICT DO NOTHING RETURNING event_id.

    One short statement per batch: psycopg parses and PostgreSQL plans it once, where a multi-row VALUES
    list with a placeholder per value costs more than the insert itself (measured: ~2x the throughput).
    """
    types = {name: EVENT_TABLE.c[name].type for name in _EVENT_COLUMNS}
    arrays = [bindparam(name, type_=postgresql.ARRAY(kind)) for name, kind in types.items()]
    columns = (column(name, kind) for name, kind in types.items())
    source = func.unnest(*arrays).table_valued(*columns).render_derived(name="batch")
    return (
        postgresql.insert(EVENT_TABLE)
        .from_select(list(types), select(*(source.c[name] for name in types)))
        .on_conflict_do_nothing(index_elements=["event_id"])
        .returning(EVENT_TABLE.c.event_id)
    )


def _first_per_event_id(events: Iterable[UsageEvent]) -> Iterator[UsageEvent]:
    seen: set[str] = set()
    for event in events:
        if event.event_id not in seen:
            seen.add(event.event_id)
            yield event


def _highest_seq_per_session(events: Iterable[UsageEvent]) -> dict[str, UsageEvent]:
    best: dict[str, UsageEvent] = {}
    for event in events:
        held = best.get(event.session_id)
        if held is None or event.seq > held.seq:  # equal seq: the first one stays, as in the DB
            best[event.session_id] = event
    return best


def _event_row(event: UsageEvent, now: datetime) -> dict[str, object]:
    row: dict[str, object] = {"event_id": event.event_id, "session_id": event.session_id}
    row.update(seq=event.seq, type=event.type, received_at=now)
    row.update((name, getattr(event, name)) for name in _FIGURES)
    return row


def _usage_row(event: UsageEvent, now: datetime) -> dict[str, object]:
    row: dict[str, object] = {"session_id": event.session_id, "last_seq": event.seq}
    row.update(last_event_id=event.event_id, status="final" if event.type == "final" else "open")
    row.update((name, getattr(event, name)) for name in _FIGURES)
    row.update(last_event_at=now, updated_at=now)
    return row


def _dead_row(event: UsageEvent, reason: str, now: datetime) -> dict[str, object]:
    return {
        "event_id": _storable_text(event.event_id),
        "session_id": _storable_text(event.session_id),
        "key_hash": _storable_text(event.key_hash),
        "reason": _storable_text(reason),
        "fields": json.dumps(event.to_fields(), ensure_ascii=True),  # \u0000, \ud800: ASCII, always storable
        "dead_at": now,
    }


def _storable_text(value: str) -> str:
    """`value` with NULs and lone surrogates replaced by U+FFFD."""
    if value.isascii():
        return value.replace("\x00", "\ufffd")
    return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace").replace("\x00", "\ufffd")


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _fits_amount(value: Decimal) -> bool:
    try:
        return abs(quantize(value)) < AMOUNT_LIMIT
    except InvalidOperation:
        return False


def _require_aware(now: datetime) -> None:
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")


@contextmanager
def _translated(action: str) -> Iterator[None]:
    """Turn SQLAlchemy failures into BillingDataError / BillingDatabaseError without SQL or values."""
    try:
        yield
    except (DataError, IntegrityError) as exc:
        raise BillingDataError(f"billing {action}: the database refused a value: {_cause(exc)}") from exc
    except DBAPIError as exc:
        raise BillingDatabaseError(f"billing {action}: database failure: {_cause(exc)}") from exc
    except StatementError as exc:  # a value that failed conversion before it reached the database
        raise BillingDataError(f"billing {action}: unstorable value: {_cause(exc)}") from exc
    except SQLAlchemyError as exc:  # pool exhausted, connection invalidated, ...
        raise BillingDatabaseError(f"billing {action}: database failure: {type(exc).__name__}") from exc


def _cause(exc: StatementError) -> str:
    orig = exc.orig
    if orig is None:
        return type(exc).__name__
    first_line = (str(orig).strip().splitlines() or [""])[0]
    return f"{type(orig).__name__}: {first_line[:200]}"
