"""The LiteLLM sink as `sidecar consume` runs it: one connection to LiteLLM's database, probed, events applied.

`LedgerSink` owns one psycopg connection to LiteLLM's PostgreSQL (`SIDECAR_LITELLM_DATABASE_URL`), with the
billing writer's bounds (`SIDECAR_DB_TIMEOUT_S`: connect timeout, statement and idle-in-transaction timeouts,
TCP keepalives and user timeout, and a client-side deadline that cuts a connection whose server took a query
and never answered). Before the first write, every `reprobe_s` and after any database failure it creates the
sink's own tables and probes LiteLLM's schema; while a required table or column is missing it refuses every
write with `LedgerSchemaError`, naming what is missing, so the consumer leaves the entries pending and warns.

`write(events, now=...)` applies the events with `sidecar.ledger.writer.apply_many`, BATCH_MAX (200) events a
transaction, and returns their Outcomes: `applied`, `skipped` (already applied: a repeat, a late checkpoint) or
`dead_letter` (never to be applied; the consumer buries it in `<stream>:dead`). When LiteLLM's columns refuse a
value of a batch (a DataError, the batch rolled back), its events are applied again one transaction each, so
that only the event carrying the value is dead-lettered. Blocking: run it in a thread.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Final, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

from sidecar.billing.writer import BillingDatabaseError, BillingTimeoutError, pg_connect_args
from sidecar.config import DEFAULT_DB_TIMEOUT_S
from sidecar.ledger.schema import LedgerSchema, missing_required, probe
from sidecar.ledger.writer import BATCH_MAX, Outcome, apply, apply_many, ensure_sink_tables
from sidecar.usage import UsageEvent

log = logging.getLogger(__name__)

REPROBE_S: Final = 60.0
"""How often a running sink reads LiteLLM's schema again (an upgrade of the proxy may change it)."""

Conn = psycopg.Connection[Any]


class LedgerSchemaError(BillingDatabaseError):
    """LiteLLM's database lacks a table or column the sink needs; nothing was written. Retried after a probe."""


class LedgerObserver(Protocol):
    """What the sink reports as it works (the consumer's Prometheus metrics)."""

    def applied(self, outcome: Outcome, seconds: float) -> None:
        """One event went through `apply` in `seconds`, with this outcome."""

    def schema_ready(self, ready: bool) -> None:
        """The last probe found everything required (True) or not (False)."""


class LedgerSink:
    """Writes usage events into LiteLLM's ledger through one connection; thread-confined (the consumer's worker).

    `dsn` is a `postgresql://` or `postgres://` URL (libpq parameters in its query win over the derived ones).
    `batch_max` caps the events of one transaction. Does not connect until the first `write` or `check`.
    """

    def __init__(
        self,
        dsn: str,
        *,
        timeout_s: float = DEFAULT_DB_TIMEOUT_S,
        reprobe_s: float = REPROBE_S,
        observer: LedgerObserver | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        batch_max: int = BATCH_MAX,
    ) -> None:
        self._params, self._namespace = connect_params(dsn, timeout_s=timeout_s)
        self._timeout_s = timeout_s
        self._reprobe_s = reprobe_s
        self._observer = observer
        self._monotonic = monotonic
        self._batch_max = max(1, batch_max)
        self._conn: Conn | None = None
        self._schema: LedgerSchema | None = None
        self._missing: list[str] = []
        self._probed_at = 0.0

    @property
    def schema(self) -> LedgerSchema | None:
        """The last probe's result (None before the first one, or after a failure)."""
        return self._schema

    def check(self) -> LedgerSchema:
        """Connect if needed, probe if due, and return a schema holding everything required.

        Raises LedgerSchemaError (something required is missing) or BillingDatabaseError (the database
        failed or did not answer within the timeout).
        """
        with self._translated("probe"):
            return self._ready()

    def write(self, events: Sequence[UsageEvent], *, now: datetime) -> list[Outcome]:
        """Apply the events in order, `batch_max` a transaction; return their outcomes (same order).

        A failure part-way leaves the transactions before it committed: the caller retries the whole batch,
        and their events are then `skipped`. Raises LedgerSchemaError or BillingDatabaseError (nothing more
        written; the connection is replaced and the schema probed again on the next call).
        """
        outcomes: list[Outcome] = []
        with self._translated("write"):
            schema = self._ready()
            conn = self._connection()
            for at in range(0, len(events), self._batch_max):
                batch = events[at : at + self._batch_max]
                started = time.perf_counter()
                done = self._apply_many(conn, schema, batch, now)
                if self._observer is not None:
                    share = (time.perf_counter() - started) / len(batch)  # each event's share of its transaction
                    for outcome in done:
                        self._observer.applied(outcome, share)
                outcomes += done
        return outcomes

    def close(self) -> None:
        """Close the connection (the next call opens a new one)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _apply_many(
        self, conn: Conn, schema: LedgerSchema, events: Sequence[UsageEvent], now: datetime
    ) -> list[Outcome]:
        if len(events) > 1:
            try:
                with _deadline(conn, self._timeout_s):
                    return apply_many(conn, schema, events, now=now)
            except psycopg.DataError:
                pass  # rolled back, and it names no event: one transaction each finds it
        return [self._apply(conn, schema, event, now) for event in events]

    def _apply(self, conn: Conn, schema: LedgerSchema, event: UsageEvent, now: datetime) -> Outcome:
        try:
            with _deadline(conn, self._timeout_s):
                return apply(conn, schema, event, now=now)
        except psycopg.DataError as exc:
            # A value LiteLLM's columns refuse (rolled back): retrying cannot help. (An integrity error, e.g. a
            # NOT NULL column a LiteLLM upgrade added, is the schema's, not the event's: retried, never buried.)
            return Outcome("dead_letter", f"LiteLLM's database refused a value: {_first_line(exc)}")

    def _ready(self) -> LedgerSchema:
        conn = self._connection()
        if self._schema is None or self._missing or self._monotonic() - self._probed_at >= self._reprobe_s:
            with _deadline(conn, self._timeout_s):
                _ensure_sink_tables(conn)
                self._schema = probe(conn, schema=self._namespace)
            self._probed_at, self._missing = self._monotonic(), missing_required(self._schema)
            if self._observer is not None:
                self._observer.schema_ready(not self._missing)
        if self._missing:
            raise LedgerSchemaError(
                f"LiteLLM's database lacks {', '.join(self._missing)}: the LiteLLM sink writes nothing until it "
                "is there (is SIDECAR_LITELLM_DATABASE_URL the proxy's database, migrated?)"
            )
        return self._schema

    def _connection(self) -> Conn:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(autocommit=True, **self._params)
        return self._conn

    @contextmanager
    def _translated(self, action: str) -> Iterator[None]:
        try:
            yield
        except LedgerSchemaError:
            raise
        except _Expired as exc:
            self._reset()
            message = f"LiteLLM sink {action}: no answer from the database within {self._timeout_s:g}s"
            raise BillingTimeoutError(message) from exc
        except (psycopg.Error, OSError) as exc:
            self._reset()
            raise BillingDatabaseError(f"LiteLLM sink {action}: database failure: {_first_line(exc)}") from exc

    def _reset(self) -> None:
        """After a failure: a new connection and a new probe next time (the schema may have changed)."""
        self._schema = None
        try:
            self.close()
        except psycopg.Error:  # already broken: nothing to close cleanly
            self._conn = None


def _ensure_sink_tables(conn: Conn) -> None:
    """`ensure_sink_tables`, tolerating another sink creating them at the same moment (CREATE ... IF NOT EXISTS
    races in PostgreSQL's catalog: the loser gets a unique violation; once the winner committed, a retry sees them)."""
    try:
        ensure_sink_tables(conn)
    except psycopg.errors.UniqueViolation:
        ensure_sink_tables(conn)


def connect_params(dsn: str, *, timeout_s: float) -> tuple[dict[str, Any], str]:
    """libpq parameters for LiteLLM's `DATABASE_URL`, and the schema its tables are in (`public` by default).

    The URL's own libpq parameters win over those derived from `timeout_s` (`pg_connect_args`). Prisma's
    parameters, which libpq refuses, are dropped; Prisma's `schema=` becomes the search path (the sink's
    statements name LiteLLM's tables unqualified, as Prisma does); Prisma's `pgbouncer=true` (a PgBouncer in
    transaction mode, which cannot keep a session's prepared statements) turns psycopg's prepared statements
    off (`prepare_threshold` None). Raises psycopg.ProgrammingError for a malformed URL.
    """
    parts = urlsplit(dsn)
    query = parse_qsl(parts.query, keep_blank_values=True)
    namespace = next((v for k, v in query if k == "schema" and v), "public")
    kept = urlencode([(k, v) for k, v in query if k not in _PRISMA_ONLY])
    given = conninfo_to_dict(urlunsplit(parts._replace(query=kept)))
    params: dict[str, Any] = {**pg_connect_args(timeout_s), **given}
    if namespace != "public":
        params["options"] = f"{params.get('options', '')} -c search_path={namespace},public".strip()
    if any(k == "pgbouncer" and v.lower() == "true" for k, v in query):
        params["prepare_threshold"] = None
    return params, namespace


# Query parameters Prisma reads from DATABASE_URL that libpq does not know (it would refuse the URL).
_PRISMA_ONLY: Final = frozenset(
    {"schema", "connection_limit", "pool_timeout", "pgbouncer", "socket_timeout", "statement_cache_size",
     "sslaccept", "sslidentity"}
)  # fmt: skip


class _Expired(Exception):
    """The client-side deadline cut the connection."""


@contextmanager
def _deadline(conn: Conn, timeout_s: float) -> Iterator[None]:
    """Cut `conn`'s socket if the block still runs after `timeout_s` (libpq has no client-side timeout: a
    server that took the query and never answers would block the thread forever); then raise _Expired."""
    fd = conn.pgconn.socket
    lock, state = threading.Lock(), {"done": False, "expired": False}

    def expire() -> None:
        with lock:
            if not state["done"]:
                state["expired"] = True
                _cut(fd)

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except Exception as exc:
        if state["expired"]:
            raise _Expired from exc
        raise
    finally:
        with lock:
            state["done"] = True
        timer.cancel()


def _cut(fd: int) -> None:
    """Shut a socket down both ways (its owner's blocked read returns at once); the fd stays open."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:200]}"


__all__ = ["REPROBE_S", "LedgerObserver", "LedgerSchemaError", "LedgerSink", "connect_params"]
