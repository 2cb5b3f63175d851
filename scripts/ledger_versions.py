"""Which LiteLLM versions the ledger sink covers: its writer run against each version's real schema.

For each `litellm-proxy-extras` version given (default: one per schema era, from LiteLLM 1.70 to the newest
the registry serves), downloads the wheel from PyPI with pip into a cache folder, builds that version's schema
from its Prisma migrations in a scratch PostgreSQL database (as tests/conftest.py does for the installed one),
seeds a key, team, user and organization, then applies a session's checkpoints and final event (with a
duplicate and a late checkpoint) through `sidecar.ledger.apply`, and checks SpendLogs and every entity's
`spend` against the final `cost_usd`. Prints one row per version; exit status 1 if any version fails.

    .venv/bin/python scripts/ledger_versions.py [VERSION ...] [--dsn postgresql://postgres@127.0.0.1:5432/postgres]

Needs pip's access to PyPI and a PostgreSQL that lets the user create databases (trust auth here).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import psycopg

from sidecar.ledger import apply, ensure_sink_tables, missing_required, probe
from sidecar.ledger.schema import OPTIONAL_COLUMNS
from sidecar.testing.factories import usage_event
from sidecar.testing.litellm_schema import seed_principal

# One version per schema era: LiteLLM 1.70 (5-column daily keys), 1.74 and 1.79 (6), 1.80 and later (7).
DEFAULT_VERSIONS = ("0.1.21", "0.2.6", "0.2.29", "0.4.5", "0.4.50", "0.4.100", "0.4.110")
CACHE = Path(tempfile.gettempdir()) / "realtime-sidecar-proxy-extras"


@dataclass
class Row:
    version: str
    migrations: int
    daily_key: str
    missing_optional: str
    spend_logs: str
    entities: str
    ok: bool


def wheel(version: str) -> Path:
    """The cached wheel of litellm-proxy-extras `version`, downloaded with pip when missing."""
    folder = CACHE / version
    found = sorted(folder.glob("litellm_proxy_extras-*.whl"))
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                f"litellm-proxy-extras=={version}",
                "-d",
                str(folder),
            ],
            check=True,
        )
        found = sorted(folder.glob("litellm_proxy_extras-*.whl"))
    return found[0]


def migrations(path: Path) -> list[str]:
    """The wheel's migration.sql files, in name order (as Prisma applies them)."""
    with zipfile.ZipFile(path) as archive:
        names = sorted(n for n in archive.namelist() if n.endswith("/migration.sql") and "/migrations/" in n)
        return [archive.read(n).decode() for n in names]


def check(version: str, admin_dsn: str) -> Row:
    name = f"ledger_versions_{version.replace('.', '_')}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = psycopg.conninfo.make_conninfo(admin_dsn, dbname=name)
    try:
        files = migrations(wheel(version))
        with psycopg.connect(dsn, autocommit=True) as conn:
            for text in files:
                conn.execute(text)  # whole file, simple protocol: `$$` bodies and CONCURRENTLY as Prisma runs them
        with psycopg.connect(dsn) as conn:
            schema = probe(conn)
            conn.commit()
            if missing := missing_required(schema):
                return Row(version, len(files), "-", "-", "-", f"missing: {', '.join(missing)}", False)
            ensure_sink_tables(conn)
            p = seed_principal(conn)
            now = datetime.now(UTC)
            events = [
                usage_event("s-1", seq, final=seq == 3).with_changes(
                    key_hash=p.key_hash, user_id=p.user_id, team_id=p.team_id, key_alias=p.key_alias
                )
                for seq in (1, 2, 3)
            ]
            for event in (*events, events[2], events[0]):  # a duplicate final and a late checkpoint
                apply(conn, schema, event, now=now)
            final = events[2].cost_usd
            logs = conn.execute(
                'SELECT count(*), COALESCE(sum(spend), 0) FROM "LiteLLM_SpendLogs" WHERE request_id LIKE %s', ("s-1:%",)
            ).fetchone()
            assert logs is not None
            spends = {
                table: conn.execute(f'SELECT spend FROM "{table}" WHERE {col} = %s', (value,)).fetchone()
                for table, col, value in (
                    ("LiteLLM_VerificationToken", "token", p.key_hash),
                    ("LiteLLM_TeamTable", "team_id", p.team_id),
                    ("LiteLLM_UserTable", "user_id", p.user_id),
                    ("LiteLLM_OrganizationTable", "organization_id", p.organization_id),
                )
            }
            conn.rollback()
        entities_ok = all(r is not None and abs(Decimal(str(r[0])) - final) < Decimal("1e-9") for r in spends.values())
        logs_ok = logs[0] == 3 and abs(Decimal(str(logs[1])) - final) < Decimal("1e-9")
        daily = schema.daily_keys.get("LiteLLM_DailyUserSpend")
        return Row(
            version,
            len(files),
            f"{len(daily)} columns" if daily else "none",
            ", ".join(
                f"{table}.{column}"
                for table, columns in sorted(OPTIONAL_COLUMNS.items())
                for column in columns
                if column not in schema.optional_columns(table)
            )
            or "none",
            f"{logs[0]} rows, ${Decimal(str(logs[1])):.6f}",
            "exact" if entities_ok else "WRONG",
            entities_ok and logs_ok,
        )
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("versions", nargs="*", default=list(DEFAULT_VERSIONS))
    args.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    opts = args.parse_args()
    rows = [check(v, opts.dsn) for v in opts.versions]
    head = (
        "litellm-proxy-extras",
        "migrations",
        "daily user key",
        "optional columns absent",
        "SpendLogs",
        "spend",
        "ok",
    )
    print("| " + " | ".join(head) + " |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = (
            r.version,
            r.migrations,
            r.daily_key,
            r.missing_optional,
            r.spend_logs,
            r.entities,
            "yes" if r.ok else "NO",
        )
        print("| " + " | ".join(map(str, cells)) + " |")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
