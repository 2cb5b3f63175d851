"""The LiteLLM sink's writer: usage events into LiteLLM's ledger, a batch per transaction, each event once.

`apply_many(conn, schema, events, now=...)` applies a batch of events in ONE transaction and returns one
Outcome per event, in order; `apply(conn, schema, event, now=...)` is a batch of one. In the transaction:
the batch's marker rows (the sink's own schema `realtime_sidecar`, never LiteLLM's `public`) are created if
missing and locked in session-id order; each event's delta since its session's last applied event is
computed in Python (sidecar.ledger.delta), a session's events chained in the order given (the stream's, so
that a batch lands exactly what the same events one transaction each land): a `seq` not newer is skipped, a
negative or unstorable delta dead-lettered, neither written. For the applied events: the owners of every
key in one read, the teams' advisory locks (sorted), one immutable SpendLogs row per event (`request_id`
`<session_id>:<seq>`), the `spend` increments summed per entity row and applied in LiteLLM's own lock order
(organization, organization membership, team, user, team membership, key, project, tags), each type sorted
by id as LiteLLM's DBSpendUpdateWriter sorts its transactions, the daily upserts summed per unique-key row
(user, team, organization, tag, model; sorted as LiteLLM's `_update_daily_spend` sorts them), and the
advanced markers. A batch in which nothing applies writes nothing (rolled back, markers included).
`ensure_sink_tables(conn)` creates the sink's schema and marker table; run it once at start.

A batch lands what its events one transaction each land (tests/test_ledger_batch.py): the same SpendLogs
rows, markers and daily counters; a row's `spend` rises once per batch by the exact (Decimal) sum of its
events' deltas rounded to the column's float, where one event per transaction adds each rounded delta in
turn: equal to within float rounding.

The caller caps a batch (BATCH_MAX) so a transaction holds its row locks briefly, as LiteLLM's own spend
writer does (litellm/proxy/db/db_spend_update_writer.py: `_update_daily_spend` commits 100 daily rows a
transaction; litellm/proxy/utils.py: `update_spend_logs` writes SpendLogs 1,000 rows a batch). Every
statement's text is composed once per LedgerSchema, with bind parameters (never literals), so psycopg
prepares it after `prepare_threshold` uses; the writes that return nothing go in one pipeline.

Daily rows, as LiteLLM writes them for one request: a session is one request, counted (`api_requests`,
`request_count`, `successful_requests`) on its first applied event only; later events add spend and
tokens. `LiteLLM_DailyModelUsage` is keyed by date, model group, model, provider (`unknown` when the
event names none, as LiteLLM writes it) and task type: as LiteLLM, the first of the session's tags
`task:<name>` naming one of LiteLLM's known tasks (the `model_insights_tasks.json` the installed
litellm package ships), else `uncategorized` (MODEL_INSIGHTS_DEFAULT_TASK).

Projects and tags: a key in a project (`project_id`, newer versions) charges the project's `spend` too.
LiteLLM adds the key's `metadata.tags`, then its team's, then its project's, to every request of the
key (add_key_level_controls, add_team_and_project_level_controls), so the sink reads them from the
token, team and project rows inside the transaction and treats the session as carrying them: SpendLogs'
`request_tags`, one `LiteLLM_DailyTagSpend` row per tag, and each tag's `LiteLLM_TagTable.spend` (the
rows that exist). Not applied: tags a client sends per request (a realtime connect carries none).

No end user: LiteLLM takes a request's end user from its body (`user`) or a configured header; a
realtime session's connect carries neither through the sidecar, so `LiteLLM_EndUserTable` and
`LiteLLM_DailyEndUserSpend` are never written.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Literal

import orjson
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from sidecar.ledger.delta import Applied, DeadLetter, Delta, Skip, delta
from sidecar.ledger.schema import (
    ORGANIZATION,
    ORGANIZATION_MEMBERSHIP,
    PROJECT,
    SPEND_LOGS,
    TAG,
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
# LiteLLM's task type for a request without a `task:<name>` tag (litellm.constants.MODEL_INSIGHTS_DEFAULT_TASK).
TASK_TYPE: Final = "uncategorized"
TASK_TAG_PREFIX: Final = "task:"
# LiteLLM's known tasks, shipped as data in its package (litellm/proxy/model_insights_tasks.json).
TASKS_FILE: Final = ("proxy", "model_insights_tasks.json")
# LiteLLM's provider in LiteLLM_DailyModelUsage when a request names none.
UNKNOWN_PROVIDER: Final = "unknown"
# As LiteLLM's own spend transactions: a writer waits at most this long for a row lock.
LOCK_TIMEOUT_MS: Final = 5000
ATTEMPTS: Final = 3
# The most events one transaction applies (the sink splits larger batches): row locks held briefly.
BATCH_MAX: Final = 200
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
_LOCK_TIMEOUT: Final = "SELECT set_config('lock_timeout', %s, true)"
# Session ids arrive sorted (Python's code-point order, which is the "C" collation's): every writer inserts
# and locks markers in the same order.
_MARKER_INSERT: Final = (
    f"INSERT INTO {SINK_SCHEMA}.{MARKERS} (session_id, last_seq, cost_usd, input_tokens, output_tokens,"
    " audio_seconds) SELECT s, 0, 0, 0, 0, 0 FROM unnest(%s::text[]) AS s ON CONFLICT (session_id) DO NOTHING"
)
_MARKER_LOCK: Final = (
    f"SELECT session_id, last_seq, cost_usd, input_tokens, output_tokens, audio_seconds FROM {SINK_SCHEMA}.{MARKERS}"
    ' WHERE session_id = ANY(%s::text[]) ORDER BY session_id COLLATE "C" FOR UPDATE'
)
_MARKER_ADVANCE: Final = (
    f"UPDATE {SINK_SCHEMA}.{MARKERS} SET last_seq = %s, cost_usd = %s, input_tokens = %s, output_tokens = %s,"
    " audio_seconds = %s, updated_at = now() WHERE session_id = %s"
)
# Markers this transaction created for sessions it applied nothing of: gone with it, as with a rollback.
_MARKER_DROP: Final = f"DELETE FROM {SINK_SCHEMA}.{MARKERS} WHERE session_id = ANY(%s::text[]) AND last_seq = 0"
_TEAM_LOCK: Final = "SELECT pg_advisory_xact_lock(hashtext(%s))"
_RETRYABLE: Final = (psycopg.errors.DeadlockDetected, psycopg.errors.LockNotAvailable)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What `apply` did: `applied` (with its delta), `skipped` or `dead_letter` (with the reason).

    An applied outcome also says who was charged, as LiteLLM's rows said inside the transaction:
    `key_exists` (the key's token row was found; when not, only the SpendLogs row was written and the
    ids below are the event's, no row of theirs touched), `key_hash`, and the `user_id`, `team_id` and
    `organization_id` whose rows were incremented ('' for none), the key's `project_id` ('' for none)
    and the `tags` the session carried (the key's, then its team's and its project's). Post-commit
    actions (cache invalidation) read them; skipped and dead-lettered outcomes leave them empty: nothing
    was charged.
    """

    kind: Kind
    reason: str = ""
    delta: Delta | None = None
    key_exists: bool = False
    key_hash: str = ""
    user_id: str = ""
    team_id: str = ""
    organization_id: str = ""
    project_id: str = ""
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Owners:
    """Who a key's spend is charged to, as LiteLLM's rows say (empty: none)."""

    key_exists: bool
    user_id: str
    team_id: str
    organization_id: str
    project_id: str = ""
    tags: tuple[str, ...] = ()


class _NothingApplied(Exception):
    """Rolls the transaction back: no event of the batch is applied (each skipped or dead-lettered)."""

    def __init__(self, outcomes: list[Outcome]) -> None:
        super().__init__("nothing applied")
        self.outcomes = outcomes


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
    """Apply one usage event to LiteLLM's ledger, once: `apply_many` with a batch of one (same contract)."""
    (outcome,) = apply_many(conn, schema, [event], now=now, lock_timeout_ms=lock_timeout_ms, attempts=attempts)
    return outcome


def apply_many(
    conn: psycopg.Connection[Any],
    schema: LedgerSchema,
    events: Sequence[UsageEvent],
    *,
    now: datetime,
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
    attempts: int = ATTEMPTS,
) -> list[Outcome]:
    """Apply a batch of usage events to LiteLLM's ledger in one transaction, each once; one Outcome per event, in
    order. `conn` must be idle (no open transaction); keep batches to BATCH_MAX events.

    Retries the transaction on a deadlock (40P01) or a lock timeout (55P03) up to `attempts` times in all, then
    raises psycopg's error (the caller leaves the entries pending and retries later). Other psycopg errors
    propagate after the rollback, nothing of the batch written: a psycopg.DataError (a value LiteLLM's columns
    refuse) names no event, so the caller applies the batch one event at a time to find it. Requires
    `ensure_sink_tables` to have run.
    """
    if not events:
        return []
    for attempt in range(1, attempts + 1):
        try:
            return _apply_batch(conn, schema, events, now=now, lock_timeout_ms=int(lock_timeout_ms))
        except _RETRYABLE:
            if attempt >= attempts:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(slots=True)
class _Batch:
    """What one transaction writes: the applied events with their deltas and owners, summed per row."""

    applied: list[tuple[UsageEvent, Delta, _Owners]] = field(default_factory=list)
    spend: dict[tuple[str, tuple[str, ...]], Decimal] = field(default_factory=dict)
    daily: dict[tuple[str, tuple[object, ...]], dict[str, Any]] = field(default_factory=dict)  # by unique key


def _apply_batch(
    conn: psycopg.Connection[Any],
    schema: LedgerSchema,
    events: Sequence[UsageEvent],
    *,
    now: datetime,
    lock_timeout_ms: int,
) -> list[Outcome]:
    statements = _statements(schema)
    sessions = sorted({e.session_id for e in events})
    try:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(_LOCK_TIMEOUT, (f"{lock_timeout_ms}ms",))
            cur.execute(_MARKER_INSERT, (sessions,))
            last = {
                str(r[0]): Applied(int(r[1]), Decimal(r[2]), int(r[3]), int(r[4]), Decimal(r[5]))
                for r in cur.execute(_MARKER_LOCK, (sessions,)).fetchall()
            }
            deltas = _chain(events, last)
            if not any(isinstance(d, Delta) for d in deltas):
                raise _NothingApplied([_refused(d) for d in deltas])
            owners = _owners(cur, statements, [(e, d) for e, d in zip(events, deltas, strict=True)])
            batch = _Batch()
            outcomes: list[Outcome] = []
            for e, d in zip(events, deltas, strict=True):
                if not isinstance(d, Delta):
                    outcomes.append(_refused(d))
                    continue
                o = owners[(e.key_hash, e.team_id, e.user_id)]
                batch.applied.append((e, d, o))
                if o.key_exists:
                    _add_spend(batch, schema, e.key_hash, d, o)
                    _add_daily(batch, schema, e, d, o)
                outcomes.append(_applied(e, d, o))
            _write(cur, schema, statements, batch, last, sessions, now=now)
    except _NothingApplied as nothing:
        return nothing.outcomes
    return outcomes


def _chain(events: Sequence[UsageEvent], last: dict[str, Applied]) -> list[Delta | Skip | DeadLetter]:
    """Each event's delta after its session's last applied figures, the session's earlier events of the batch
    applied first (in the order given); `last` ends holding each session's figures after the batch."""
    deltas: list[Delta | Skip | DeadLetter] = []
    for e in events:
        before = last[e.session_id]
        d = delta(before if before.seq else None, e)
        if isinstance(d, Delta):
            last[e.session_id] = d.totals
        deltas.append(d)
    return deltas


def _refused(d: Delta | Skip | DeadLetter) -> Outcome:
    if isinstance(d, Skip):
        return Outcome("skipped", d.reason)
    if isinstance(d, DeadLetter):
        return Outcome("dead_letter", d.reason)
    raise AssertionError("an applied delta is not refused")  # pragma: no cover


def _applied(e: UsageEvent, d: Delta, o: _Owners) -> Outcome:
    return Outcome(
        "applied",
        delta=d,
        key_exists=o.key_exists,
        key_hash=e.key_hash,
        user_id=o.user_id,
        team_id=o.team_id,
        organization_id=o.organization_id,
        project_id=o.project_id,
        tags=o.tags,
    )


def _write(
    cur: psycopg.Cursor[Any],
    schema: LedgerSchema,
    statements: _Statements,
    batch: _Batch,
    last: dict[str, Applied],
    sessions: list[str],
    *,
    now: datetime,
) -> None:
    """Every write of the batch in one pipeline (none returns anything), in lock order: the teams' advisory
    locks, SpendLogs, the entity rows, the daily rows, the markers."""
    teams = sorted({o.team_id for _, _, o in batch.applied if o.team_id})
    with cur.connection.pipeline():
        if teams:
            cur.executemany(_TEAM_LOCK, [(t,) for t in teams])
        cur.executemany(statements.spend_log, [_spend_log_row(statements, e, d, o) for e, d, o in batch.applied])
        for table, statement in statements.increments.items():
            rows = sorted((ids, amount) for (t, ids), amount in batch.spend.items() if t == table)
            if rows:
                last_active = _naive_utc(now)
                params = [{"amount": float(a), "now": last_active, **_where(table, ids)} for ids, a in rows]
                cur.executemany(statement, params)
        for table, (statement, columns) in statements.daily.items():
            daily = sorted((r for (t, _), r in batch.daily.items() if t == table), key=lambda r: r["_order"])
            if daily:
                cur.executemany(statement, [_daily_values(r, columns) for r in daily])
        advanced = sorted({e.session_id for e, _, _ in batch.applied})
        cur.executemany(_MARKER_ADVANCE, [_marker(last[s], s) for s in advanced])
        if untouched := sorted(set(sessions) - set(advanced)):
            cur.execute(_MARKER_DROP, (untouched,))


def _marker(t: Applied, session_id: str) -> tuple[object, ...]:
    return (t.seq, t.cost_usd, t.input_tokens, t.output_tokens, t.audio_seconds, session_id)


# ---- statements, composed once per schema --------------------------------------------------------------------

# The entity tables a charge increments, in LiteLLM's lock order, with the columns naming one row.
_ENTITY_KEYS: Final = {
    ORGANIZATION: ("organization_id",),
    ORGANIZATION_MEMBERSHIP: ("user_id", "organization_id"),
    TEAM: ("team_id",),
    USER: ("user_id",),
    TEAM_MEMBERSHIP: ("user_id", "team_id"),
    TOKEN: ("token",),
    PROJECT: ("project_id",),
    TAG: ("tag_name",),
}
_SPEND_LOG_COLUMNS: Final = (
    "request_id", "call_type", "api_key", "spend", "total_tokens", "prompt_tokens", "completion_tokens",
    "startTime", "endTime", "model", "model_group", "custom_llm_provider", "user", "team_id", "organization_id",
    "metadata", "session_id", "status", "request_tags",
)  # fmt: skip
_DAILY_ENTITIES: Final = (
    ("LiteLLM_DailyUserSpend", "user_id"),
    ("LiteLLM_DailyTeamSpend", "team_id"),
    ("LiteLLM_DailyOrganizationSpend", "organization_id"),
)
_DAILY_TAGS: Final = "LiteLLM_DailyTagSpend"
_DAILY_MODELS: Final = "LiteLLM_DailyModelUsage"
_DAILY_FIELDS: Final = (
    "date", "api_key", "model", "model_group", "custom_llm_provider", "mcp_namespaced_tool_name", "endpoint",
)  # fmt: skip
_MODEL_FIELDS: Final = ("date", "model_group", "model", "custom_llm_provider", "task_type")
_DAILY_COUNTERS: Final = (
    "prompt_tokens", "completion_tokens", "spend", "api_requests", "request_count", "successful_requests",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Statements:
    """A schema's statements as text with bind parameters (psycopg prepares repeated texts)."""

    owners: str
    spend_log: str
    spend_log_columns: tuple[str, ...]
    increments: Mapping[str, str]  # entity table -> UPDATE (named parameters), in lock order
    daily: Mapping[str, tuple[str, tuple[str, ...]]]  # daily table -> (upsert, its columns), in write order


_CACHE: dict[int, tuple[LedgerSchema, _Statements]] = {}
_CACHE_LOCK = threading.Lock()


def _statements(schema: LedgerSchema) -> _Statements:
    """The schema's statements, composed on first use (a LedgerSchema holds mappings, so it is not hashable: cached
    by identity, the schema kept alive beside them so that its id is not reused)."""
    cached = _CACHE.get(id(schema))
    if cached is not None and cached[0] is schema:
        return cached[1]
    composed = _compose(schema)
    with _CACHE_LOCK:
        if len(_CACHE) >= 16:  # a sink re-probes every minute: old schemas go
            _CACHE.clear()
        _CACHE[id(schema)] = (schema, composed)
    return composed


def _text(composable: sql.Composable) -> str:
    return composable.as_string(None)


def _compose(schema: LedgerSchema) -> _Statements:
    columns = tuple(c for c in _SPEND_LOG_COLUMNS if schema.has_column(SPEND_LOGS, c))
    key = schema.spend_logs_key
    conflict = sql.SQL("({})").format(sql.SQL(", ").join(map(sql.Identifier, key))) if key else sql.SQL("")
    spend_log = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT {} DO NOTHING").format(
        sql.Identifier(SPEND_LOGS),
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.SQL(", ").join(sql.Placeholder() * len(columns)),
        conflict,
    )
    daily: dict[str, tuple[str, tuple[str, ...]]] = {}
    for table, entity in _DAILY_ENTITIES:
        daily.update(_compose_daily(schema, table, (entity, *_DAILY_FIELDS)))
    daily.update(_compose_daily(schema, _DAILY_TAGS, ("tag", "request_id", *_DAILY_FIELDS)))
    daily.update(_compose_daily(schema, _DAILY_MODELS, _MODEL_FIELDS))
    return _Statements(
        owners=_text(_compose_owners(schema)),
        spend_log=_text(spend_log),
        spend_log_columns=columns,
        increments={t: _text(_compose_increment(schema, t, keys)) for t, keys in _ENTITY_KEYS.items()},
        daily=daily,
    )


def _compose_owners(schema: LedgerSchema) -> sql.Composable:
    """Every (key, event team) pair's row, its team's (the event's team, else the key's) and its project's."""
    projects = PROJECT in schema.tables and schema.has_column(TOKEN, "project_id")
    return sql.SQL(
        "SELECT e.token, e.team, k.user_id, k.team_id, k.organization_id, {key_meta}, t.organization_id,"
        " {team_meta}, {project}, {project_meta}"
        ' FROM unnest(%s::text[], %s::text[]) AS e(token, team) JOIN "LiteLLM_VerificationToken" k'
        ' ON k.token = e.token LEFT JOIN "LiteLLM_TeamTable" t'
        " ON t.team_id = COALESCE(NULLIF(e.team, ''), k.team_id) {join}"
    ).format(
        key_meta=_column(schema, TOKEN, "k", "metadata"),
        team_meta=_column(schema, TEAM, "t", "metadata"),
        project=sql.SQL("p.project_id" if projects else "NULL"),
        project_meta=_column(schema, PROJECT, "p", "metadata") if projects else sql.SQL("NULL"),
        join=sql.SQL('LEFT JOIN "LiteLLM_ProjectTable" p ON p.project_id = k.project_id' if projects else ""),
    )


def _compose_increment(schema: LedgerSchema, table: str, keys: tuple[str, ...]) -> sql.Composable:
    """A relative increment of one row (`amount`; the key's `last_active` = `now`); a missing row is left alone."""
    sets = [sql.SQL("spend = COALESCE(spend, 0) + %(amount)s")]
    if table in (TOKEN, TEAM_MEMBERSHIP) and schema.has_column(table, "total_spend"):
        sets.append(sql.SQL("total_spend = COALESCE(total_spend, 0) + %(amount)s"))
    if table == TOKEN and schema.has_column(TOKEN, "last_active"):
        sets.append(sql.SQL("last_active = %(now)s"))
    return sql.SQL("UPDATE {} SET {} WHERE {}").format(
        sql.Identifier(table),
        sql.SQL(", ").join(sets),
        sql.SQL(" AND ").join(sql.SQL("{} = {}").format(sql.Identifier(c), sql.Placeholder(c)) for c in keys),
    )


def _compose_daily(schema: LedgerSchema, table: str, fields: tuple[str, ...]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The table's upsert on its probed key and the columns it binds, in order: the key ('' for a key column the
    event does not fill), the other fields the table has, then its counters (added on conflict); `id` (a uuid)
    and `updated_at` when the table has them (LiteLLM_DailyModelUsage is keyed by its columns and has no `id`).
    Nothing when the table or its key is missing."""
    key = schema.daily_keys.get(table)
    if key is None:
        return {}
    columns = [*key, *(c for c in fields if c not in key and schema.has_column(table, c))]
    counters = [c for c in _DAILY_COUNTERS if schema.has_column(table, c) and c not in columns]
    columns += counters
    t = sql.Identifier(table)
    cols: list[sql.Composable] = [sql.Identifier(c) for c in columns]
    vals: list[sql.Composable] = [sql.Placeholder()] * len(columns)
    sets: list[sql.Composable] = [
        sql.SQL("{c} = {t}.{c} + EXCLUDED.{c}").format(c=sql.Identifier(c), t=t) for c in counters
    ]
    if schema.has_column(table, "id"):
        cols.append(sql.Identifier("id"))
        vals.append(sql.SQL("gen_random_uuid()::text"))
    if schema.has_column(table, "updated_at"):
        cols.append(sql.Identifier("updated_at"))
        vals.append(sql.SQL("now() AT TIME ZONE 'UTC'"))
        sets.append(sql.SQL("updated_at = now() AT TIME ZONE 'UTC'"))
    upsert = sql.SQL("INSERT INTO {t} ({cols}) VALUES ({vals}) ON CONFLICT ({key}) DO UPDATE SET {sets}").format(
        t=t,
        cols=sql.SQL(", ").join(cols),
        vals=sql.SQL(", ").join(vals),
        key=sql.SQL(", ").join(map(sql.Identifier, key)),
        sets=sql.SQL(", ").join(sets),
    )
    return {table: (_text(upsert), tuple(columns))}


def _column(schema: LedgerSchema, table: str, alias: str, column: str) -> sql.Composable:
    """`alias.column` when the table has the column, else NULL."""
    if schema.has_column(table, column):
        return sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(column))
    return sql.SQL("NULL")


# ---- owners ---------------------------------------------------------------------------------------------------


def _owners(
    cur: psycopg.Cursor[Any], statements: _Statements, events: Iterable[tuple[UsageEvent, object]]
) -> dict[tuple[str, str, str], _Owners]:
    """The owners of each applied event's key in one read, by (key hash, event team, event user)."""
    wanted = {(e.key_hash, e.team_id, e.user_id) for e, d in events if isinstance(d, Delta)}
    pairs = sorted({(k, t) for k, t, _ in wanted})
    rows = {
        (str(r[0]), str(r[1])): r
        for r in cur.execute(statements.owners, ([k for k, _ in pairs], [t for _, t in pairs])).fetchall()
    }
    found: dict[tuple[str, str, str], _Owners] = {}
    for key_hash, team_id, user_id in wanted:
        row = rows.get((key_hash, team_id))
        if row is None:
            found[(key_hash, team_id, user_id)] = _Owners(False, user_id, team_id, "")
            continue
        user, team = user_id or (row[2] or ""), team_id or (row[3] or "")
        org = row[4] or row[6] or ""
        tags = tuple(dict.fromkeys([*_tags(row[5]), *_tags(row[7]), *_tags(row[9])]))
        found[(key_hash, team_id, user_id)] = _Owners(True, user, team, org, row[8] or "", tags)
    return found


def _tags(metadata: object) -> list[str]:
    """The tags a row's metadata lists (LiteLLM's `metadata.tags`): its non-empty strings, in order."""
    tags = metadata.get("tags") if isinstance(metadata, dict) else None
    return [t for t in tags if isinstance(t, str) and t] if isinstance(tags, list) else []


def _provider(event: UsageEvent) -> str:
    return event.provider_model.split("/", 1)[0] if "/" in event.provider_model else ""


def _naive_utc(moment: datetime) -> datetime:
    """LiteLLM's DateTime columns are `timestamp(3)` without time zone, in UTC."""
    return moment.astimezone(UTC).replace(tzinfo=None)


# ---- rows -----------------------------------------------------------------------------------------------------


def _spend_log_row(statements: _Statements, event: UsageEvent, d: Delta, owners: _Owners) -> list[object]:
    metadata = {
        "source": SOURCE,
        "user_api_key_alias": event.key_alias,
        "user_api_key_team_id": owners.team_id,
        "user_api_key_user_id": owners.user_id,
        "user_api_key_org_id": owners.organization_id,
        "user_api_key_project_id": owners.project_id or None,
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
        "request_tags": Jsonb(list(owners.tags)),
    }
    return [values[c] for c in statements.spend_log_columns]


def _add_spend(batch: _Batch, schema: LedgerSchema, key_hash: str, d: Delta, owners: _Owners) -> None:
    """The rows one charge increments, as the increments LiteLLM makes (a missing row is left alone at write)."""
    user, team, org = owners.user_id, owners.team_id, owners.organization_id
    rows: list[tuple[str, tuple[str, ...]]] = []
    if org:
        rows.append((ORGANIZATION, (org,)))
        if user:
            rows.append((ORGANIZATION_MEMBERSHIP, (user, org)))
    if team:
        rows.append((TEAM, (team,)))
    if user:
        rows.append((USER, (user,)))
    # No end user: a realtime session carries none.
    if team and user:
        rows.append((TEAM_MEMBERSHIP, (user, team)))
    rows.append((TOKEN, (key_hash,)))
    if owners.project_id:  # only set when the schema has projects (_owners)
        rows.append((PROJECT, (owners.project_id,)))
    if TAG in schema.tables:
        rows += [(TAG, (tag,)) for tag in owners.tags]
    for row in rows:
        batch.spend[row] = batch.spend.get(row, Decimal(0)) + d.cost_usd


def _where(table: str, ids: tuple[str, ...]) -> dict[str, str]:
    return dict(zip(_ENTITY_KEYS[table], ids, strict=True))


def _add_daily(batch: _Batch, schema: LedgerSchema, event: UsageEvent, d: Delta, owners: _Owners) -> None:
    """The user, team, organization, tag and model daily rows (no end user: a realtime session has none), summed
    per unique-key row: the first event's fields, every event's counters."""
    ids = {"user_id": owners.user_id, "team_id": owners.team_id, "organization_id": owners.organization_id}
    fields: dict[str, object] = {
        "date": event.started_at.astimezone(UTC).date().isoformat(),
        "api_key": event.key_hash,
        "model": event.model,
        "model_group": event.model,
        "custom_llm_provider": _provider(event),
        "mcp_namespaced_tool_name": "",
        "endpoint": ENDPOINT,
    }
    for table, entity in _DAILY_ENTITIES:
        if entity != "user_id" and not ids[entity]:
            continue  # LiteLLM writes a user row even without a user (''), team and org rows only when set
        _add_daily_row(batch, schema, table, {entity: ids[entity], **fields}, d, sort=(fields["date"], ids[entity]))
    request_id = f"{event.session_id}:{event.seq}"
    for tag in owners.tags:
        row = {"tag": tag, "request_id": request_id, **fields}
        _add_daily_row(batch, schema, _DAILY_TAGS, row, d, sort=(fields["date"], tag))
    model = {
        "date": fields["date"],
        "model_group": event.model,
        "model": event.model,
        "custom_llm_provider": _provider(event) or UNKNOWN_PROVIDER,
        "task_type": task_type(owners.tags, known_tasks()),
    }
    _add_daily_row(batch, schema, _DAILY_MODELS, model, d, sort=(model["date"],))


def _add_daily_row(
    batch: _Batch, schema: LedgerSchema, table: str, fields: dict[str, object], d: Delta, *, sort: tuple[object, ...]
) -> None:
    """Add one event's counters to its row of `table` (nothing when the table or its key is missing). Rows are
    ordered as LiteLLM's `_update_daily_spend` orders its upserts: date, entity, api_key, model, provider."""
    key = schema.daily_keys.get(table)
    if key is None:
        return
    values = {c: fields.get(c, "") for c in key}
    row = batch.daily.get((table, tuple(values.values())))
    if row is None:
        order = (*sort, *(fields.get(c, "") for c in ("api_key", "model", "custom_llm_provider")), *values.values())
        row = batch.daily[(table, tuple(values.values()))] = {
            **fields, **values, "_order": order, "_spend": Decimal(0), "prompt_tokens": 0, "completion_tokens": 0,
            "requests": 0,
        }  # fmt: skip
    row["_spend"] += d.cost_usd
    row["prompt_tokens"] += d.input_tokens
    row["completion_tokens"] += d.output_tokens
    row["requests"] += 1 if d.first else 0


def _daily_values(row: dict[str, Any], columns: tuple[str, ...]) -> list[object]:
    counters = {
        "spend": float(row["_spend"]),
        "api_requests": row["requests"],
        "request_count": row["requests"],
        "successful_requests": row["requests"],
    }
    return [counters[c] if c in counters else row[c] for c in columns]


def task_type(tags: Iterable[str], known: Collection[str]) -> str:
    """LiteLLM's task type for a request with `tags`: the first `task:<name>` with a known name, else the default."""
    for tag in tags:
        if tag.startswith(TASK_TAG_PREFIX) and (name := tag.removeprefix(TASK_TAG_PREFIX)) in known:
            return name
    return TASK_TYPE


@functools.cache
def known_tasks() -> frozenset[str]:
    """The task names the installed litellm knows (read once); none when it has no task list (older versions)."""
    spec = importlib.util.find_spec("litellm")  # locates the package without executing it
    locations = None if spec is None else spec.submodule_search_locations
    if not locations:
        return frozenset()
    try:
        tasks = orjson.loads(Path(next(iter(locations)), *TASKS_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return frozenset()
    return frozenset(name for name in tasks if isinstance(name, str)) if isinstance(tasks, dict) else frozenset()


__all__ = ["ATTEMPTS", "BATCH_MAX", "SINK_SCHEMA", "Outcome", "apply", "apply_many", "ensure_sink_tables"]
