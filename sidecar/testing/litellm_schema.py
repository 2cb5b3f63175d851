"""LiteLLM's real schema in a scratch PostgreSQL database, and rows seeded the way LiteLLM writes them.

The schema comes from the `litellm-proxy-extras` wheel (a dev dependency): its Prisma migrations,
`migrations/<timestamp>_<name>/migration.sql`, applied in name order as the proxy's own migrate step
does. Each file is executed whole, in autocommit: psycopg sends a parameterless query with the simple
protocol, which takes many statements (and `$$` bodies) at once, and a file holding one
`CREATE INDEX CONCURRENTLY` then runs outside a transaction block as it must. No file is split on `;`.

Building takes 0.5-1.1 s here (220 migrations); cloning a built database with `CREATE DATABASE ... TEMPLATE`
about 0.06 s, so the test session builds one template and each test gets a clone (tests/conftest.py).
Shipped in `sidecar.testing` so that the ledger benchmark (bench/ledger.py) builds the same schema;
`litellm-proxy-extras` is a dev dependency, looked up only when a function here runs.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb


def migration_files() -> list[Path]:
    """Every migration.sql the installed litellm-proxy-extras ships, in the order Prisma applies them."""
    root = Path(str(resources.files("litellm_proxy_extras") / "migrations"))
    return sorted(d / "migration.sql" for d in root.iterdir() if (d / "migration.sql").is_file())


def apply_migrations(dsn: str) -> int:
    """Build LiteLLM's schema in the (empty) database at `dsn`; returns how many migrations ran."""
    files = migration_files()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for path in files:
            conn.execute(path.read_text())  # no params: sent as-is (simple protocol), whole file in one go
    return len(files)


_UNIQUE_INDEX = re.compile(
    r'CREATE UNIQUE INDEX (?:IF NOT EXISTS )?"(?P<index>[^"]+)" ON "(?P<table>[^"]+)"\s*\((?P<cols>[^)]*)\)'
)
_DROP_INDEX = re.compile(r'DROP INDEX (?:IF EXISTS )?"(?P<index>[^"]+)"')
_PRIMARY_KEY = re.compile(r'CONSTRAINT "(?P<table>[^"]+)_pkey" PRIMARY KEY \((?P<cols>[^)]*)\)')


def unique_keys_in_migrations() -> dict[str, set[tuple[str, ...]]]:
    """Each table's unique keys (unique indexes and primary keys) left standing after every migration.

    Read from the SQL text, independently of the database: what the probe reads live must match it.
    """
    indexes: dict[str, tuple[str, tuple[str, ...]]] = {}
    for path in migration_files():
        for line in path.read_text().splitlines():
            if m := _DROP_INDEX.search(line):
                indexes.pop(m["index"], None)
            elif m := _UNIQUE_INDEX.search(line):
                indexes[m["index"]] = (m["table"], _columns(m["cols"]))
            elif m := _PRIMARY_KEY.search(line):
                indexes[f"{m['table']}_pkey"] = (m["table"], _columns(m["cols"]))
    keys: dict[str, set[tuple[str, ...]]] = {}
    for table, cols in indexes.values():
        keys.setdefault(table, set()).add(cols)
    return keys


def _columns(text: str) -> tuple[str, ...]:
    return tuple(c.strip().strip('"') for c in text.split(","))


def key_hash(key: str) -> str:
    """The token LiteLLM stores for a key: sha256 hex, as the sidecar's `key_hash`."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """A key with its user, team and organization, as seeded."""

    key: str
    key_hash: str
    key_alias: str
    user_id: str
    team_id: str
    organization_id: str
    budget_id: str


def seed_principal(
    conn: psycopg.Connection[Any],
    *,
    key: str = "sk-ledger-test",
    key_alias: str = "ledger-key",
    user_id: str = "user-1",
    team_id: str = "team-1",
    organization_id: str = "org-1",
) -> Principal:
    """An organization (with its budget row), a team in it, a user in both, and a key owned by all three.

    As LiteLLM's /organization/new, /team/new, /user/new and /key/generate leave them: the organization
    points at a LiteLLM_BudgetTable row (required), the team lists the user in `members_with_roles`, the
    user lists the team in `teams`, membership rows join them, and the key's `token` is the sha256 hex.
    Every `spend` starts at 0 (the column default). Committed before returning.
    """
    budget_id = f"budget-{organization_id}"
    p = Principal(key, key_hash(key), key_alias, user_id, team_id, organization_id, budget_id)
    with conn.transaction():
        conn.execute(
            'INSERT INTO "LiteLLM_BudgetTable" (budget_id, created_by, updated_by) VALUES (%s, %s, %s)',
            (budget_id, user_id, user_id),
        )
        conn.execute(
            'INSERT INTO "LiteLLM_OrganizationTable" (organization_id, organization_alias, budget_id, models,'
            " created_by, updated_by) VALUES (%s, %s, %s, %s, %s, %s)",
            (organization_id, organization_id, budget_id, [], user_id, user_id),
        )
        conn.execute(
            'INSERT INTO "LiteLLM_TeamTable" (team_id, team_alias, organization_id, admins, members,'
            " members_with_roles, models) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (team_id, team_id, organization_id, [], [], Jsonb([{"role": "user", "user_id": user_id}]), []),
        )
        conn.execute(
            'INSERT INTO "LiteLLM_UserTable" (user_id, user_role, teams, organization_id, models)'
            " VALUES (%s, %s, %s, %s, %s)",
            (user_id, "internal_user", [team_id], organization_id, []),
        )
        conn.execute('INSERT INTO "LiteLLM_TeamMembership" (user_id, team_id) VALUES (%s, %s)', (user_id, team_id))
        conn.execute(
            'INSERT INTO "LiteLLM_OrganizationMembership" (user_id, organization_id, user_role) VALUES (%s, %s, %s)',
            (user_id, organization_id, "internal_user"),
        )
        conn.execute(
            'INSERT INTO "LiteLLM_VerificationToken" (token, key_name, key_alias, user_id, team_id,'
            " organization_id, models) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (p.key_hash, f"sk-...{key[-4:]}", key_alias, user_id, team_id, organization_id, []),
        )
    return p
