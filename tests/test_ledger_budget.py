"""The budget rule once realtime spend is in LiteLLM: the sink settles each applied amount once (real Redis)."""

from __future__ import annotations

import itertools
import logging
import math
import random
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import psycopg
import pytest
import redis.asyncio as aioredis

from sidecar.auth import KeyChecker, Principal
from sidecar.control import BILLED_TTL_S, RedisStore, Supervisor, billed_key, budget_windows, window_of
from sidecar.ledger import invalidation
from sidecar.ledger.aftercommit import AfterCommit
from sidecar.ledger.budget import BudgetSettler, settled_key, windows
from sidecar.ledger.schema import probe
from sidecar.ledger.writer import Outcome, apply, ensure_sink_tables
from sidecar.metrics import Metrics
from sidecar.testing.factories import usage_event
from sidecar.usage import UsageEvent
from tests.billing_support import RedisServer
from tests.litellm_schema import seed_principal
from tests.test_session import append, make

KEY = "key:" + "ab" * 32
TEAM = "team:team-a"
WINDOWS = orjson.dumps({KEY: "2026-12-31T00:00:00Z", TEAM: "all"}).decode()


def events(session_id: str = "rs_b", n: int = 3) -> list[UsageEvent]:
    """`n` cumulative events of one budgeted session (costs 0.0005, 0.001, ...), the last one final."""
    return [usage_event(session_id, seq, final=seq == n, budget_windows=WINDOWS) for seq in range(1, n + 1)]


async def counters(redis: aioredis.Redis, prefix: str) -> tuple[float, float]:
    """The key's and the team's billed counters in the event's windows (0 when absent)."""
    found = []
    for scope, window in windows(WINDOWS).items():
        raw = await redis.get(billed_key(prefix, scope, window))
        found.append(float(raw) if raw else 0.0)
    return found[0], found[1]


def test_budget_windows_name_each_budgeted_scope_and_its_window() -> None:
    """Key and team budgets give both scopes with their reset windows ('all' without one); no budget: ''."""
    p = Principal(key_hash="h", team_id="t", max_budget=Decimal(5), budget_reset_at="2026-12-31T00:00:00Z")
    assert budget_windows(p) == '{"key:h":"2026-12-31T00:00:00Z"}'
    both = replace(p, team_max_budget=Decimal(9))
    assert orjson.loads(budget_windows(both)) == {"key:h": "2026-12-31T00:00:00Z", "team:t": "all"}
    assert budget_windows(Principal(key_hash="h", team_id="t")) == ""
    assert budget_windows(replace(both, is_master=True)) == ""
    assert windows(budget_windows(both)) == {"key:h": "2026-12-31T00:00:00Z", "team:t": window_of(both, "team:t")}


def test_unreadable_budget_windows_name_no_scope() -> None:
    """Empty, not JSON, not an object, or non-string entries: no scope is settled."""
    for text in ("", "{", "[1]", '{"key:h": 3}', '"x"'):
        assert windows(text) == {}, text


async def test_settle_is_exactly_once_under_duplicates_and_disorder(redis_client: aioredis.Redis, unique: str) -> None:
    """Each scope's counter drops by the highest cumulative cost once, whatever the order and repeats."""
    prefix = f"test:{unique}"
    settler = BudgetSettler(redis_client, prefix=prefix)
    first, second, final = events()
    assert await settler.settle(second) == second.cost_usd
    assert await settler.settle(first) == 0  # older: already covered
    assert await settler.settle(second) == 0  # duplicate
    assert await settler.settle(final) == final.cost_usd - second.cost_usd
    for e in (final, first, second, final):  # a replay of everything
        assert await settler.settle(e) == 0
    key, team = await counters(redis_client, prefix)
    assert math.isclose(key, -float(final.cost_usd)) and math.isclose(team, -float(final.cost_usd))
    assert Decimal((await redis_client.get(settled_key(prefix, "rs_b"))).decode()) == final.cost_usd
    assert 0 < await redis_client.ttl(settled_key(prefix, "rs_b")) <= BILLED_TTL_S
    for scope, window in windows(WINDOWS).items():
        assert 0 < await redis_client.ttl(billed_key(prefix, scope, window)) <= BILLED_TTL_S


async def test_any_order_with_repeats_settles_the_final_cost_once(redis_client: aioredis.Redis, unique: str) -> None:
    """Every order of a session's four events, each delivered one to three times: the counters fall by the top once."""
    prefix = f"test:{unique}"
    settler = BudgetSettler(redis_client, prefix=prefix)
    rng = random.Random(14)
    orders = list(itertools.permutations(range(4)))
    for n, order in enumerate(orders):
        session = events(f"rs_{n}", 4)
        delivered = [session[i] for i in order for _ in range(rng.randint(1, 3))]
        settled = [await settler.settle(e) for e in delivered]
        assert sum(settled) == session[-1].cost_usd, order
    key, team = await counters(redis_client, prefix)
    expected = -float(events(n=4)[-1].cost_usd) * len(orders)
    assert math.isclose(key, expected) and math.isclose(team, expected)


async def test_a_batch_settles_what_its_events_settle_one_by_one(tmp_path: Path) -> None:
    """Several sessions' events, repeated and out of order, in one `settle_many` (one script call): each event settles
    what it settles alone, in the same order, and the counters match; on a fresh Redis without the script (NOSCRIPT)
    the script is loaded and the batch settled once."""
    server = RedisServer(tmp_path / "redis")
    await server.start()
    client = aioredis.Redis.from_url(server.url)
    try:
        rng = random.Random(15)
        delivered = [e for n in range(4) for e in events(f"rs_m{n}", 3) for _ in range(rng.randint(1, 2))]
        rng.shuffle(delivered)
        delivered.append(usage_event("rs_free", 1))  # no budget scope: settles nothing, touches nothing
        assert await client.script_exists(BudgetSettler(client, prefix="x")._script.sha) == [False]
        batched = await BudgetSettler(client, prefix="batch").settle_many(delivered)
        one_by_one = BudgetSettler(client, prefix="single")
        assert batched == [await one_by_one.settle(e) for e in delivered]
        assert sum(batched) == 4 * events(n=3)[-1].cost_usd
        assert await counters(client, "batch") == await counters(client, "single")
        assert await BudgetSettler(client, prefix="batch").settle_many(delivered) == [Decimal(0)] * len(delivered)
    finally:
        await client.aclose()
        await server.stop()


async def test_a_batch_publishes_each_cache_key_once(redis_client: aioredis.Redis, redis_url: str, unique: str) -> None:
    """Several applied events of the same key, user and team in one batch: each cache key published once; skipped,
    dead-lettered and unknown-key outcomes publish nothing."""
    prefix, namespace = f"test:{unique}", f"test-{unique}"
    listener, pubsub = await subscribed(redis_url, invalidation.channel(namespace))
    proxy = aioredis.Redis.from_url(redis_url)
    try:
        after = AfterCommit(redis_client, prefix=prefix, proxy_redis=proxy, namespace=namespace)
        first, second, final = events()
        stranger = final.with_changes(key_hash="cd" * 32, session_id="rs_stranger", budget_windows="")
        await after.batch(
            [first, second, final, second, stranger],
            [applied(first), applied(second), applied(final), Outcome("skipped"), applied(stranger, key_exists=False)],
        )
        await proxy.publish(invalidation.channel(namespace), invalidation.message("end-of-test"))
        got: list[str] = []
        while not got or got[-1] != "end-of-test":
            item = await pubsub.get_message(timeout=5)
            assert item is not None, f"the end marker never arrived (got {got})"
            got.append(orjson.loads(item["data"])["cache_key"])
        expected = invalidation.cache_keys(
            key_hash=final.key_hash, user_id=final.user_id, team_id=final.team_id, organization_id="org-1",
            tags=["prod"],
        )  # fmt: skip
        assert got == [*expected, "end-of-test"]
        key, team = await counters(redis_client, prefix)
        assert math.isclose(key, -float(final.cost_usd)) and math.isclose(team, -float(final.cost_usd))
    finally:
        await pubsub.aclose()
        await listener.aclose()
        await proxy.aclose()


async def test_no_budget_scope_settles_nothing(redis_client: aioredis.Redis, unique: str) -> None:
    """An event without budget windows touches no Redis key (not even the settled figure)."""
    prefix = f"test:{unique}"
    assert await BudgetSettler(redis_client, prefix=prefix).settle(usage_event("rs_n", 2)) == 0
    assert [k async for k in redis_client.scan_iter(match=f"{prefix}*")] == []


async def subscribed(redis_url: str, channel: str) -> tuple[aioredis.Redis, Any]:
    """A client and its pub/sub subscribed to `channel` (confirmed before returning)."""
    client = aioredis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    await pubsub.subscribe(channel)
    confirmation = await pubsub.get_message(timeout=5)
    assert confirmation is not None and confirmation["type"] == "subscribe"
    return client, pubsub


def applied(event: UsageEvent, *, key_exists: bool = True) -> Outcome:
    """An applied outcome charging the event's key, user, team and an organization."""
    return Outcome(
        "applied", key_exists=key_exists, key_hash=event.key_hash, user_id=event.user_id, team_id=event.team_id,
        organization_id="org-1", tags=("prod",),
    )  # fmt: skip


async def test_after_commit_settles_then_invalidates_on_the_namespaced_channel(
    redis_client: aioredis.Redis, redis_url: str, unique: str
) -> None:
    """Applied: the counters settle and every cache key is published to `<ns>:litellm_proxy...`; skipped:
    settle only; dead letter, unknown key or no proxy Redis: nothing published."""
    prefix, namespace = f"test:{unique}", f"test-{unique}"
    listener, pubsub = await subscribed(redis_url, invalidation.channel(namespace))
    proxy = aioredis.Redis.from_url(redis_url)
    try:
        after = AfterCommit(redis_client, prefix=prefix, proxy_redis=proxy, namespace=namespace)
        first, second, final = events()
        settled = settled_key(prefix, "rs_b")
        await after(first, Outcome("skipped", "seq 1 is not newer"))
        assert Decimal((await redis_client.get(settled)).decode()) == first.cost_usd  # a skip settles too
        await after(second, Outcome("dead_letter", "negative delta"))
        assert Decimal((await redis_client.get(settled)).decode()) == first.cost_usd  # a dead letter does not
        await after(second, applied(second, key_exists=False))
        await AfterCommit(redis_client, prefix=prefix, proxy_redis=None, namespace=namespace)(second, applied(second))
        await after(final, applied(final))
        await proxy.publish(invalidation.channel(namespace), invalidation.message("end-of-test"))
        expected = invalidation.cache_keys(
            key_hash=final.key_hash,
            user_id=final.user_id,
            team_id=final.team_id,
            organization_id="org-1",
            tags=["prod"],
        )
        got: list[str] = []
        while not got or got[-1] != "end-of-test":
            item = await pubsub.get_message(timeout=5)
            assert item is not None, f"the end marker never arrived (got {got})"
            got.append(orjson.loads(item["data"])["cache_key"])
        assert got == [*expected, "end-of-test"]  # the final's alone: the other outcomes published nothing
        key, team = await counters(redis_client, prefix)
        assert math.isclose(key, -float(final.cost_usd)) and math.isclose(team, -float(final.cost_usd))
    finally:
        await pubsub.aclose()
        await listener.aclose()
        await proxy.aclose()


async def test_after_commit_logs_redis_failures_and_never_raises(
    redis_client: aioredis.Redis, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Both Redis unreachable: two warnings naming the step and the error type, no URL; no exception."""
    dead = aioredis.Redis.from_url("redis://:s3cret@127.0.0.1:1/0", socket_connect_timeout=1)
    try:
        event = events()[0]
        with caplog.at_level(logging.WARNING, logger="sidecar.ledger"):
            await AfterCommit(dead, prefix=f"test:{unique}", proxy_redis=dead, namespace=None)(event, applied(event))
        messages = [r.getMessage() for r in caplog.records if r.name == "sidecar.ledger"]
        assert len(messages) == 2 and "budget settle" in messages[0] and "cache invalidation" in messages[1]
        assert all("ConnectionError" in m and "s3cret" not in m and "127.0.0.1" not in m for m in messages)
    finally:
        await dead.aclose()


async def test_the_admission_total_counts_realtime_spend_once_across_the_sink(
    redis_client: aioredis.Redis, unique: str, litellm_db: str
) -> None:
    """A budgeted key and team: the admission total is LiteLLM spend + realtime spend, once, before the sink
    applies a checkpoint, after it (with /key/info showing it), at the end, and after the final is redelivered
    following a crash between its commit and its settle (twice only in that gap: never less)."""
    clock = [1000.0]
    supervisor = Supervisor(
        store=RedisStore(redis_client, channel=f"test:{unique}:control", prefix=f"test:{unique}"),
        checker=KeyChecker(master_key="sk-master", client=None),
        metrics=Metrics(),
        replica="r1",
        key_recheck_s=60.0,
        max_sessions=10,
        max_sessions_per_key=10,
        wall=lambda: clock[0],
    )
    after = AfterCommit(redis_client, prefix=f"test:{unique}", proxy_redis=None, namespace=None)
    with psycopg.connect(litellm_db, autocommit=True) as conn:
        ensure_sink_tables(conn)
        seeded = seed_principal(conn)
        conn.execute('UPDATE "LiteLLM_VerificationToken" SET spend = 1.5')  # earlier chat spend
        conn.execute('UPDATE "LiteLLM_TeamTable" SET spend = 4.25')
        schema = probe(conn)
        base = Principal(
            key_hash=seeded.key_hash, key_alias=seeded.key_alias, user_id=seeded.user_id, team_id=seeded.team_id,
            max_budget=Decimal(100), team_max_budget=Decimal(100), budget_reset_at="2026-12-31T00:00:00Z",
        )  # fmt: skip

        def key_info() -> Principal:
            """The principal as /key/info describes it now: LiteLLM's key and team spend."""
            row = conn.execute(
                'SELECT k.spend, t.spend FROM "LiteLLM_VerificationToken" k JOIN "LiteLLM_TeamTable" t USING (team_id)'
            ).fetchone()
            assert row is not None
            return replace(base, spend=Decimal(repr(row[0])), team_spend=Decimal(repr(row[1])))

        async def check(realtime: Decimal) -> None:
            """The admission total of each scope is its earlier spend plus `realtime`, counted once."""
            p = key_info()
            for scope, earlier in ((f"key:{p.key_hash}", 1.5), (f"team:{p.team_id}", 4.25)):
                total = await supervisor._scope_total(p, scope)
                assert math.isclose(total, earlier + float(realtime), abs_tol=1e-9), (scope, total, realtime)

        async def sink(event: UsageEvent, kind: str) -> None:
            """The sink's step for one delivery: apply, then the post-commit actions."""
            outcome = apply(conn, schema, event, now=event.started_at)
            assert outcome.kind == kind
            await after(event, outcome)

        session = make()
        session.session_id, session.principal = f"rs_{unique}", base
        session.budget_windows = budget_windows(base)
        relay = SimpleNamespace(
            session=session,
            frames_in=1,
            frames_out=0,
            bytes_in=1,
            bytes_out=0,
            close_reason="client_close",
            meters_audio=True,  # a WebSocket session's relay meters the audio it relays (control.Watched)
            figures=session.figures,  # what the supervisor reads of a relay (relay.Relay.figures / cost)
            cost=lambda: session.figures().cost_usd,
        )
        supervisor.attach(relay)  # type: ignore[arg-type]
        session.on_client_text(append(bytes(48_000 * 3)))
        checkpoint = session.usage_event("checkpoint", now=session.started_at)
        await supervisor.heartbeat()
        await check(checkpoint.cost_usd)  # live only

        await sink(checkpoint, "applied")
        await check(checkpoint.cost_usd)  # in LiteLLM, settled, still live

        session.on_client_text(append(bytes(48_000 * 4)))
        await supervisor.heartbeat()
        final = session.usage_event("final", now=session.started_at, close_reason="client_close")
        assert final.cost_usd > checkpoint.cost_usd
        await check(final.cost_usd)  # part in LiteLLM, the rest live

        await supervisor.detach(relay)  # type: ignore[arg-type]
        clock[0] += 60  # its running cost expires from the registry
        await check(final.cost_usd)  # part in LiteLLM, the rest billed

        assert apply(conn, schema, final, now=final.started_at).kind == "applied"  # then a crash: no settle
        await check(final.cost_usd + final.cost_usd - checkpoint.cost_usd)  # the unsettled part counted twice

        for again in (checkpoint, final, checkpoint):  # redelivery after the crash: skipped, and settled
            await sink(again, "skipped")
        await check(final.cost_usd)  # all in LiteLLM, once
        await sink(final, "skipped")  # and once more
        await check(final.cost_usd)
        logged = conn.execute('SELECT sum(spend) FROM "LiteLLM_SpendLogs"').fetchone()
        assert logged is not None and math.isclose(logged[0], float(final.cost_usd))
