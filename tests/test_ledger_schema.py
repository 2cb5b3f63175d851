"""LiteLLM's real schema for the ledger sink's tests: the litellm-proxy-extras migrations and seeded rows."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from tests.litellm_schema import key_hash, migration_files, seed_principal


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
