"""Redis Cluster correctness (issue 18, item 2): every multi-key operation in one hash slot, each family working on
a real three-master cluster with replicas (tests/redis_cluster.py), the control channel sharded."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import cast

import orjson
import pytest
from redis.asyncio.cluster import ClusterNode, ClusterPubSub
from redis.asyncio.cluster import RedisCluster as ClusterClient

from sidecar.billing import BillingWriter, UsageConsumer, make_engine, upgrade
from sidecar.billing.consumer import create_groups_when_reachable
from sidecar.client_secrets import RedisClaims
from sidecar.control import SUBSCRIBED, ControlError, RedisStore, SessionInfo, _sharded, billed_key
from sidecar.errors import ServiceUnavailable
from sidecar.ledger import invalidation
from sidecar.ledger.aftercommit import AfterCommit
from sidecar.ledger.budget import BudgetSettler, settled_key
from sidecar.ledger.status import stream_status
from sidecar.publisher import RedisPublisher, stream_fields
from sidecar.redis_keys import budget_prefix, dead_stream, has_tag, is_cluster
from sidecar.spool import Spool
from sidecar.testing.factories import usage_event
from tests.billing_support import free_port, poll, quick_redis, read_billing
from tests.redis_cluster import RedisCluster, slot_of, slots_of
from tests.test_ledger_budget import applied, subscribed

KEY = "key:" + "ab" * 32
TEAM = "team:team-a"
WINDOWS = orjson.dumps({KEY: "2026-12-31T00:00:00Z", TEAM: "all"}).decode()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """Three masters with a replica each, shared by this module's tests (none of them kills a node)."""
    servers = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        asyncio.run(servers.start())
        yield servers
    finally:
        servers.stop()


@pytest.fixture
async def client(cluster: RedisCluster) -> AsyncIterator[ClusterClient]:
    """A cluster client on the module's cluster."""
    redis = cluster.client()
    yield redis
    await redis.aclose()


# ---- the slot rule, pure -----------------------------------------------------------------------------


def test_the_settle_script_keys_of_a_key_and_its_team_share_one_slot_on_a_cluster() -> None:
    """A session's settled figure and the billed counters of its key and its team (shared with other keys): one slot."""
    prefix = budget_prefix("realtime", cluster=True)
    keys = [
        settled_key(prefix, "rs_1"),
        billed_key(prefix, KEY, "2026-12-31T00:00:00Z"),
        billed_key(prefix, TEAM, "all"),
    ]
    keys += [settled_key(prefix, "rs_2"), billed_key(prefix, "team:other", "all")]
    assert {slot_of(k) for k in keys} == {slot_of("realtime")}
    assert keys[1] == "{realtime}:billed:" + KEY + ":2026-12-31T00:00:00Z"


def test_dead_letters_share_the_usage_streams_slot_on_a_cluster() -> None:
    """`{realtime:usage}:dead` hashes as `realtime:usage` does (bury = XADD + XACK in one MULTI); a stream with its
    own tag keeps it."""
    assert dead_stream("realtime:usage", cluster=True) == "{realtime:usage}:dead"
    assert slot_of("{realtime:usage}:dead") == slot_of("realtime:usage")
    assert slot_of("realtime:usage:dead") != slot_of("realtime:usage")  # why the bare name cannot be kept there
    assert dead_stream("{tenant}:usage", cluster=True) == "{tenant}:usage:dead"
    assert has_tag("{a}b") and not has_tag("{}a") and not has_tag("a}{") and not has_tag("a{")


def test_a_single_redis_keeps_the_documented_names() -> None:
    """Without a cluster nothing is renamed: counters and dead letters survive an upgrade."""
    prefix = budget_prefix("realtime", cluster=False)
    assert billed_key(prefix, TEAM, "all") == "realtime:billed:team:team-a:all"
    assert settled_key(prefix, "rs_1") == "realtime:ledger:settled:rs_1"
    assert dead_stream("realtime:usage", cluster=False) == "realtime:usage:dead"


async def test_an_unreachable_cluster_is_a_redis_failure_like_any_other(caplog: pytest.LogCaptureFixture) -> None:
    """Every seed down: the cluster client raises RedisClusterException, which is no RedisError; each layer still
    turns it into its own outage (fail-open admission, a retried consumer, 503 for a claim, a logged settle)."""
    dead = ClusterClient(startup_nodes=[ClusterNode("127.0.0.1", free_port())], socket_connect_timeout=1)
    try:
        store = RedisStore(dead)
        assert await store.ping() is False
        with pytest.raises(ControlError):
            await store.acquire("k", "rs_a", limit=1, now=1.0)
        with pytest.raises(ServiceUnavailable):
            await RedisClaims(dead).claim("cs_1", ttl_s=60)
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.2, stop.set)
        assert await create_groups_when_reachable(dead, "realtime:usage", ["billing"], stop, backoff_s=0.05) is False
        final = usage_event("rs_u", 2, final=True, budget_windows=WINDOWS)
        await AfterCommit(dead, prefix="realtime", proxy_redis=None, namespace=None).batch([final], [applied(final)])
        assert "budget settle failed after commit (RedisClusterException)" in caplog.text
    finally:
        await dead.aclose()


class _ClosedShard:
    """A cluster pub/sub whose per-node pub/sub redis-py has closed (its connection is gone)."""

    node_pubsub_mapping = {"127.0.0.1:1": object()}

    async def get_sharded_message(self, **_: object) -> dict[str, object] | None:
        raise RuntimeError("pubsub connection not set: did you forget to call subscribe() or psubscribe()?")


async def test_a_closed_shard_subscription_is_a_lost_control_channel() -> None:
    """redis-py closing the per-node pub/sub under the reader is a ControlError (the Supervisor subscribes again),
    never an exception that would end the Supervisor's task group."""
    with pytest.raises(ControlError):
        await anext(_sharded(cast(ClusterPubSub, _ClosedShard())))


# ---- each family on a real cluster --------------------------------------------------------------------


async def test_the_cluster_computes_the_same_slots(cluster: RedisCluster, client: ClusterClient) -> None:
    """CLUSTER KEYSLOT agrees with the CRC16 the tests (and redis-py's router) use, for every tagged family."""
    families = [
        ["realtime:usage", dead_stream("realtime:usage", cluster=True)],
        [settled_key("{realtime}", "rs_1"), billed_key("{realtime}", KEY, "all"), billed_key("{realtime}", TEAM, "x")],
    ]
    for keys in families:
        assert await slots_of(cluster, keys) == {slot_of(keys[0])}
    assert is_cluster(client)


async def test_the_control_store_works_on_a_cluster(cluster: RedisCluster, client: ClusterClient, unique: str) -> None:
    """Leases (Lua, one key), the registry and running costs (pipelines of single-key commands across slots), the
    billed counters (MULTI on one key) and the sharded control channel, all on the cluster."""
    store = RedisStore(client, channel=f"test:{unique}:control", prefix=f"test:{unique}")
    assert await store.acquire("k1", "rs_a", limit=2, now=100.0)
    assert await store.acquire("k1", "rs_b", limit=2, now=100.0)
    assert not await store.acquire("k1", "rs_c", limit=2, now=100.0)
    infos = [_info("rs_a", "k1"), _info("rs_b", "k1"), _info("rs_d", "k2")]
    await store.heartbeat(infos, {"key:k1": {"rs_a": Decimal("0.5"), "rs_b": Decimal("0.25")}}, now=100.0)
    assert sorted(i.session_id for i in await store.sessions(now=101.0)) == ["rs_a", "rs_b", "rs_d"]
    assert await store.live_costs("key:k1", now=101.0) == {"rs_a": Decimal("0.5"), "rs_b": Decimal("0.25")}
    await store.release("k1", "rs_a")
    assert await store.acquire("k1", "rs_c", limit=2, now=101.0)
    await store.add_billed("key:k1", "all", Decimal("1.25"))
    await store.add_billed("key:k1", "all", Decimal("0.5"))
    assert await store.billed("key:k1", "all") == Decimal("1.75")
    assert await client.exists(f"{{test:{unique}}}:billed:key:k1:all") == 1  # the budget family's tagged name

    received = await _subscribed(store, cluster, f"test:{unique}:control")
    try:
        await store.publish({"action": "revoke", "key_hash": "k1"})
        async with asyncio.timeout(10):
            assert await received.get() == {"action": "revoke", "key_hash": "k1"}
    finally:
        await _stop(received)


async def test_the_settle_script_settles_a_batch_on_a_cluster(
    cluster: RedisCluster, client: ClusterClient, unique: str
) -> None:
    """One script call for a batch of several sessions' events (repeats included) on the cluster: each session's
    final cost taken off the key's and the team's counters once; after SCRIPT FLUSH on every master (a failover to a
    replica without the script looks the same) the script is loaded again and nothing is settled twice."""
    prefix = f"test:{unique}"
    settler = BudgetSettler(client, prefix=prefix)
    batch = [
        usage_event(f"rs_{n}", seq, final=seq == 3, budget_windows=WINDOWS) for n in range(3) for seq in (1, 2, 3, 2)
    ]
    settled = await settler.settle_many(batch)
    final = batch[2].cost_usd
    assert sum(settled) == 3 * final
    for scope, window in ((KEY, "2026-12-31T00:00:00Z"), (TEAM, "all")):
        raw = await client.get(billed_key("{" + prefix + "}", scope, window))
        assert Decimal(raw.decode()) == -3 * final
    for port in await cluster.topology():
        await cluster.ask(cluster.node(port), "SCRIPT", "FLUSH")
    assert await settler.settle_many(batch) == [Decimal(0)] * len(batch)
    more = usage_event("rs_0", 4, budget_windows=WINDOWS, cost_usd=final + Decimal("0.001"))
    assert await settler.settle_many([more]) == [Decimal("0.001")]


async def test_the_ledger_sinks_after_commit_on_a_cluster(
    cluster: RedisCluster, client: ClusterClient, unique: str
) -> None:
    """The LiteLLM sink's after-commit on a cluster: the settle lands in the budget family's slot, and LiteLLM's
    invalidations, published as LiteLLM publishes them (classic PUBLISH) through one node of the proxy's cluster,
    reach a LiteLLM worker subscribed (classic SUBSCRIBE) on another master."""
    prefix, namespace = f"test:{unique}", f"test-{unique}"
    first, second = sorted(await cluster.topology())[:2]
    channel = invalidation.channel(namespace)
    worker, pubsub = await subscribed(cluster.node(second).url, channel)
    proxy = quick_redis(cluster.node(first).url)  # SIDECAR_LITELLM_REDIS_URL: one node's URL
    try:
        final = usage_event("rs_ac", 2, final=True, budget_windows=WINDOWS)
        await AfterCommit(client, prefix=prefix, proxy_redis=proxy, namespace=namespace).batch(
            [final], [applied(final)]
        )
        got: list[str] = []
        expected = invalidation.cache_keys(
            key_hash=final.key_hash,
            user_id=final.user_id,
            team_id=final.team_id,
            organization_id="org-1",
            tags=["prod"],
        )
        while len(got) < len(expected):
            item = await pubsub.get_message(timeout=5)
            assert item is not None, f"invalidations missing (got {got})"
            got.append(orjson.loads(item["data"])["cache_key"])
        assert got == expected
        raw = await client.get(billed_key("{" + prefix + "}", TEAM, "all"))
        assert Decimal(raw.decode()) == -final.cost_usd
    finally:
        await pubsub.aclose()
        await worker.aclose()
        await proxy.aclose()


async def test_publisher_consumer_and_dead_letters_on_a_cluster(
    client: ClusterClient, pg_url: str, tmp_path: Path, unique: str
) -> None:
    """Usage published (XADD pipeline) and consumed (XREADGROUP, XACK, XTRIM) on the cluster; an unparsable entry is
    dead-lettered into `{stream}:dead` and acknowledged in one MULTI; `ledger status` counts it."""
    stream = f"test:{unique}:realtime:usage"
    publisher = RedisPublisher(client, stream=stream, spool=Spool(tmp_path / "spool", sink="redis-cluster:test"))
    await publisher.start()
    events = [usage_event(f"rs_{n}", seq, final=seq == 2) for n in range(3) for seq in (1, 2)]
    for event in events[:3]:
        publisher.submit(event)
    await publisher.drained()
    await client.xadd(stream, {**stream_fields(events[3]), "schema": "nope"})  # unparsable: dead-lettered
    for event in events[3:]:
        publisher.submit(event)
    await publisher.aclose()
    assert publisher.publish_failures == 0

    stop = asyncio.Event()
    assert await create_groups_when_reachable(client, stream, ["billing"], stop)
    engine = make_engine(pg_url)
    upgrade(engine)
    consumer = UsageConsumer(client, BillingWriter(engine), stream=stream, block_ms=0)
    while await consumer.run_once():
        pass
    billed = read_billing(engine)
    assert sorted((e.session_id, e.seq) for e in billed.events) == sorted((e.session_id, e.seq) for e in events)
    (letter,) = await client.xrange(dead_stream(stream, cluster=True))
    assert letter[1][b"group"] == b"billing" and b"schema" in letter[1][b"reason"]
    assert await client.xlen(stream) == 0  # everything acknowledged: trimmed
    (status,) = await stream_status(client, stream, ["billing"], now=datetime.now(UTC))
    assert (status.pending, status.dead_letters) == (0, 1)
    engine.dispose()


async def test_the_control_channel_follows_its_shard_through_a_failover(
    cluster: RedisCluster, client: ClusterClient, unique: str
) -> None:
    """After CLUSTER FAILOVER of the master holding the control channel's slot, a subscriber that lost its
    subscription subscribes again on the new master, and a revocation published then reaches it."""
    channel = f"test:{unique}:control"
    store = RedisStore(client, channel=channel, prefix=f"test:{unique}")
    received = await _subscribed(store, cluster, channel)
    try:
        old, new = await cluster.failover(channel)
        assert old != new
        await poll(lambda: _subscribers(cluster, new, channel), what="the subscription on the new master")
        await store.publish({"action": "terminate", "session_id": "rs_x"})
        async with asyncio.timeout(10):
            assert await received.get() == {"action": "terminate", "session_id": "rs_x"}
    finally:
        await _stop(received)


async def test_the_control_channel_survives_its_master_killed(
    cluster: RedisCluster, client: ClusterClient, unique: str
) -> None:
    """The master holding the control channel's slot is killed: the subscriber's connection fails, it reads the
    slot map again and subscribes on the promoted replica, and a termination published then reaches it. (The
    killed node is restarted afterwards and rejoins as a replica.)"""
    channel = f"test:{unique}:control"
    store = RedisStore(client, channel=channel, prefix=f"test:{unique}")
    received = await _subscribed(store, cluster, channel)
    killed = None
    try:
        killed, new = await cluster.kill_master(channel)
        await poll(lambda: _subscribers(cluster, new, channel), what="the subscription on the promoted replica")
        await store.publish({"action": "terminate", "session_id": "rs_y"})
        async with asyncio.timeout(10):
            assert await received.get() == {"action": "terminate", "session_id": "rs_y"}
    finally:
        await _stop(received)
        if killed is not None:
            await cluster.restart(killed)


# ---- helpers ------------------------------------------------------------------------------------------


def _info(session_id: str, key_hash: str) -> SessionInfo:
    return SessionInfo(session_id, "r1", key_hash, "alias", "u", "t", "m", "2026-01-01T00:00:00+00:00", "1", "0.1")


class _Listener(asyncio.Queue[dict[str, str]]):
    task: asyncio.Task[None]


async def _subscribed(store: RedisStore, cluster: RedisCluster, channel: str) -> _Listener:
    """Listen to `store.messages()` as the Supervisor does (subscribing again after an error) until the sharded
    subscription is in place; the queue gets every message."""
    queue = _Listener()

    async def listen() -> None:
        while True:
            with contextlib.suppress(Exception):  # the subscription was lost: subscribe again, as the Supervisor does
                async for message in store.messages():
                    if message is not SUBSCRIBED:  # the push carries its control log entry's id (test_control_log.py)
                        queue.put_nowait({k: v for k, v in message.items() if k != "log_id"})
            await asyncio.sleep(0.1)  # the Supervisor waits HEARTBEAT_S before subscribing again

    queue.task = asyncio.create_task(listen())
    master = await cluster.master_of(channel)
    await poll(lambda: _subscribers(cluster, master, channel), what="the sharded subscription")
    return queue


async def _subscribers(cluster: RedisCluster, port: int, channel: str) -> bool:
    reply = await cluster.ask(cluster.node(port), "PUBSUB", "SHARDNUMSUB", channel)
    assert isinstance(reply, list)
    return int(reply[1]) > 0


async def _stop(listener: _Listener) -> None:
    listener.task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listener.task
