"""The LiteLLM sink's writer: one usage event into LiteLLM's ledger, in one transaction, exactly once.

`apply(conn, schema, event, now=...)` locks the session's marker row (in the sink's own schema
`realtime_sidecar`, never in LiteLLM's `public`), computes the delta since the last applied event
(sidecar.ledger.delta), and when there is one writes, in the same transaction: one immutable
SpendLogs row (`request_id` `<session_id>:<seq>`), relative `spend` increments on the entity rows
that exist, in LiteLLM's own lock order (organization, organization membership, team, user, team
membership, key, project, tags; the team's advisory lock first), the daily upserts on the probed unique keys
(user, team, organization, tag, model), and the advanced marker. A repeat, a late or an older event
finds the marker ahead and writes nothing. `ensure_sink_tables(conn)` creates the sink's schema and
marker table; run it once at start.

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
from collections.abc import Collection, Iterable
from dataclasses import dataclass
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
            owners = _owners(conn, schema, event)
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
        project_id=owners.project_id,
        tags=owners.tags,
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


def _owners(conn: psycopg.Connection[Any], schema: LedgerSchema, event: UsageEvent) -> _Owners:
    """The key's owners and tags in one read: its row, its team's (the event's team, else the key's), its project's."""
    projects = PROJECT in schema.tables and schema.has_column(TOKEN, "project_id")
    row = conn.execute(
        sql.SQL(
            "SELECT k.user_id, k.team_id, k.organization_id, {key_meta}, t.organization_id, {team_meta},"
            " {project}, {project_meta}"
            ' FROM "LiteLLM_VerificationToken" k LEFT JOIN "LiteLLM_TeamTable" t'
            " ON t.team_id = COALESCE(NULLIF(%s, ''), k.team_id) {join} WHERE k.token = %s"
        ).format(
            key_meta=_column(schema, TOKEN, "k", "metadata"),
            team_meta=_column(schema, TEAM, "t", "metadata"),
            project=sql.SQL("p.project_id" if projects else "NULL"),
            project_meta=_column(schema, PROJECT, "p", "metadata") if projects else sql.SQL("NULL"),
            join=sql.SQL('LEFT JOIN "LiteLLM_ProjectTable" p ON p.project_id = k.project_id' if projects else ""),
        ),
        (event.team_id, event.key_hash),
    ).fetchone()
    if row is None:
        return _Owners(False, event.user_id, event.team_id, "")
    user_id, team_id = event.user_id or (row[0] or ""), event.team_id or (row[1] or "")
    org = row[2] or row[4] or ""
    tags = tuple(dict.fromkeys([*_tags(row[3]), *_tags(row[5]), *_tags(row[7])]))
    return _Owners(True, user_id, team_id, org, row[6] or "", tags)


def _column(schema: LedgerSchema, table: str, alias: str, column: str) -> sql.Composable:
    """`alias.column` when the table has the column, else NULL."""
    if schema.has_column(table, column):
        return sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(column))
    return sql.SQL("NULL")


def _tags(metadata: object) -> list[str]:
    """The tags a row's metadata lists (LiteLLM's `metadata.tags`): its non-empty strings, in order."""
    tags = metadata.get("tags") if isinstance(metadata, dict) else None
    return [t for t in tags if isinstance(t, str) and t] if isinstance(tags, list) else []


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
    if owners.project_id:  # only set when the schema has projects (_owners)
        _increment(conn, PROJECT, spend, {"project_id": owners.project_id})
    if TAG in schema.tables:  # after the key, as LiteLLM commits them; sorted, so two writers lock alike
        for tag in sorted(owners.tags):
            _increment(conn, TAG, spend, {"tag_name": tag})


_DAILY_ENTITIES: Final = (
    ("LiteLLM_DailyUserSpend", "user_id"),
    ("LiteLLM_DailyTeamSpend", "team_id"),
    ("LiteLLM_DailyOrganizationSpend", "organization_id"),
)
_DAILY_TAGS: Final = "LiteLLM_DailyTagSpend"
_DAILY_MODELS: Final = "LiteLLM_DailyModelUsage"
_DAILY_COUNTERS: Final = (
    "prompt_tokens", "completion_tokens", "spend", "api_requests", "request_count", "successful_requests",
)  # fmt: skip


def _upsert_daily(
    conn: psycopg.Connection[Any], schema: LedgerSchema, event: UsageEvent, d: Delta, owners: _Owners
) -> None:
    """The user, team, organization, tag and model daily rows (no end user: a realtime session has none)."""
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
        _upsert_daily_row(conn, schema, table, {entity: ids[entity], **fields}, d)
    request_id = f"{event.session_id}:{event.seq}"
    for tag in sorted(owners.tags):
        _upsert_daily_row(conn, schema, _DAILY_TAGS, {"tag": tag, "request_id": request_id, **fields}, d)
    model = {
        "date": fields["date"],
        "model_group": event.model,
        "model": event.model,
        "custom_llm_provider": _provider(event) or UNKNOWN_PROVIDER,
        "task_type": task_type(owners.tags, known_tasks()),
    }
    _upsert_daily_row(conn, schema, _DAILY_MODELS, model, d)


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


def _upsert_daily_row(
    conn: psycopg.Connection[Any], schema: LedgerSchema, table: str, fields: dict[str, object], d: Delta
) -> None:
    """One daily row on the table's probed key ('' for a key column the event does not fill); skipped when
    the table or its key is missing. Columns the table lacks are left out."""
    key = schema.daily_keys.get(table)
    if key is None:
        return
    row: dict[str, object] = {c: fields.get(c, "") for c in key}
    row |= {c: v for c, v in fields.items() if c not in row and schema.has_column(table, c)}
    requests = 1 if d.first else 0
    counters = {
        "prompt_tokens": d.input_tokens,
        "completion_tokens": d.output_tokens,
        "spend": float(d.cost_usd),
        "api_requests": requests,
        "request_count": requests,
        "successful_requests": requests,
    }
    row |= {c: v for c, v in counters.items() if schema.has_column(table, c)}
    _upsert(conn, schema, table, key, row, [c for c in _DAILY_COUNTERS if c in row])


def _upsert(
    conn: psycopg.Connection[Any],
    schema: LedgerSchema,
    table: str,
    key: tuple[str, ...],
    row: dict[str, object],
    counters: list[str],
) -> None:
    """INSERT ... ON CONFLICT (key) DO UPDATE adding `counters`; `id` (a uuid) and `updated_at` when the table
    has them (LiteLLM_DailyModelUsage is keyed by its columns and has no `id`)."""
    t = sql.Identifier(table)
    cols: list[sql.Composable] = [sql.Identifier(c) for c in row]
    vals: list[sql.Composable] = [sql.Placeholder()] * len(row)
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
    conn.execute(
        sql.SQL("INSERT INTO {t} ({cols}) VALUES ({vals}) ON CONFLICT ({key}) DO UPDATE SET {sets}").format(
            t=t,
            cols=sql.SQL(", ").join(cols),
            vals=sql.SQL(", ").join(vals),
            key=sql.SQL(", ").join(map(sql.Identifier, key)),
            sets=sql.SQL(", ").join(sets),
        ),
        list(row.values()),
    )


__all__ = ["ATTEMPTS", "SINK_SCHEMA", "Outcome", "apply", "ensure_sink_tables"]
