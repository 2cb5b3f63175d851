"""The LiteLLM sink's writer against LiteLLM's real schema: one usage event, one transaction, once."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from sidecar.ledger.schema import LedgerSchema, probe
from sidecar.ledger.writer import Outcome, apply, ensure_sink_tables, known_tasks, task_type
from sidecar.usage import UsageEvent
from tests.litellm_schema import Principal, seed_principal

STARTED = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
NOW = STARTED + timedelta(minutes=5)
FINAL_COST = Decimal("0.123456")
Conn = psycopg.Connection[tuple[Any, ...]]


@pytest.fixture
def conn(litellm_db: str) -> Iterator[Conn]:
    """An autocommit connection to a fresh copy of LiteLLM's schema, with the sink's tables."""
    with psycopg.connect(litellm_db, autocommit=True) as c:
        ensure_sink_tables(c)
        yield c


@pytest.fixture
def principal(conn: Conn) -> Principal:
    """A key, its user, team and organization, seeded as LiteLLM leaves them."""
    return seed_principal(conn)


@pytest.fixture
def schema(conn: Conn) -> LedgerSchema:
    """The probed schema."""
    return probe(conn)


def event(
    p: Principal, seq: int, cost: str, tokens: tuple[int, int], seconds: str, *, final: bool = False
) -> UsageEvent:
    """A usage event of session `sess_w` for the principal, with cumulative figures."""
    return UsageEvent(
        event_id=f"e{seq}", type="final" if final else "checkpoint", session_id="sess_w", seq=seq,
        key_hash=p.key_hash, key_alias=p.key_alias, user_id=p.user_id, team_id=p.team_id, model="gpt-realtime",
        provider_model="openai/gpt-realtime-2025-08-28", kind="audio", unit="second", quantity=Decimal(seconds),
        audio_seconds=Decimal(seconds), audio_bytes=0, input_tokens=tokens[0], output_tokens=tokens[1],
        cost_usd=Decimal(cost), started_at=STARTED, ended_at=NOW if final else None,
    )  # fmt: skip


def session(p: Principal) -> list[UsageEvent]:
    """Two checkpoints and the final."""
    return [
        event(p, 1, "0.030000", (100, 50), "4.5"),
        event(p, 2, "0.080001", (220, 130), "9"),
        event(p, 3, str(FINAL_COST), (300, 200), "12.25", final=True),
    ]


def snapshot(conn: Conn) -> dict[str, object]:
    """Every figure the sink writes: SpendLogs, entity spend, daily rows, markers."""
    q = conn.execute
    return {
        "logs": q('SELECT request_id, spend, prompt_tokens, completion_tokens, total_tokens FROM "LiteLLM_SpendLogs"'
                  " ORDER BY request_id").fetchall(),
        "key": q('SELECT spend, total_spend FROM "LiteLLM_VerificationToken"').fetchall(),
        "team": q('SELECT spend FROM "LiteLLM_TeamTable"').fetchall(),
        "user": q('SELECT spend FROM "LiteLLM_UserTable"').fetchall(),
        "org": q('SELECT spend FROM "LiteLLM_OrganizationTable"').fetchall(),
        "team_member": q('SELECT spend FROM "LiteLLM_TeamMembership"').fetchall(),
        "org_member": q('SELECT spend FROM "LiteLLM_OrganizationMembership"').fetchall(),
        **{t: q(f'SELECT spend, api_requests, prompt_tokens, completion_tokens FROM "{t}"').fetchall()
           for t in ("LiteLLM_DailyUserSpend", "LiteLLM_DailyTeamSpend", "LiteLLM_DailyOrganizationSpend")},
        "tags": q('SELECT tag, spend, api_requests, prompt_tokens FROM "LiteLLM_DailyTagSpend" ORDER BY 1').fetchall(),
        "tag_rows": q('SELECT tag_name, spend FROM "LiteLLM_TagTable" ORDER BY tag_name').fetchall(),
        "models": q('SELECT model_group, custom_llm_provider, task_type, spend, request_count, successful_requests,'
                    ' prompt_tokens, completion_tokens FROM "LiteLLM_DailyModelUsage"').fetchall(),
        "markers": q("SELECT session_id, last_seq FROM realtime_sidecar.litellm_sessions").fetchall(),
    }  # fmt: skip


def one(conn: Conn, query: str) -> Any:
    """The single value `query` returns."""
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def test_a_session_lands_once_with_its_final_cost(conn: Conn, principal: Principal, schema: LedgerSchema) -> None:
    """Checkpoints then final: SpendLogs sum to the final cost; every entity and daily row rose by it; one request."""
    outcomes = [apply(conn, schema, e, now=NOW) for e in session(principal)]
    assert [o.kind for o in outcomes] == ["applied"] * 3
    charged = {(o.key_exists, o.key_hash, o.user_id, o.team_id, o.organization_id) for o in outcomes}
    assert charged == {(True, principal.key_hash, principal.user_id, principal.team_id, principal.organization_id)}
    final = float(FINAL_COST)
    assert math.isclose(one(conn, "SELECT sum(spend) FROM \"LiteLLM_SpendLogs\" WHERE session_id = 'sess_w'"), final)
    assert one(conn, "SELECT count(*) FROM \"LiteLLM_SpendLogs\" WHERE call_type = '_arealtime'") == 3
    assert one(conn, 'SELECT sum(prompt_tokens) + sum(completion_tokens) FROM "LiteLLM_SpendLogs"') == 500
    for table in ("VerificationToken", "TeamTable", "UserTable", "OrganizationTable", "TeamMembership",
                  "OrganizationMembership"):  # fmt: skip
        assert math.isclose(one(conn, f'SELECT spend FROM "LiteLLM_{table}"'), final), table
    assert math.isclose(one(conn, 'SELECT total_spend FROM "LiteLLM_VerificationToken"'), final)
    assert one(conn, 'SELECT last_active FROM "LiteLLM_VerificationToken"') == NOW.replace(tzinfo=None)
    for table in ("LiteLLM_DailyUserSpend", "LiteLLM_DailyTeamSpend", "LiteLLM_DailyOrganizationSpend"):
        rows = conn.execute(
            f"SELECT spend, api_requests, successful_requests, prompt_tokens, completion_tokens, date, api_key,"
            f' model, custom_llm_provider, endpoint, mcp_namespaced_tool_name FROM "{table}"'
        ).fetchall()
        assert len(rows) == 1, table
        spend, *rest = rows[0]
        assert math.isclose(spend, final)
        assert rest == [1, 1, 300, 200, "2026-12-01", principal.key_hash, "gpt-realtime", "openai", "", ""]
    log = conn.execute(
        'SELECT request_id, api_key, model_group, custom_llm_provider, "user", team_id, metadata'
        ' FROM "LiteLLM_SpendLogs" ORDER BY request_id LIMIT 1'
    ).fetchone()
    assert log is not None
    assert log[:6] == ("sess_w:1", principal.key_hash, "gpt-realtime", "openai", principal.user_id, principal.team_id)
    assert log[6]["source"] == "realtime-sidecar" and log[6]["audio_seconds"] == 4.5
    assert log[6]["user_api_key_alias"] == principal.key_alias


def test_repeats_out_of_order_and_duplicated_change_nothing(
    conn: Conn, principal: Principal, schema: LedgerSchema
) -> None:
    """After the session is applied, its events again, reversed and twice, are skipped; every figure unchanged."""
    events = session(principal)
    for e in events:
        apply(conn, schema, e, now=NOW)
    before = snapshot(conn)
    outcomes = [apply(conn, schema, e, now=NOW) for e in [*reversed(events), *events]]
    assert {o.kind for o in outcomes} == {"skipped"}
    assert not any(o.key_exists or o.key_hash for o in outcomes)  # nothing charged: nothing to invalidate
    assert snapshot(conn) == before


def test_out_of_order_delivery_applies_the_highest_totals(
    conn: Conn, principal: Principal, schema: LedgerSchema
) -> None:
    """The final first, then the checkpoints: the final's totals, one request, the checkpoints skipped."""
    first, second, final = session(principal)
    kinds = [apply(conn, schema, e, now=NOW).kind for e in (final, first, second, final)]
    assert kinds == ["applied", "skipped", "skipped", "skipped"]
    assert math.isclose(one(conn, 'SELECT spend FROM "LiteLLM_TeamTable"'), float(FINAL_COST))
    assert one(conn, 'SELECT api_requests FROM "LiteLLM_DailyTeamSpend"') == 1


def test_an_unknown_key_writes_spend_logs_only(conn: Conn, principal: Principal, schema: LedgerSchema) -> None:
    """A key hash LiteLLM does not know: the SpendLogs row is written, no entity or daily row touched."""
    before = snapshot(conn)
    outcome = apply(conn, schema, session(principal)[0].with_changes(key_hash="0" * 64), now=NOW)
    after = snapshot(conn)
    assert outcome.kind == "applied" and not outcome.key_exists and outcome.organization_id == ""
    assert len(after.pop("logs")) == 1  # type: ignore[arg-type]
    assert after.pop("markers") == [("sess_w", 1)]
    before.pop("logs"), before.pop("markers")
    assert after == before


def test_a_negative_delta_is_dead_lettered_and_writes_nothing(
    conn: Conn, principal: Principal, schema: LedgerSchema
) -> None:
    """A newer seq whose cost went down is refused as a dead letter; nothing is written, the marker stays."""
    apply(conn, schema, session(principal)[1], now=NOW)
    before = snapshot(conn)
    outcome = apply(conn, schema, event(principal, 3, "0.01", (300, 200), "12"), now=NOW)
    assert outcome.kind == "dead_letter" and "cost_usd" in outcome.reason
    assert snapshot(conn) == before


def test_a_dead_letter_on_a_new_session_leaves_no_marker(
    conn: Conn, principal: Principal, schema: LedgerSchema
) -> None:
    """An unstorable first event rolls back the marker insert too: nothing at all is written."""
    before = snapshot(conn)
    outcome = apply(conn, schema, session(principal)[0].with_changes(input_tokens=2**31), now=NOW)
    assert outcome.kind == "dead_letter"
    assert snapshot(conn) == before


def test_ensure_sink_tables_is_idempotent(conn: Conn) -> None:
    """Running it again changes nothing and raises nothing; the marker table is in the sink's own schema."""
    ensure_sink_tables(conn)
    assert one(conn, "SELECT to_regclass('realtime_sidecar.litellm_sessions') IS NOT NULL") is True
    assert one(conn, "SELECT to_regclass('public.litellm_sessions') IS NULL") is True


def test_two_connections_applying_the_same_event_apply_it_once(
    litellm_db: str, conn: Conn, principal: Principal, schema: LedgerSchema
) -> None:
    """Two connections race on the same event: one applies, the other skips; spend rose once."""
    first = session(principal)[0]
    barrier = threading.Barrier(2)
    outcomes: list[Outcome] = []

    def run() -> None:
        with psycopg.connect(litellm_db, autocommit=True) as c:
            barrier.wait()
            outcomes.append(apply(c, schema, first, now=NOW))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o.kind for o in outcomes) == ["applied", "skipped"]
    assert math.isclose(one(conn, 'SELECT spend FROM "LiteLLM_VerificationToken"'), 0.03)
    assert one(conn, 'SELECT count(*) FROM "LiteLLM_SpendLogs"') == 1


def test_a_held_marker_lock_makes_the_racer_wait_then_skip(
    litellm_db: str, conn: Conn, principal: Principal, schema: LedgerSchema
) -> None:
    """While one transaction holds the session's marker, the other waits on it and then finds the event applied."""
    first = session(principal)[0]
    result: list[Outcome] = []
    with psycopg.connect(litellm_db, autocommit=True) as holder:
        with holder.transaction():
            holder.execute(
                "INSERT INTO realtime_sidecar.litellm_sessions VALUES ('sess_w', 1, 0.03, 100, 50, 4.5, now())"
            )
            racer = threading.Thread(target=lambda: result.append(_apply_new_conn(litellm_db, schema, first)))
            racer.start()
            _wait_for_lock_waiter(conn, racer)
        racer.join()
    assert [o.kind for o in result] == ["skipped"]
    assert one(conn, 'SELECT count(*) FROM "LiteLLM_SpendLogs"') == 0


def test_a_lock_timeout_is_retried_then_raised_and_nothing_is_written(
    litellm_db: str, conn: Conn, principal: Principal, schema: LedgerSchema
) -> None:
    """A key row locked by another writer: each attempt times out (55P03), the error is raised, nothing written."""
    before = snapshot(conn)
    with psycopg.connect(litellm_db, autocommit=True) as holder, holder.transaction():
        holder.execute('SELECT 1 FROM "LiteLLM_VerificationToken" FOR UPDATE')
        with pytest.raises(psycopg.errors.LockNotAvailable):
            apply(conn, schema, session(principal)[0], now=NOW, lock_timeout_ms=20, attempts=2)
        assert snapshot(conn) == before
    assert apply(conn, schema, session(principal)[0], now=NOW).kind == "applied"


def _apply_new_conn(dsn: str, schema: LedgerSchema, e: UsageEvent) -> Outcome:
    with psycopg.connect(dsn, autocommit=True) as c:
        return apply(c, schema, e, now=NOW)


def _wait_for_lock_waiter(conn: Conn, racer: threading.Thread) -> None:
    """Return once some backend waits on a lock (pg_stat_activity); fail if the racer ended first."""
    while not one(
        conn, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
    ):
        assert racer.is_alive(), "the racer finished without waiting on the marker"


def tag(conn: Conn, principal: Principal, *, key_tags: list[object], team_tags: list[object]) -> None:
    """Key and team metadata tags as /key/generate and /team/new store them; tag rows for 'prod' and 'voice'."""
    conn.execute('UPDATE "LiteLLM_VerificationToken" SET metadata = %s', (Jsonb({"tags": key_tags, "x": 1}),))
    conn.execute('UPDATE "LiteLLM_TeamTable" SET metadata = %s', (Jsonb({"tags": team_tags}),))
    for name in ("prod", "voice"):
        conn.execute('INSERT INTO "LiteLLM_TagTable" (tag_name, models) VALUES (%s, %s)', (name, []))


def test_the_model_rollup_counts_one_request_with_the_final_totals(
    conn: Conn, principal: Principal, schema: LedgerSchema
) -> None:
    """LiteLLM_DailyModelUsage: one row keyed by date, model group, model, provider and 'uncategorized';
    the final's spend and tokens; one request, successful, on the first applied event only."""
    for e in session(principal):
        apply(conn, schema, e, now=NOW)
    rows = conn.execute(
        "SELECT date, model_group, model, custom_llm_provider, task_type, spend, prompt_tokens, completion_tokens,"
        ' request_count, successful_requests, failed_requests FROM "LiteLLM_DailyModelUsage"'
    ).fetchall()
    assert len(rows) == 1
    date, group, model, provider, task, spend, *counts = rows[0]
    assert (date, group, model, provider, task) == (
        "2026-12-01",
        "gpt-realtime",
        "gpt-realtime",
        "openai",
        "uncategorized",
    )
    assert math.isclose(spend, float(FINAL_COST)) and counts == [300, 200, 1, 1, 0]


def test_a_model_without_a_provider_rolls_up_under_unknown(
    conn: Conn, principal: Principal, schema: LedgerSchema
) -> None:
    """A provider model without `<provider>/`: 'unknown' in the model rollup (as LiteLLM), '' in the daily rows."""
    apply(conn, schema, session(principal)[0].with_changes(provider_model="gpt-realtime"), now=NOW)
    assert one(conn, 'SELECT custom_llm_provider FROM "LiteLLM_DailyModelUsage"') == "unknown"
    assert one(conn, 'SELECT custom_llm_provider FROM "LiteLLM_DailyUserSpend"') == ""


def test_key_and_team_tags_are_the_sessions_tags(conn: Conn, principal: Principal, schema: LedgerSchema) -> None:
    """The key's then the team's metadata tags (once each; non-strings dropped): SpendLogs' request_tags, one daily
    tag row per tag with one request, each existing tag row's spend; the outcome names them."""
    tag(conn, principal, key_tags=["prod", "voice", 7], team_tags=["voice", "team-x", ""])
    outcomes = [apply(conn, schema, e, now=NOW) for e in session(principal)]
    assert {o.tags for o in outcomes} == {("prod", "voice", "team-x")}
    logged = conn.execute('SELECT request_tags FROM "LiteLLM_SpendLogs"').fetchall()
    assert logged == [(["prod", "voice", "team-x"],)] * 3
    daily = conn.execute(
        "SELECT tag, spend, api_requests, successful_requests, prompt_tokens, completion_tokens, api_key, model,"
        ' request_id FROM "LiteLLM_DailyTagSpend" ORDER BY tag'
    ).fetchall()
    assert [r[0] for r in daily] == ["prod", "team-x", "voice"]
    for row in daily:
        assert math.isclose(row[1], float(FINAL_COST)), row[0]
        assert row[2:] == (1, 1, 300, 200, principal.key_hash, "gpt-realtime", "sess_w:1")
    tag_rows = dict(conn.execute('SELECT tag_name, spend FROM "LiteLLM_TagTable"').fetchall())
    assert tag_rows.keys() == {"prod", "voice"}  # 'team-x' has no tag row: none is created
    assert all(math.isclose(spend, float(FINAL_COST)) for spend in tag_rows.values())


def test_an_untagged_key_writes_no_tag_rows(conn: Conn, principal: Principal, schema: LedgerSchema) -> None:
    """No metadata tags: request_tags is [] and no daily tag row is written."""
    outcome = apply(conn, schema, session(principal)[0], now=NOW)
    assert outcome.tags == ()
    assert one(conn, 'SELECT request_tags FROM "LiteLLM_SpendLogs"') == []
    assert one(conn, 'SELECT count(*) FROM "LiteLLM_DailyTagSpend"') == 0


def test_repeated_tagged_events_change_no_tag_or_model_row(
    conn: Conn, principal: Principal, schema: LedgerSchema
) -> None:
    """A tagged session applied, then all of it again: tag rows, tag spend and the model rollup unchanged."""
    tag(conn, principal, key_tags=["prod"], team_tags=["voice"])
    events = session(principal)
    for e in events:
        apply(conn, schema, e, now=NOW)
    before = snapshot(conn)
    assert len(before["tags"]) == 2 and len(before["models"]) == 1  # type: ignore[arg-type]
    assert {apply(conn, schema, e, now=NOW).kind for e in [*events, *reversed(events)]} == {"skipped"}
    assert snapshot(conn) == before


def test_a_schema_without_the_newer_tables_and_columns_still_applies(conn: Conn, principal: Principal) -> None:
    """No DailyModelUsage, DailyTagSpend, TagTable or ProjectTable, no key or team metadata, no key project, no
    SpendLogs request_tags: the event applies, the rest is written."""
    tag(conn, principal, key_tags=["prod"], team_tags=[])
    conn.execute(
        'DROP TABLE "LiteLLM_DailyModelUsage", "LiteLLM_DailyTagSpend", "LiteLLM_TagTable", "LiteLLM_ProjectTable"'
        " CASCADE"
    )
    dropped = [("LiteLLM_VerificationToken", "metadata"), ("LiteLLM_TeamTable", "metadata"),
               ("LiteLLM_SpendLogs", "request_tags"), ("LiteLLM_VerificationToken", "project_id")]  # fmt: skip
    for table, column in dropped:
        conn.execute(f'ALTER TABLE "{table}" DROP COLUMN {column}')
    older = probe(conn)
    outcome = apply(conn, older, session(principal)[0], now=NOW)
    assert outcome.kind == "applied" and outcome.tags == ()
    assert math.isclose(one(conn, 'SELECT spend FROM "LiteLLM_DailyUserSpend"'), 0.03)


def test_the_task_type_is_the_first_known_task_tag() -> None:
    """`task:<name>` with a name LiteLLM knows gives that task; unknown names and other tags: 'uncategorized'."""
    known = {"translation", "conversation"}
    assert task_type(["prod", "task:nope", "task:translation", "task:conversation"], known) == "translation"
    assert task_type(["prod", "task:nope"], known) == "uncategorized"
    assert task_type([], known) == "uncategorized"
    assert {"translation", "conversation"} <= known_tasks()  # the installed litellm's list is read


def test_a_task_tag_on_the_key_types_the_model_rollup(conn: Conn, principal: Principal, schema: LedgerSchema) -> None:
    """A key tagged `task:translation` rolls its sessions up under that task, as LiteLLM does."""
    tag(conn, principal, key_tags=["task:translation"], team_tags=[])
    apply(conn, schema, session(principal)[0], now=NOW)
    assert one(conn, 'SELECT task_type FROM "LiteLLM_DailyModelUsage"') == "translation"


def test_a_key_in_a_project_charges_the_project_and_carries_its_tags(
    conn: Conn, principal: Principal, schema: LedgerSchema
) -> None:
    """The key's project: its spend rises by the final cost; its tags follow the key's and the team's; the
    outcome and the SpendLogs metadata name it. A repeat changes nothing."""
    tag(conn, principal, key_tags=["prod"], team_tags=["voice"])
    conn.execute(
        'INSERT INTO "LiteLLM_ProjectTable" (project_id, team_id, metadata, models, created_by, updated_by)'
        " VALUES ('proj-1', %s, %s, %s, 'admin', 'admin')",
        (principal.team_id, Jsonb({"tags": ["voice", "proj-tag"]}), []),
    )
    conn.execute("UPDATE \"LiteLLM_VerificationToken\" SET project_id = 'proj-1'")
    events = session(principal)
    outcomes = [apply(conn, schema, e, now=NOW) for e in events]
    assert {(o.project_id, o.tags) for o in outcomes} == {("proj-1", ("prod", "voice", "proj-tag"))}
    assert math.isclose(one(conn, 'SELECT spend FROM "LiteLLM_ProjectTable"'), float(FINAL_COST))
    assert one(conn, "SELECT metadata->>'user_api_key_project_id' FROM \"LiteLLM_SpendLogs\" LIMIT 1") == "proj-1"
    assert one(conn, 'SELECT count(*) FROM "LiteLLM_DailyTagSpend"') == 3
    apply(conn, schema, events[-1], now=NOW)
    assert math.isclose(one(conn, 'SELECT spend FROM "LiteLLM_ProjectTable"'), float(FINAL_COST))


def test_a_key_without_a_project_has_none(conn: Conn, principal: Principal, schema: LedgerSchema) -> None:
    """No project: the outcome names none and the SpendLogs metadata's project is null."""
    assert apply(conn, schema, session(principal)[0], now=NOW).project_id == ""
    assert one(conn, "SELECT metadata->'user_api_key_project_id' FROM \"LiteLLM_SpendLogs\"") is None
