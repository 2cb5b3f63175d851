"""What the LiteLLM sink finds in LiteLLM's database: tables, optional columns, daily upsert keys.

LiteLLM's schema moves between versions (its Prisma migrations add columns and twice widened the
daily tables' unique key: 5, 6, then 7 columns), so the sink reads what is there instead of assuming.
`probe(conn)` is the only function here that does I/O: three catalog queries, their rows handed to
the pure `build_schema`. `missing_required` names what the sink cannot work without, so it can refuse
with that list instead of failing half-way through a transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import psycopg

SPEND_LOGS = "LiteLLM_SpendLogs"
TOKEN = "LiteLLM_VerificationToken"
TEAM = "LiteLLM_TeamTable"
USER = "LiteLLM_UserTable"
ORGANIZATION = "LiteLLM_OrganizationTable"
TEAM_MEMBERSHIP = "LiteLLM_TeamMembership"
ORGANIZATION_MEMBERSHIP = "LiteLLM_OrganizationMembership"
END_USER = "LiteLLM_EndUserTable"
TAG = "LiteLLM_TagTable"
PROJECT = "LiteLLM_ProjectTable"

# The tables the sink writes on every applied event: without one of them it refuses to start.
REQUIRED_TABLES: tuple[str, ...] = (
    SPEND_LOGS,
    TOKEN,
    TEAM,
    USER,
    ORGANIZATION,
    TEAM_MEMBERSHIP,
    ORGANIZATION_MEMBERSHIP,
    END_USER,
)
# Entity tables written when present (newer LiteLLM versions): a key's project and each tag of its requests
# have a `spend` (their budgets) that rises with the key's requests.
OPTIONAL_TABLES: tuple[str, ...] = (PROJECT, TAG)
# Daily rollups, written when present (older schemas lack some; LiteLLM_DailyModelUsage is recent, and its
# upsert key is its primary key (date, model_group, model, custom_llm_provider, task_type): the probe reads
# primary keys as unique keys, so `daily_key` finds it like the others' unique indexes).
DAILY_TABLES: tuple[str, ...] = (
    "LiteLLM_DailyUserSpend",
    "LiteLLM_DailyTeamSpend",
    "LiteLLM_DailyOrganizationSpend",
    "LiteLLM_DailyEndUserSpend",
    "LiteLLM_DailyTagSpend",
    "LiteLLM_DailyModelUsage",
)
# Columns the sink needs in the tables it writes: a missing one is refused like a missing table.
REQUIRED_COLUMNS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        SPEND_LOGS: ("request_id", "call_type", "api_key", "spend", "startTime", "endTime"),
        TOKEN: ("token", "spend"),
        TEAM: ("team_id", "spend"),
        USER: ("user_id", "spend"),
        ORGANIZATION: ("organization_id", "spend"),
        TEAM_MEMBERSHIP: ("user_id", "team_id", "spend"),
        ORGANIZATION_MEMBERSHIP: ("user_id", "organization_id", "spend"),
        END_USER: ("user_id", "spend"),
    }
)
# Columns written only when the schema has them (newer LiteLLM versions added them).
OPTIONAL_COLUMNS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        SPEND_LOGS: ("session_id", "request_tags"),
        TOKEN: ("total_spend", "last_active", "metadata", "project_id"),
        TEAM: ("metadata",),
        TEAM_MEMBERSHIP: ("total_spend",),
        PROJECT: ("metadata",),
    }
)
# The column every daily upsert key contains: it tells the upsert key from other unique indexes.
_DAILY_KEY_COLUMN = "date"

_TABLES_SQL = """
SELECT c.relname, c.relkind::text
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p') AND c.relname = ANY(%(names)s)
"""
_COLUMNS_SQL = """
SELECT table_name, column_name FROM information_schema.columns
WHERE table_schema = %(schema)s AND table_name = ANY(%(names)s)
"""
# Valid, non-partial unique indexes (primary keys included) whose every key is a plain column, with
# their columns in key order: only those can be an ON CONFLICT target the way LiteLLM writes it.
_UNIQUE_KEYS_SQL = """
SELECT t.relname, i.relname,
       array_agg(a.attname::text ORDER BY k.ord) AS columns
FROM pg_index x
JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_class t ON t.oid = x.indrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
CROSS JOIN LATERAL unnest(x.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum
WHERE n.nspname = %(schema)s AND t.relname = ANY(%(names)s)
  AND x.indisunique AND x.indisvalid AND x.indpred IS NULL AND x.indexprs IS NULL
  AND k.ord <= x.indnkeyatts
GROUP BY t.relname, i.relname
"""


@dataclass(frozen=True, slots=True)
class LedgerSchema:
    """What a LiteLLM database holds of what the sink needs.

    `tables` are the sink's tables found; `columns` maps each found table to its column names;
    `daily_keys` maps each daily table found to its upsert key (columns in index order) or `None`
    when it has no unique index including `date` (then the sink cannot upsert it and skips it);
    `spend_logs_key` is SpendLogs' narrowest unique key holding `request_id`: (`request_id`,) as
    Prisma makes it, (`request_id`, `startTime`) on a partitioned install (a partitioned table's keys
    must include its partition column), `None` if it has none (then ON CONFLICT cannot dedupe rows);
    `spend_logs_partitioned` is true when SpendLogs is a partitioned table.
    """

    tables: frozenset[str]
    columns: Mapping[str, frozenset[str]] = field(default_factory=dict)
    daily_keys: Mapping[str, tuple[str, ...] | None] = field(default_factory=dict)
    spend_logs_key: tuple[str, ...] | None = None
    spend_logs_partitioned: bool = False

    def has_column(self, table: str, column: str) -> bool:
        """True when `table` exists and has `column`."""
        return column in self.columns.get(table, frozenset())

    def optional_columns(self, table: str) -> frozenset[str]:
        """The optional columns (OPTIONAL_COLUMNS) that `table` has."""
        return frozenset(c for c in OPTIONAL_COLUMNS.get(table, ()) if self.has_column(table, c))


def build_schema(
    tables: Iterable[tuple[str, str]],
    columns: Iterable[tuple[str, str]],
    unique_keys: Iterable[tuple[str, str, list[str]]],
) -> LedgerSchema:
    """The schema from catalog rows: (table, relkind), (table, column), (table, index, columns)."""
    kinds = dict(tables)
    by_table: dict[str, set[str]] = {name: set() for name in kinds}
    for table, column in columns:
        by_table.setdefault(table, set()).add(column)
    keys: dict[str, list[tuple[str, ...]]] = {}
    for table, _index, cols in unique_keys:
        keys.setdefault(table, []).append(tuple(cols))
    return LedgerSchema(
        tables=frozenset(kinds),
        columns=MappingProxyType({t: frozenset(c) for t, c in by_table.items() if t in kinds}),
        daily_keys=MappingProxyType({t: daily_key(keys.get(t, ())) for t in DAILY_TABLES if t in kinds}),
        spend_logs_key=spend_logs_key(keys.get(SPEND_LOGS, ())),
        spend_logs_partitioned=kinds.get(SPEND_LOGS) == "p",
    )


def daily_key(unique_keys: Iterable[tuple[str, ...]]) -> tuple[str, ...] | None:
    """A daily table's upsert key among its unique keys: the widest one that includes `date`.

    The widest, because LiteLLM widened the key by dropping the old index and creating a wider one:
    were both ever present, the narrower would still hold and the wider is the one LiteLLM targets.
    """
    dated = [key for key in unique_keys if _DAILY_KEY_COLUMN in key]
    return max(dated, key=len) if dated else None


def spend_logs_key(unique_keys: Iterable[tuple[str, ...]]) -> tuple[str, ...] | None:
    """SpendLogs' row key among its unique keys: the narrowest one that includes `request_id`."""
    keyed = [key for key in unique_keys if "request_id" in key]
    return min(keyed, key=len) if keyed else None


def missing_required(schema: LedgerSchema) -> list[str]:
    """What the sink cannot work without, one human-readable item each (empty when nothing is missing)."""
    missing: list[str] = []
    for table in REQUIRED_TABLES:
        if table not in schema.tables:
            missing.append(f"table {table}")
            continue
        missing += [f"column {table}.{c}" for c in REQUIRED_COLUMNS[table] if not schema.has_column(table, c)]
    return missing


def probe(conn: psycopg.Connection[Any], *, schema: str = "public") -> LedgerSchema:
    """Read the sink's tables, their columns and the daily upsert keys from the live catalog.

    Runs three read-only catalog queries on `conn` (a psycopg 3 connection to LiteLLM's database; when
    it is not in autocommit they run in the caller's transaction, which the caller ends). psycopg's
    errors propagate: the caller tells a database that is down from one that refuses us.
    """
    names = [*REQUIRED_TABLES, *OPTIONAL_TABLES, *DAILY_TABLES]
    params = {"schema": schema, "names": names}
    with conn.cursor() as cur:
        cur.execute(_TABLES_SQL, params)
        tables = [(str(r[0]), str(r[1])) for r in cur.fetchall()]
        cur.execute(_COLUMNS_SQL, params)
        columns = [(str(r[0]), str(r[1])) for r in cur.fetchall()]
        cur.execute(_UNIQUE_KEYS_SQL, params)
        unique_keys = [(str(r[0]), str(r[1]), [str(c) for c in r[2]]) for r in cur.fetchall()]
    return build_schema(tables, columns, unique_keys)
