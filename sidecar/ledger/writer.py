"""The LiteLLM sink's writer: one usage event into LiteLLM's ledger, in one transaction, exactly once.

`apply(conn, schema, event, now=...)` locks the session's marker row (in the sink's own schema
`realtime_sidecar`, never in LiteLLM's `public`), computes the delta since the last applied event
(sidecar.ledger.delta), and when there is one writes, in the same transaction: one immutable
SpendLogs row (`request_id` `<session_id>:<seq>`), relative `spend` increments on the entity rows
that exist, in LiteLLM's own lock order (organization, organization membership, team, user, team
membership, key; the team's advisory lock first), the daily upserts on the probed unique keys, and
the advanced marker. A repeat, a late or an older event finds the marker ahead and writes nothing.
`ensure_sink_tables(conn)` creates the sink's schema and marker table; run it once at start.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, Literal

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from sidecar.ledger.delta import Applied, DeadLetter, Delta, Skip, delta
from sidecar.ledger.schema import (
    ORGANIZATION,
    ORGANIZATION_MEMBERSHIP,
    SPEND_LOGS,
    TEAM,
    TEAM_MEMBERSHIP,
    TOKEN,
    USER,
    LedgerSchema,
)
from sidecar.usage import UsageEvent

SINK_SCHEMA: Final = "realtime_sidecar"
MARKERS: Final = "litellm_sessions"
SOURCE: Final = "realtime-sidecar"
CALL_TYPE: Final = "_arealtime"
# LiteLLM maps call types to endpoints (ROUTE_ENDPOINT_MAPPING); `_arealtime` has none, so its
# daily rows carry endpoint ''.
ENDPOINT: Final = ""
# As LiteLLM's own spend transactions: a writer waits at most this long for a row lock.
LOCK_TIMEOUT_MS: Final = 5000
ATTEMPTS: Final = 3
Kind = Literal["applied", "skipped", "dead_letter"]

_MARKER_DDL: Final = f"""
CREATE SCHEMA IF NOT EXISTS {SINK_SCHEMA};
CREATE TABLE IF NOT EXISTS {SINK_SCHEMA}.{MARKERS} (
    session_id text PRIMARY KEY,
    last_seq bigint NOT NULL,
    cost_usd numeric NOT NULL,
    input_tokens bigint NOT NULL,
    output_tokens bigint NOT NULL,
    audio_seconds numeric NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
)
"""
_MARKER_INSERT: Final = (
    f"INSERT INTO {SINK_SCHEMA}.{MARKERS} (session_id, last_seq, cost_usd, input_tokens, output_tokens,"
    " audio_seconds) VALUES (%s, 0, 0, 0, 0, 0) ON CONFLICT (session_id) DO NOTHING"
)
_MARKER_LOCK: Final = (
    f"SELECT last_seq, cost_usd, input_tokens, output_tokens, audio_seconds FROM {SINK_SCHEMA}.{MARKERS}"
    " WHERE session_id = %s FOR UPDATE"
)
_MARKER_ADVANCE: Final = (
    f"UPDATE {SINK_SCHEMA}.{MARKERS} SET last_seq = %s, cost_usd = %s, input_tokens = %s, output_tokens = %s,"
    " audio_seconds = %s, updated_at = now() WHERE session_id = %s"
)
_RETRYABLE: Final = (psycopg.errors.DeadlockDetected, psycopg.errors.LockNotAvailable)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What `apply` did: `applied` (with its delta), `skipped` or `dead_letter` (with the reason).

    An applied outcome also says who was charged, as LiteLLM's rows said inside the transaction:
    `key_exists` (the key's token row was found; when not, only the SpendLogs row was written and the
    ids below are the event's, no row of theirs touched), `key_hash`, and the `user_id`, `team_id` and
    `organization_id` whose rows were incremented ('' for none). Post-commit actions (cache
    invalidation) read them; skipped and dead-lettered outcomes leave them empty: nothing was charged.
    """

    kind: Kind
    reason: str = ""
    delta: Delta | None = None
    key_exists: bool = False
    key_hash: str = ""
    user_id: str = ""
    team_id: str = ""
    organization_id: str = ""


@dataclass(frozen=True, slots=True)
class _Owners:
    """Who a key's spend is charged to, as LiteLLM's rows say (empty: none)."""

    key_exists: bool
    user_id: str
    team_id: str
    organization_id: str


class _Refused(Exception):
    """Rolls the transaction back: the event is skipped or dead-lettered."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reason)
        self.outcome = outcome


def ensure_sink_tables(conn: psycopg.Connection[Any]) -> None:
    """Create the sink's schema and marker table if missing (idempotent); commits."""
    with conn.transaction():
        conn.execute(_MARKER_DDL)


def apply(
    conn: psycopg.Connection[Any],
    schema: LedgerSchema,
    event: UsageEvent,
    *,
    now: datetime,
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
    attempts: int = ATTEMPTS,
) -> Outcome:
    """Apply one usage event to LiteLLM's ledger, once; `conn` must be idle (no open transaction).

    Retries the transaction on a deadlock (40P01) or a lock timeout (55P03) up to `attempts` times
    in all, then raises psycopg's error (the caller leaves the entry pending and retries later).
    Other psycopg errors propagate after the rollback. Requires `ensure_sink_tables` to have run.
    """
    for attempt in range(1, attempts + 1):
        try:
            return _apply_once(conn, schema, event, now=now, lock_timeout_ms=int(lock_timeout_ms))
        except _RETRYABLE:
            if attempt >= attempts:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _apply_once(
    conn: psycopg.Connection[Any], schema: LedgerSchema, event: UsageEvent, *, now: datetime, lock_timeout_ms: int
) -> Outcome:
    try:
        with conn.transaction():
            conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{lock_timeout_ms}ms",))
            d = _lock_marker(conn, event)
            owners = _owners(conn, event)
            if owners.team_id:
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (owners.team_id,))
            _insert_spend_log(conn, schema, event, d, owners)
            if owners.key_exists:
                _increment_entities(conn, schema, event.key_hash, d, owners, now=now)
                _upsert_daily(conn, schema, event, d, owners)
            t = d.totals
            conn.execute(
                _MARKER_ADVANCE,
                (t.seq, t.cost_usd, t.input_tokens, t.output_tokens, t.audio_seconds, event.session_id),
            )
    except _Refused as refused:
        return refused.outcome
    return Outcome(
        "applied",
        delta=d,
        key_exists=owners.key_exists,
        key_hash=event.key_hash,
        user_id=owners.user_id,
        team_id=owners.team_id,
        organization_id=owners.organization_id,
    )


def _lock_marker(conn: psycopg.Connection[Any], event: UsageEvent) -> Delta:
    conn.execute(_MARKER_INSERT, (event.session_id,))
    row = conn.execute(_MARKER_LOCK, (event.session_id,)).fetchone()
    assert row is not None  # inserted above or already there; markers are never deleted
    last = Applied(int(row[0]), Decimal(row[1]), int(row[2]), int(row[3]), Decimal(row[4]))
    outcome = delta(last if last.seq else None, event)
    if isinstance(outcome, Skip):
        raise _Refused(Outcome("skipped", outcome.reason))
    if isinstance(outcome, DeadLetter):
        raise _Refused(Outcome("dead_letter", outcome.reason))
    return outcome


def _owners(conn: psycopg.Connection[Any], event: UsageEvent) -> _Owners:
    row = conn.execute(
        'SELECT user_id, team_id, organization_id FROM "LiteLLM_VerificationToken" WHERE token = %s',
        (event.key_hash,),
    ).fetchone()
    if row is None:
        return _Owners(False, event.user_id, event.team_id, "")
    user_id, team_id = event.user_id or (row[0] or ""), event.team_id or (row[1] or "")
    org = row[2] or ""
    if not org and team_id:
        team = conn.execute('SELECT organization_id FROM "LiteLLM_TeamTable" WHERE team_id = %s', (team_id,)).fetchone()
        org = (team[0] or "") if team else ""
    return _Owners(True, user_id, team_id, org)


def _provider(event: UsageEvent) -> str:
    return event.provider_model.split("/", 1)[0] if "/" in event.provider_model else ""


def _naive_utc(moment: datetime) -> datetime:
    """LiteLLM's DateTime columns are `timestamp(3)` without time zone, in UTC."""
    return moment.astimezone(UTC).replace(tzinfo=None)


def _insert_spend_log(
    conn: psycopg.Connection[Any], schema: LedgerSchema, event: UsageEvent, d: Delta, owners: _Owners
) -> None:
    metadata = {
        "source": SOURCE,
        "user_api_key_alias": event.key_alias,
        "user_api_key_team_id": owners.team_id,
        "user_api_key_user_id": owners.user_id,
        "user_api_key_org_id": owners.organization_id,
        "realtime_session_id": event.session_id,
        "realtime_seq": event.seq,
        "audio_seconds": float(d.audio_seconds),
        "cumulative_cost_usd": format(d.totals.cost_usd, "f"),
    }
    values: dict[str, object] = {
        "request_id": f"{event.session_id}:{event.seq}",
        "call_type": CALL_TYPE,
        "api_key": event.key_hash,
        "spend": float(d.cost_usd),
        "total_tokens": d.total_tokens,
        "prompt_tokens": d.input_tokens,
        "completion_tokens": d.output_tokens,
        "startTime": _naive_utc(event.started_at),
        "endTime": _naive_utc(event.ended_at or event.started_at),
        "model": event.model,
        "model_group": event.model,
        "custom_llm_provider": _provider(event),
        "user": owners.user_id,
        "team_id": owners.team_id or None,
        "organization_id": owners.organization_id or None,
        "metadata": Jsonb(metadata),
        "session_id": event.session_id,
        "status": "success",
    }
    values = {c: v for c, v in values.items() if schema.has_column(SPEND_LOGS, c)}
    key = schema.spend_logs_key
    conflict = sql.SQL("({})").format(sql.SQL(", ").join(map(sql.Identifier, key))) if key else sql.SQL("")
    conn.execute(
        sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT {} DO NOTHING").format(
            sql.Identifier(SPEND_LOGS),
            sql.SQL(", ").join(map(sql.Identifier, values)),
            sql.SQL(", ").join(sql.Placeholder() * len(values)),
            conflict,
        ),
        list(values.values()),
    )


def _increment(conn: psycopg.Connection[Any], table: str, sets: sql.Composable, where: dict[str, str]) -> None:
    conn.execute(
        sql.SQL("UPDATE {} SET {} WHERE {}").format(
            sql.Identifier(table),
            sets,
            sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in where),
        ),
        list(where.values()),
    )


def _increment_entities(
    conn: psycopg.Connection[Any], schema: LedgerSchema, key_hash: str, d: Delta, owners: _Owners, *, now: datetime
) -> None:
    """Relative increments in LiteLLM's lock order; a row that does not exist is left alone."""
    spend = sql.SQL("spend = COALESCE(spend, 0) + {}").format(sql.Literal(float(d.cost_usd)))
    user, team, org = owners.user_id, owners.team_id, owners.organization_id
    if org:
        _increment(conn, ORGANIZATION, spend, {"organization_id": org})
        if user:
            _increment(conn, ORGANIZATION_MEMBERSHIP, spend, {"user_id": user, "organization_id": org})
    if team:
        _increment(conn, TEAM, spend, {"team_id": team})
    if user:
        _increment(conn, USER, spend, {"user_id": user})
    # No end user: a realtime session carries none.
    if team and user:
        sets = [spend]
        if schema.has_column(TEAM_MEMBERSHIP, "total_spend"):
            sets.append(sql.SQL("total_spend = COALESCE(total_spend, 0) + {}").format(sql.Literal(float(d.cost_usd))))
        _increment(conn, TEAM_MEMBERSHIP, sql.SQL(", ").join(sets), {"user_id": user, "team_id": team})
    sets = [spend]
    if schema.has_column(TOKEN, "total_spend"):
        sets.append(sql.SQL("total_spend = COALESCE(total_spend, 0) + {}").format(sql.Literal(float(d.cost_usd))))
    if schema.has_column(TOKEN, "last_active"):
        sets.append(sql.SQL("last_active = {}").format(sql.Literal(_naive_utc(now))))
    _increment(conn, TOKEN, sql.SQL(", ").join(sets), {"token": key_hash})


_DAILY_ENTITIES: Final = (
    ("LiteLLM_DailyUserSpend", "user_id"),
    ("LiteLLM_DailyTeamSpend", "team_id"),
    ("LiteLLM_DailyOrganizationSpend", "organization_id"),
)
_DAILY_COUNTERS: Final = ("prompt_tokens", "completion_tokens", "spend", "api_requests", "successful_requests")


def _upsert_daily(
    conn: psycopg.Connection[Any], schema: LedgerSchema, event: UsageEvent, d: Delta, owners: _Owners
) -> None:
    """The user, team and organization daily rows (end user and tag: a realtime session has neither)."""
    ids = {"user_id": owners.user_id, "team_id": owners.team_id, "organization_id": owners.organization_id}
    requests = 1 if d.first else 0
    for table, entity in _DAILY_ENTITIES:
        key = schema.daily_keys.get(table)
        if key is None or (entity != "user_id" and not ids[entity]):
            continue  # LiteLLM writes a user row even without a user (''), team and org rows only when set
        fields: dict[str, object] = {
            entity: ids[entity],
            "date": event.started_at.astimezone(UTC).date().isoformat(),
            "api_key": event.key_hash,
            "model": event.model,
            "model_group": event.model,
            "custom_llm_provider": _provider(event),
            "mcp_namespaced_tool_name": "",
            "endpoint": ENDPOINT,
        }
        row: dict[str, object] = {c: fields.get(c, "") for c in key}
        row |= {c: v for c, v in fields.items() if c not in row and schema.has_column(table, c)}
        counters = {
            "prompt_tokens": d.input_tokens,
            "completion_tokens": d.output_tokens,
            "spend": float(d.cost_usd),
            "api_requests": requests,
            "successful_requests": requests,
        }
        row |= {c: v for c, v in counters.items() if schema.has_column(table, c)}
        _upsert(conn, table, key, row, [c for c in _DAILY_COUNTERS if c in row])


def _upsert(
    conn: psycopg.Connection[Any], table: str, key: tuple[str, ...], row: dict[str, object], counters: list[str]
) -> None:
    t = sql.Identifier(table)
    increments = [sql.SQL("{c} = {t}.{c} + EXCLUDED.{c}").format(c=sql.Identifier(c), t=t) for c in counters]
    conn.execute(
        sql.SQL(
            "INSERT INTO {t} (id, {cols}, updated_at)"
            " VALUES (gen_random_uuid()::text, {vals}, now() AT TIME ZONE 'UTC')"
            " ON CONFLICT ({key}) DO UPDATE SET {incs}, updated_at = now() AT TIME ZONE 'UTC'"
        ).format(
            t=t,
            cols=sql.SQL(", ").join(map(sql.Identifier, row)),
            vals=sql.SQL(", ").join(sql.Placeholder() * len(row)),
            key=sql.SQL(", ").join(map(sql.Identifier, key)),
            incs=sql.SQL(", ").join(increments),
        ),
        list(row.values()),
    )


__all__ = ["ATTEMPTS", "SINK_SCHEMA", "Outcome", "apply", "ensure_sink_tables"]
