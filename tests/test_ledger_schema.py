"""The LiteLLM sink's schema probe against LiteLLM's real schema (litellm-proxy-extras migrations)."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from sidecar.ledger.schema import (
    DAILY_TABLES,
    OPTIONAL_TABLES,
    REQUIRED_TABLES,
    SPEND_LOGS,
    TEAM,
    TEAM_MEMBERSHIP,
    TOKEN,
    LedgerSchema,
    build_schema,
    daily_key,
    missing_required,
    probe,
)
from tests.litellm_schema import key_hash, migration_files, seed_principal, unique_keys_in_migrations


@pytest.fixture
def conn(litellm_db: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """An autocommit connection to a fresh copy of LiteLLM's schema."""
    with psycopg.connect(litellm_db, autocommit=True) as c:
        yield c


def test_the_fixture_applies_every_shipped_migration(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """The clone holds LiteLLM's whole schema: every shipped migration applied, about a hundred tables."""
    count = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
    assert len(migration_files()) > 200
    assert count is not None and count[0] >= 100


def test_every_required_table_is_found(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """On the current schema the probe finds every table the sink needs, and misses nothing."""
    schema = probe(conn)
    assert set(REQUIRED_TABLES) <= schema.tables
    assert set(DAILY_TABLES) <= schema.tables
    assert set(OPTIONAL_TABLES) <= schema.tables
    assert missing_required(schema) == []
    assert not schema.spend_logs_partitioned
    assert schema.spend_logs_key == ("request_id",)


def test_optional_columns_of_the_current_schema_are_found(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """The newer optional columns (token total_spend and last_active, SpendLogs session_id and request_tags, key
    and team metadata) are probed as present."""
    schema = probe(conn)
    assert schema.optional_columns(TOKEN) == {"total_spend", "last_active", "metadata", "project_id"}
    assert schema.optional_columns(SPEND_LOGS) == {"session_id", "request_tags"}
    assert schema.optional_columns(TEAM) == {"metadata"}
    assert schema.optional_columns(TEAM_MEMBERSHIP) == {"total_spend"}


def test_daily_keys_match_the_migration_files(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Each daily table's upsert key read from the live index is the one the migrations' SQL leaves standing."""
    schema = probe(conn)
    expected = unique_keys_in_migrations()
    for table in DAILY_TABLES:
        assert schema.daily_keys[table] == daily_key(expected[table]), table
    assert schema.daily_keys["LiteLLM_DailyUserSpend"] == (
        "user_id", "date", "api_key", "model", "custom_llm_provider", "mcp_namespaced_tool_name", "endpoint"
    )  # fmt: skip
    # LiteLLM_DailyModelUsage has no unique index: its primary key is its upsert key.
    assert schema.daily_keys["LiteLLM_DailyModelUsage"] == (
        "date", "model_group", "model", "custom_llm_provider", "task_type"
    )  # fmt: skip


def test_a_dropped_optional_column_is_probed_absent(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """An older schema without the token's last_active is probed without it, and nothing required is missing."""
    conn.execute('ALTER TABLE "LiteLLM_VerificationToken" DROP COLUMN last_active')
    schema = probe(conn)
    assert schema.optional_columns(TOKEN) == {"total_spend", "metadata", "project_id"}
    assert not schema.has_column(TOKEN, "last_active")
    assert missing_required(schema) == []


def test_a_dropped_required_table_is_named(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """A schema without LiteLLM_TeamMembership is refused with that table named."""
    conn.execute('DROP TABLE "LiteLLM_TeamMembership" CASCADE')
    schema = probe(conn)
    assert TEAM_MEMBERSHIP not in schema.tables
    assert missing_required(schema) == ["table LiteLLM_TeamMembership"]


def test_a_dropped_required_column_is_named(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """A team table without its spend column is refused with that column named."""
    conn.execute('ALTER TABLE "LiteLLM_TeamTable" DROP COLUMN spend')
    assert missing_required(probe(conn)) == [f"column {TEAM}.spend"]


def test_a_narrower_daily_key_is_read_as_it_is(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """A daily table whose unique index is the older 5-column key is probed with those 5 columns."""
    conn.execute('DROP INDEX "LiteLLM_DailyTeamSpend_team_id_date_api_key_model_custom_ll_key"')
    conn.execute(
        'CREATE UNIQUE INDEX "old_team_key" ON "LiteLLM_DailyTeamSpend"'
        " (team_id, date, api_key, model, custom_llm_provider)"
    )
    schema = probe(conn)
    assert schema.daily_keys["LiteLLM_DailyTeamSpend"] == ("team_id", "date", "api_key", "model", "custom_llm_provider")


def test_a_daily_table_without_a_dated_unique_key_has_none(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """A daily table whose upsert index is gone is probed with key None (the sink cannot upsert it)."""
    conn.execute('DROP INDEX "LiteLLM_DailyTagSpend_tag_date_api_key_model_custom_llm_pro_key"')
    assert probe(conn).daily_keys["LiteLLM_DailyTagSpend"] is None


def test_a_partitioned_spend_logs_is_detected(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """A SpendLogs made a partitioned table (key request_id, startTime) is probed as partitioned."""
    conn.execute('DROP TABLE "LiteLLM_SpendLogs" CASCADE')
    conn.execute(
        'CREATE TABLE "LiteLLM_SpendLogs" (request_id TEXT, call_type TEXT, api_key TEXT, spend FLOAT8,'
        ' "startTime" TIMESTAMP(3), "endTime" TIMESTAMP(3), PRIMARY KEY (request_id, "startTime"))'
        ' PARTITION BY RANGE ("startTime")'
    )
    schema = probe(conn)
    assert schema.spend_logs_partitioned
    assert schema.spend_logs_key == ("request_id", "startTime")
    assert missing_required(schema) == []


def test_an_empty_database_misses_every_required_table() -> None:
    """With no LiteLLM tables at all, every required table is named, in a stable order."""
    schema = build_schema([], [], [])
    assert missing_required(schema) == [f"table {t}" for t in REQUIRED_TABLES]
    assert schema.daily_keys == {}
    assert schema.spend_logs_key is None


def test_the_probe_result_is_frozen() -> None:
    """LedgerSchema cannot be changed after the probe (it is shared by the sink's workers)."""
    schema = LedgerSchema(tables=frozenset())
    with pytest.raises(AttributeError):
        schema.tables = frozenset({"x"})  # type: ignore[misc]


def test_seeded_principal_is_found_by_key_hash(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """The seeded key is found by the sidecar's key hash with its user, team and organization, all at spend 0."""
    p = seed_principal(conn, key="sk-abc123")
    row = conn.execute(
        "SELECT t.user_id, t.team_id, t.organization_id, t.spend, tm.spend, om.spend, o.spend, u.spend, tt.spend"
        ' FROM "LiteLLM_VerificationToken" t'
        ' JOIN "LiteLLM_TeamTable" tt ON tt.team_id = t.team_id'
        ' JOIN "LiteLLM_UserTable" u ON u.user_id = t.user_id'
        ' JOIN "LiteLLM_OrganizationTable" o ON o.organization_id = t.organization_id'
        ' JOIN "LiteLLM_TeamMembership" tm ON tm.user_id = t.user_id AND tm.team_id = t.team_id'
        ' JOIN "LiteLLM_OrganizationMembership" om'
        "   ON om.user_id = t.user_id AND om.organization_id = t.organization_id"
        " WHERE t.token = %s",
        (key_hash("sk-abc123"),),
    ).fetchone()
    assert p.key_hash == key_hash("sk-abc123")
    assert row == (p.user_id, p.team_id, p.organization_id, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
