"""The LiteLLM sink's batch writer against LiteLLM's real schema: a batch lands what its events one at a time land."""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from sidecar.ledger.schema import LedgerSchema, probe
from sidecar.ledger.sink import LedgerSink
from sidecar.ledger.writer import Outcome, apply, apply_many, ensure_sink_tables
from sidecar.usage import UsageEvent
from tests.conftest import PG_ADMIN_DSN
from tests.litellm_schema import Principal, key_hash, seed_principal

STARTED = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
NOW = STARTED + timedelta(minutes=5)
UNKNOWN_KEY = "0" * 64
Conn = psycopg.Connection[tuple[Any, ...]]


@pytest.fixture
def twin_dbs(litellm_template: str, unique: str) -> Iterator[tuple[str, str]]:
    """Two fresh clones of LiteLLM's schema, seeded alike (three principals, tags on the first key and team)."""
    names = [f"sidecar_litellm_{unique}_{side}" for side in ("batch", "single")]
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        for name in names:
            admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{litellm_template}"')
    try:
        for name in names:
            with psycopg.connect(f"{base}/{name}", autocommit=True) as conn:
                ensure_sink_tables(conn)
                seeded(conn)
        yield f"{base}/{names[0]}", f"{base}/{names[1]}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            for name in names:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def seeded(conn: Conn, count: int = 3) -> list[Principal]:
    """`count` principals (a key, its user, team and organization each); the first key and team carry tags."""
    made = [
        seed_principal(conn, key=f"sk-b-{i}", key_alias=f"k{i}", user_id=f"u{i}", team_id=f"t{i}",
                       organization_id=f"o{i}")
        for i in range(count)
    ]  # fmt: skip
    conn.execute(
        'UPDATE "LiteLLM_VerificationToken" SET metadata = %s WHERE token = %s',
        (Jsonb({"tags": ["prod", "voice"]}), made[0].key_hash),
    )
    conn.execute("UPDATE \"LiteLLM_TeamTable\" SET metadata = %s WHERE team_id = 't0'", (Jsonb({"tags": ["voice"]}),))
    for name in ("prod", "voice"):
        conn.execute('INSERT INTO "LiteLLM_TagTable" (tag_name, models) VALUES (%s, %s)', (name, []))
    return made


def principals() -> list[Principal]:
    """The principals `seeded` made (seeding is deterministic)."""
    return [
        Principal(f"sk-b-{i}", key_hash(f"sk-b-{i}"), f"k{i}", f"u{i}", f"t{i}", f"o{i}", f"budget-o{i}")
        for i in range(3)
    ]


def snapshot(conn: Conn) -> dict[str, list[tuple[Any, ...]]]:
    """Every figure the sink writes, in a stable order: SpendLogs rows, entity spend, daily rows, markers."""
    q = conn.execute
    daily = ("LiteLLM_DailyUserSpend", "LiteLLM_DailyTeamSpend", "LiteLLM_DailyOrganizationSpend")
    return {
        "logs": q('SELECT request_id, api_key, spend, prompt_tokens, completion_tokens, total_tokens, "startTime",'
                  ' "endTime", model, custom_llm_provider, "user", team_id, organization_id, metadata, session_id,'
                  ' request_tags FROM "LiteLLM_SpendLogs" ORDER BY request_id').fetchall(),
        "key": q('SELECT token, spend, total_spend, last_active FROM "LiteLLM_VerificationToken" ORDER BY 1')
        .fetchall(),
        "team": q('SELECT team_id, spend FROM "LiteLLM_TeamTable" ORDER BY 1').fetchall(),
        "user": q('SELECT user_id, spend FROM "LiteLLM_UserTable" ORDER BY 1').fetchall(),
        "org": q('SELECT organization_id, spend FROM "LiteLLM_OrganizationTable" ORDER BY 1').fetchall(),
        "team_member": q('SELECT user_id, team_id, spend, total_spend FROM "LiteLLM_TeamMembership" ORDER BY 1, 2')
        .fetchall(),
        "org_member": q('SELECT user_id, organization_id, spend FROM "LiteLLM_OrganizationMembership" ORDER BY 1, 2')
        .fetchall(),
        "tag_rows": q('SELECT tag_name, spend FROM "LiteLLM_TagTable" ORDER BY 1').fetchall(),
        **{t: q(f"SELECT {c}, date, api_key, model, spend, api_requests, successful_requests, prompt_tokens,"
                f' completion_tokens FROM "{t}" ORDER BY 1, 2, 3').fetchall()
           for t, c in zip(daily, ("user_id", "team_id", "organization_id"), strict=True)},
        "tags": q('SELECT tag, date, api_key, request_id, spend, api_requests, prompt_tokens, completion_tokens'
                  ' FROM "LiteLLM_DailyTagSpend" ORDER BY 1, 2, 3').fetchall(),
        "models": q('SELECT model_group, custom_llm_provider, task_type, spend, request_count, successful_requests,'
                    ' prompt_tokens, completion_tokens FROM "LiteLLM_DailyModelUsage" ORDER BY 1, 2, 3').fetchall(),
        "markers": q("SELECT session_id, last_seq, cost_usd, input_tokens, output_tokens, audio_seconds"
                     " FROM realtime_sidecar.litellm_sessions ORDER BY 1").fetchall(),
    }  # fmt: skip


def assert_same(batch: dict[str, list[tuple[Any, ...]]], single: dict[str, list[tuple[Any, ...]]]) -> None:
    """Equal row for row; a float (a `spend`) equal to within float rounding: a batch adds the exact sum of its
    deltas once, one at a time adds each delta in turn."""
    assert batch.keys() == single.keys()
    for name in batch:
        assert len(batch[name]) == len(single[name]), name
        for a, b in zip(batch[name], single[name], strict=True):
            for x, y in zip(a, b, strict=True):
                if isinstance(x, float) and isinstance(y, float):
                    assert math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-15), (name, a, b)
                else:
                    assert x == y, (name, a, b)


def make_event(
    session_id: str, seq: int, cost: Decimal, tokens: tuple[int, int], *, key_hash: str, user_id: str, team_id: str
) -> UsageEvent:
    """A usage event with cumulative figures (seconds follow the cost)."""
    return UsageEvent(
        event_id=f"{session_id}-{seq}-{cost}", type="checkpoint", session_id=session_id, seq=seq, key_hash=key_hash,
        key_alias="alias", user_id=user_id, team_id=team_id, model="gpt-realtime",
        provider_model="openai/gpt-realtime", kind="audio", unit="second", quantity=cost * 100,
        audio_seconds=cost * 100, audio_bytes=0, input_tokens=tokens[0], output_tokens=tokens[1], cost_usd=cost,
        started_at=STARTED, ended_at=None,
    )  # fmt: skip


@st.composite
def deliveries(draw: st.DrawFn, counter: Iterator[int]) -> tuple[list[UsageEvent], list[int]]:
    """A few sessions over the principals (and an unknown key), each event delivered 0 to 2 times, in any order,
    with dead letters among them (a cost that went backwards, negative tokens); and the batch sizes."""
    run = next(counter)
    owners = principals()
    keys = [p.key_hash for p in owners] + [UNKNOWN_KEY]
    events: list[UsageEvent] = []
    for s in range(draw(st.integers(1, 4))):
        owner = draw(st.integers(0, 3))
        p = owners[min(owner, 2)]
        team = draw(st.sampled_from(["", p.team_id, "t1"]))
        user = draw(st.sampled_from(["", p.user_id, "u2"]))
        cost, tokens = Decimal(0), (0, 0)
        for seq in range(1, draw(st.integers(1, 4)) + 1):
            cost += Decimal(draw(st.integers(0, 10**6))) / Decimal(10**8)
            tokens = (tokens[0] + draw(st.integers(0, 500)), tokens[1] + draw(st.integers(0, 500)))
            e = make_event(f"rs_{run}_{s}", seq, cost, tokens, key_hash=keys[owner], user_id=user, team_id=team)
            events += [e] * draw(st.integers(0, 2))
            bad = draw(st.sampled_from(["", "", "", "backwards", "tokens"]))
            if bad == "backwards":
                events.append(e.with_changes(seq=seq + 50, cost_usd=cost / 2, event_id=f"{e.event_id}-b"))
            elif bad == "tokens":
                events.append(e.with_changes(seq=seq + 1, input_tokens=-1, event_id=f"{e.event_id}-t"))
    order = draw(st.permutations(range(len(events))))
    shuffled = [events[i] for i in order]
    sizes = draw(st.lists(st.integers(1, 12), min_size=1, max_size=6))
    return shuffled, sizes


def batches(events: list[UsageEvent], sizes: list[int]) -> Iterator[list[UsageEvent]]:
    """`events` cut into batches of the given sizes, cycled."""
    at = 0
    for size in itertools.cycle(sizes):
        if at >= len(events):
            return
        yield events[at : at + size]
        at += size


def test_a_batch_lands_what_one_event_at_a_time_lands(twin_dbs: tuple[str, str]) -> None:
    """Random sessions over keys, teams, users and an unknown key, with duplicates, disorder and dead letters:
    applied in batches into one database and one event per transaction into its twin, the outcomes are the same
    and so is every SpendLogs row, entity spend, daily row and marker (to float rounding for `spend`)."""
    batch_dsn, single_dsn = twin_dbs
    with psycopg.connect(batch_dsn, autocommit=True) as b, psycopg.connect(single_dsn, autocommit=True) as s:
        schema_b, schema_s = probe(b), probe(s)
        counter = itertools.count()

        @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(deliveries(counter))
        def check(delivered: tuple[list[UsageEvent], list[int]]) -> None:
            events, sizes = delivered
            got = [o for part in batches(events, sizes) for o in apply_many(b, schema_b, part, now=NOW)]
            want = [apply(s, schema_s, e, now=NOW) for e in events]
            assert [(o.kind, o.reason, o.key_exists, o.team_id, o.user_id, o.tags) for o in got] == [
                (o.kind, o.reason, o.key_exists, o.team_id, o.user_id, o.tags) for o in want
            ]
            assert_same(snapshot(b), snapshot(s))

        check()


def test_an_empty_batch_does_nothing(twin_dbs: tuple[str, str]) -> None:
    """No events: no outcome, no transaction."""
    with psycopg.connect(twin_dbs[0], autocommit=True) as conn:
        assert apply_many(conn, probe(conn), [], now=NOW) == []


def test_a_batch_where_nothing_applies_leaves_no_marker(twin_dbs: tuple[str, str]) -> None:
    """Only dead letters and repeats: nothing written, not even the new sessions' markers."""
    with psycopg.connect(twin_dbs[0], autocommit=True) as conn:
        schema = probe(conn)
        p = principals()[0]
        first = make_event("rs_n", 1, Decimal("0.1"), (1, 1), key_hash=p.key_hash, user_id="", team_id="")
        assert apply(conn, schema, first, now=NOW).kind == "applied"
        before = snapshot(conn)
        again = [first, first.with_changes(session_id="rs_new", input_tokens=-1), first]
        assert [o.kind for o in apply_many(conn, schema, again, now=NOW)] == ["skipped", "dead_letter", "skipped"]
        assert snapshot(conn) == before


def test_two_connections_applying_overlapping_batches_never_deadlock(twin_dbs: tuple[str, str]) -> None:
    """Two writers apply the same sessions at once, in batches that name them in opposite orders, with no retry
    allowed (a deadlock or lock timeout would raise): every session's final lands once, every total exact."""
    dsn = twin_dbs[0]
    owners = principals()
    sessions = [
        [make_event(f"rs_c{i}", seq, Decimal(seq) / 1000, (seq, seq), key_hash=owners[i % 3].key_hash,
                    user_id="", team_id="") for seq in (1, 2, 3)]
        for i in range(60)
    ]  # fmt: skip
    stream = [s[i] for i in range(3) for s in sessions]
    orders = [stream, list(reversed(stream))]
    rounds = 6
    barrier = threading.Barrier(2)
    outcomes: list[list[Outcome]] = [[], []]
    failures: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                schema = probe(conn)
                events = orders[n]
                size = -(-len(events) // rounds)
                for r in range(rounds):
                    barrier.wait(30)
                    part = events[r * size : (r + 1) * size]
                    outcomes[n] += apply_many(conn, schema, part, now=NOW, attempts=1)
        except BaseException as exc:
            failures.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=writer, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len(outcomes[0]) == len(outcomes[1]) == len(stream)
    with psycopg.connect(dsn, autocommit=True) as conn:
        per_session = dict(conn.execute('SELECT session_id, sum(spend) FROM "LiteLLM_SpendLogs" GROUP BY 1').fetchall())
        assert per_session.keys() == {s[-1].session_id for s in sessions}
        assert all(math.isclose(per_session[s[-1].session_id], float(s[-1].cost_usd)) for s in sessions)
        for i, p in enumerate(owners):
            expected = sum(float(s[-1].cost_usd) for j, s in enumerate(sessions) if j % 3 == i)
            for query, arg in (
                ('SELECT spend FROM "LiteLLM_VerificationToken" WHERE token = %s', p.key_hash),
                ('SELECT spend FROM "LiteLLM_TeamTable" WHERE team_id = %s', p.team_id),
                ('SELECT spend FROM "LiteLLM_OrganizationTable" WHERE organization_id = %s', p.organization_id),
                ('SELECT sum(spend) FROM "LiteLLM_DailyUserSpend" WHERE user_id = %s', p.user_id),
            ):
                row = conn.execute(query, (arg,)).fetchone()
                assert row is not None and math.isclose(row[0], expected), (query, row, expected)
            requests = conn.execute(
                'SELECT sum(api_requests) FROM "LiteLLM_DailyTeamSpend" WHERE team_id = %s', (p.team_id,)
            ).fetchone()
            assert requests == (20,)


def test_a_value_the_database_refuses_dead_letters_only_its_event(twin_dbs: tuple[str, str]) -> None:
    """A batch through the sink with one event whose model LiteLLM's text columns refuse (a NUL): the batch rolls
    back, the sink applies its events one at a time, and only that event is dead-lettered."""
    dsn = twin_dbs[0]
    p = principals()[1]
    events = [
        make_event(f"rs_d{i}", 1, Decimal("0.01"), (1, 1), key_hash=p.key_hash, user_id="", team_id="")
        for i in range(5)
    ]
    events[2] = events[2].with_changes(model="gpt\x00realtime")
    sink = LedgerSink(dsn)
    try:
        outcomes = sink.write(events, now=NOW)
    finally:
        sink.close()
    assert [o.kind for o in outcomes] == ["applied", "applied", "dead_letter", "applied", "applied"]
    assert "refused a value" in outcomes[2].reason
    with psycopg.connect(dsn, autocommit=True) as conn:
        logged = [r[0] for r in conn.execute('SELECT request_id FROM "LiteLLM_SpendLogs" ORDER BY 1').fetchall()]
        spend = conn.execute('SELECT spend FROM "LiteLLM_VerificationToken" WHERE token = %s', (p.key_hash,)).fetchone()
    assert logged == ["rs_d0:1", "rs_d1:1", "rs_d3:1", "rs_d4:1"]
    assert spend is not None and math.isclose(spend[0], 0.04)


def test_the_sink_splits_a_large_write_into_capped_transactions(twin_dbs: tuple[str, str]) -> None:
    """More events than `batch_max`: all applied, in order, across several transactions."""
    dsn = twin_dbs[0]
    p = principals()[2]
    events = [
        make_event("rs_big", seq, Decimal(seq) / 100, (seq, 0), key_hash=p.key_hash, user_id="", team_id="")
        for seq in range(1, 12)
    ]
    sink = LedgerSink(dsn, batch_max=4)
    try:
        assert [o.kind for o in sink.write(events, now=NOW)] == ["applied"] * 11
    finally:
        sink.close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT last_seq FROM realtime_sidecar.litellm_sessions WHERE session_id = 'rs_big'")
        assert row.fetchone() == (11,)


def test_schema_statements_are_reused(twin_dbs: tuple[str, str]) -> None:
    """The same LedgerSchema gives the same composed statements (composed once), a new probe new ones."""
    from sidecar.ledger.writer import _statements

    with psycopg.connect(twin_dbs[0], autocommit=True) as conn:
        schema: LedgerSchema = probe(conn)
        assert _statements(schema) is _statements(schema)
        assert "%(amount)s" in _statements(schema).increments["LiteLLM_VerificationToken"]
