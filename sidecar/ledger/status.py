"""`sidecar ledger status`: how far each consumer group of the usage stream is, and what the LiteLLM sink wrote.

`stream_status` reads Redis (XINFO GROUPS, XPENDING, the dead-letter stream); `ledger_status` reads LiteLLM's
database (the sink's marker table and a schema probe); `format_status` renders both for a terminal. Nothing
here writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import psycopg
import redis.asyncio as aioredis

from sidecar.ledger.schema import OPTIONAL_COLUMNS, missing_required, probe
from sidecar.ledger.writer import MARKERS, SINK_SCHEMA
from sidecar.redis_keys import dead_stream, is_cluster

DEAD_SCAN: Final = 1000
"""Dead letters read per XRANGE call while counting them by group."""


@dataclass(frozen=True)
class GroupStatus:
    """One consumer group: absent (`exists` false), or its lag, pending count, oldest pending entry's age."""

    group: str
    exists: bool
    lag: int | None = None
    pending: int = 0
    oldest_pending_age_s: float | None = None
    dead_letters: int = 0


@dataclass(frozen=True)
class LedgerStatus:
    """What the LiteLLM sink left in LiteLLM's database, and what its schema lacks."""

    sessions_applied: int
    last_applied_at: str | None
    missing_required: list[str] = field(default_factory=list)
    missing_optional: list[str] = field(default_factory=list)


async def stream_status(
    redis: aioredis.Redis, stream: str, groups: Sequence[str], *, now: datetime
) -> list[GroupStatus]:
    """Each group's figures; dead letters are counted by their `group` field (older ones, without it, by
    `billing`, the only group that buried before). Raises redis-py's errors."""
    found = {_text(g["name"]): g for g in await redis.xinfo_groups(stream)} if await redis.exists(stream) else {}
    dead = await _dead_letters(redis, dead_stream(stream, cluster=is_cluster(redis)))
    result = []
    for name in groups:
        info = found.get(name)
        if info is None:
            result.append(GroupStatus(name, exists=False, dead_letters=dead.get(name, 0)))
            continue
        age = None
        if info["pending"]:
            oldest = (await redis.xpending(stream, name))["min"]
            if oldest is not None:
                age = max(0.0, now.timestamp() - int(_text(oldest).split("-")[0]) / 1000)
        lag = info.get("lag")
        result.append(GroupStatus(name, True, lag, int(info["pending"]), age, dead.get(name, 0)))
    return result


async def _dead_letters(redis: aioredis.Redis, dead_stream: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    start = "-"
    while entries := await redis.xrange(dead_stream, min=start, count=DEAD_SCAN):
        for _, fields in entries:
            named = fields.get(b"group") if fields else None
            group = _text(named) if isinstance(named, (bytes, str)) and named else "billing"
            counts[group] = counts.get(group, 0) + 1
        start = "(" + _text(entries[-1][0] or b"")
    return counts


def ledger_status(conn: psycopg.Connection[Any], *, namespace: str = "public") -> LedgerStatus:
    """The sink's marker table (sessions applied, the last time one advanced) and a probe of LiteLLM's schema
    in `namespace`. Raises psycopg's errors."""
    table = f"{SINK_SCHEMA}.{MARKERS}"
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
    sessions, last = 0, None
    if row is not None and row[0]:
        counted = conn.execute(f"SELECT count(*), max(updated_at) FROM {table}").fetchone()
        if counted is not None:
            sessions, last = int(counted[0]), counted[1]
    schema = probe(conn, schema=namespace)
    optional = [
        f"column {t}.{c}" for t, cols in OPTIONAL_COLUMNS.items() if t in schema.tables for c in cols
        if not schema.has_column(t, c)
    ]  # fmt: skip
    return LedgerStatus(
        sessions_applied=sessions,
        last_applied_at=last.astimezone(UTC).isoformat() if last is not None else None,
        missing_required=missing_required(schema),
        missing_optional=optional,
    )


def as_json(stream: str, groups: Sequence[GroupStatus], ledger: LedgerStatus | None) -> dict[str, Any]:
    """The status as `sidecar ledger status --json` prints it."""
    return {
        "stream": stream,
        "groups": {g.group: {k: v for k, v in asdict(g).items() if k != "group"} for g in groups},
        "litellm_ledger": None if ledger is None else asdict(ledger),
    }


def format_status(stream: str, groups: Sequence[GroupStatus], ledger: LedgerStatus | None) -> str:
    """A few aligned lines for a terminal."""
    lines = [f"usage stream {stream}", f"  {'group':<10}{'lag':>8}{'pending':>10}{'oldest pending':>16}{'dead':>8}"]
    for g in groups:
        if not g.exists:
            lines.append(f"  {g.group:<10}{'(no such group)':>34}{g.dead_letters:>8}")
            continue
        lag = "?" if g.lag is None else str(g.lag)
        age = "-" if g.oldest_pending_age_s is None else f"{g.oldest_pending_age_s:.1f}s"
        lines.append(f"  {g.group:<10}{lag:>8}{g.pending:>10}{age:>16}{g.dead_letters:>8}")
    if ledger is None:
        lines.append("LiteLLM ledger: not configured (SIDECAR_LITELLM_DATABASE_URL unset)")
        return "\n".join(lines)
    lines.append(
        f"LiteLLM ledger: {ledger.sessions_applied} sessions applied, last at {ledger.last_applied_at or 'never'}"
    )
    ready = "ready" if not ledger.missing_required else "REFUSED, missing " + ", ".join(ledger.missing_required)
    lines.append(f"  schema: {ready}")
    if ledger.missing_optional:
        lines.append(f"  missing optional (not written): {', '.join(ledger.missing_optional)}")
    return "\n".join(lines)


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
