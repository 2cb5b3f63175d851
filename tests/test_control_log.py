"""The control log: control messages published while a replica is not subscribed still reach it, once.

Real Supervisors over real Redis (a private `redis-server` where the test kills pub/sub connections, so no other
test's subscriber is touched), with the project's stand-in sessions (real `Session` objects, tests/test_session.py)
watched as a relay would be.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from sidecar.auth import KeyChecker
from sidecar.control import ControlError, RedisStore, Supervisor
from sidecar.metrics import Metrics
from tests.billing_support import poll
from tests.redis_ha import RedisNode
from tests.relay_stack import MASTER_KEY
from tests.test_session import make

KEY = "h" * 64  # the stand-ins' key hash (tests/test_session.py `make`)


class StandIn:
    """A live session as the Supervisor watches it (a relay's surface), ending when told to."""

    meters_audio = False
    frames_in = frames_out = bytes_in = bytes_out = 0

    def __init__(self, session_id: str, *, key_hash: str = KEY, user_id: str = "u") -> None:
        self.session = make()
        self.session.session_id = session_id
        self.session.principal = replace(self.session.principal, key_hash=key_hash, user_id=user_id)
        self.figures = self.session.figures
        self.cost = self.session.meter.cost
        self.close_reason = ""
        self.endings: list[str] = []

    @property
    def ended(self) -> bool:
        return bool(self.close_reason)

    def end(self, code: str) -> None:
        self.endings.append(code)
        self.close_reason = self.close_reason or code

    def poll(self, now: float) -> None:
        return None


def supervisor(store: RedisStore, replica: str) -> Supervisor:
    return Supervisor(
        store=store,
        checker=KeyChecker(master_key=MASTER_KEY, client=None),
        metrics=Metrics(),
        replica=replica,
        key_recheck_s=3600.0,
        max_sessions=100,
        max_sessions_per_key=100,
    )


def ended(s: Supervisor, reason: str) -> float:
    value = s.metrics.registry.get_sample_value("sidecar_revocations_total", {"reason": reason})
    return value or 0.0


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[RedisNode]:
    """A private redis-server: CLIENT KILL TYPE pubsub here touches no other test's subscriber."""
    server = RedisNode(tmp_path / "redis", args=[])
    await server.start()
    try:
        yield server
    finally:
        await server.kill()


async def subscribers(client: aioredis.Redis, channel: str) -> int:
    return int(dict(await client.pubsub_numsub(channel))[channel.encode()])


class GatedStore(RedisStore):
    """A RedisStore whose subscriptions after the first wait for `gate`: a replica that has lost its subscription
    and has not subscribed again, for as long as the test needs."""

    def __init__(self, redis: aioredis.Redis, **kwargs: Any) -> None:
        super().__init__(redis, **kwargs)
        self.gate = asyncio.Event()
        self.subscriptions = 0

    async def messages(self) -> AsyncIterator[dict[str, str]]:
        self.subscriptions += 1
        if self.subscriptions > 1:
            await self.gate.wait()
        async for message in super().messages():
            yield message


def unretried(node: RedisNode) -> aioredis.Redis:
    """A client whose pub/sub does not reconnect by itself (redis-py would otherwise retry once at once)."""
    return aioredis.Redis(host="127.0.0.1", port=node.port, retry=Retry(NoBackoff(), 0))


def push_counts(client: aioredis.Redis) -> list[int]:
    """Record how many subscribers each PUBLISH through `client` reached."""
    counts: list[int] = []
    original = client.publish

    async def publish(channel: str, data: bytes) -> int:
        reached = int(await original(channel, data))
        counts.append(reached)
        return reached

    client.publish = publish  # type: ignore[method-assign]
    return counts


@pytest.mark.parametrize("path", ["heartbeat", "resubscription"])
async def test_messages_published_while_unsubscribed_end_sessions_once(node: RedisNode, unique: str, path: str) -> None:
    """B's pub/sub connection is killed (CLIENT KILL TYPE pubsub); a termination and a revocation published before
    B subscribes again reach nobody by pub/sub, yet end B's sessions from the control log: at B's next heartbeat
    (`heartbeat`: the whole Supervisor runs) or as soon as B subscribes again (`resubscription`: only its listener
    runs, so nothing else reads the log). Each is applied once although B reads the log again afterwards."""
    channel, prefix = f"test:{unique}:control", f"test:{unique}"
    admin_client, b_client, probe = node.client(), unretried(node), node.client()
    try:
        a = supervisor(RedisStore(admin_client, channel=channel, prefix=prefix), "a")
        store = GatedStore(b_client, channel=channel, prefix=prefix)
        b = supervisor(store, "b")
        target, revoked_1, revoked_2, other = (
            StandIn("rs_target", key_hash="k" * 64),
            StandIn("rs_r1"),
            StandIn("rs_r2"),
            StandIn("rs_other", key_hash="o" * 64),
        )
        for standin in (target, revoked_1, revoked_2, other):
            b.attach(standin)  # type: ignore[arg-type]
        task = asyncio.create_task(b.run() if path == "heartbeat" else b._listen_loop())
        try:
            await poll(lambda: _subscribed(probe, channel, b), what="B subscribed and at the log's end")
            await probe.client_kill_filter(_type="pubsub")
            await poll(lambda: _gated(store), what="B's listener noticed and waits to subscribe again")
            counts = push_counts(admin_client)
            await a.terminate("rs_target")
            await a.revoke(key_hash=KEY)
            assert counts == [0, 0]  # nobody heard the push: only the log carries these
            if path == "resubscription":
                assert not (target.ended or revoked_1.ended)
                store.gate.set()

            async def all_ended() -> bool:
                return target.ended and revoked_1.ended and revoked_2.ended

            await poll(all_ended, what="B's sessions ended from the control log")
            store.gate.set()
            await poll(lambda: _resubscribed(probe, channel), what="B subscribed again")
            assert await b.catch_up() == 0  # read again: nothing twice
            assert target.endings == ["session_terminated"]
            assert revoked_1.endings == revoked_2.endings == ["key_revoked"]
            assert not other.ended
            assert (ended(b, "session_terminated"), ended(b, "key_revoked")) == (1.0, 2.0)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        for client in (admin_client, b_client, probe):
            await client.aclose()


async def _gated(store: GatedStore) -> bool:
    return store.subscriptions == 2 and not store.gate.is_set()


async def _subscribed(probe: aioredis.Redis, channel: str, s: Supervisor) -> bool:
    return await subscribers(probe, channel) == 1 and s.log_cursor is not None


async def _resubscribed(probe: aioredis.Redis, channel: str) -> bool:
    return await subscribers(probe, channel) == 1


async def test_a_message_pushed_and_logged_is_applied_once(redis_url: str, unique: str) -> None:
    """A revocation that arrives by pub/sub is not applied again when the log gives it too (either order)."""
    channel, prefix = f"test:{unique}:control", f"test:{unique}"
    client = aioredis.Redis.from_url(redis_url)
    try:
        store = RedisStore(client, channel=channel, prefix=prefix)
        b = supervisor(store, "b")
        assert await b.catch_up() == 0  # a fresh replica: at the log's end
        standins = [StandIn(f"rs_{n}") for n in range(3)]
        terminated = StandIn("rs_t", user_id="v")
        for standin in (*standins, terminated):
            b.attach(standin)  # type: ignore[arg-type]
        pushed: list[dict[str, Any]] = []
        original = client.publish

        async def capture(name: str, data: bytes) -> int:
            pushed.append(orjson.loads(data))
            return int(await original(name, data))

        client.publish = capture  # type: ignore[method-assign]
        await b.revoke(user_id="u")
        await b.terminate("rs_t")
        assert [m["action"] for m in pushed] == ["revoke", "terminate"]
        assert all(m["log_id"] for m in pushed)
        assert b.receive(pushed[0]) == 3  # the push first: every session of user u
        assert await b.catch_up() == 1  # then the log: the revocation is not applied again, the termination is
        assert b.receive(pushed[0]) == 0  # the same push again: nothing
        assert b.receive(pushed[1]) == 0  # the log gave it already
        assert (ended(b, "key_revoked"), ended(b, "session_terminated")) == (3.0, 1.0)
        assert all(s.endings == ["key_revoked"] for s in standins)
        assert terminated.endings == ["session_terminated"]
    finally:
        await client.aclose()


async def test_a_fresh_replica_does_not_replay_old_messages(redis_url: str, unique: str) -> None:
    """Messages logged before a replica starts are not applied by it; messages after are."""
    channel, prefix = f"test:{unique}:control", f"test:{unique}"
    client = aioredis.Redis.from_url(redis_url)
    try:
        store = RedisStore(client, channel=channel, prefix=prefix)
        old = supervisor(store, "old")
        await old.terminate("rs_1")
        await old.revoke(key_hash=KEY)
        fresh = supervisor(store, "fresh")
        same_id, same_key = StandIn("rs_1"), StandIn("rs_2")
        fresh.attach(same_id)  # type: ignore[arg-type]
        fresh.attach(same_key)  # type: ignore[arg-type]
        assert await fresh.catch_up() == 0
        assert await fresh.catch_up() == 0
        assert not same_id.ended and not same_key.ended
        await old.terminate("rs_2")
        assert await fresh.catch_up() == 1
        assert same_key.endings == ["session_terminated"] and not same_id.ended
    finally:
        await client.aclose()


async def test_the_control_log_is_capped(redis_url: str, unique: str) -> None:
    """The log keeps the last `log_maxlen` messages; a replica reads past a batch in one catch-up."""
    channel, prefix = f"test:{unique}:control", f"test:{unique}"
    client = aioredis.Redis.from_url(redis_url)
    try:
        store = RedisStore(client, channel=channel, prefix=prefix, log_maxlen=150)
        b = supervisor(store, "b")
        await b.catch_up()
        standins = [StandIn(f"rs_{n}") for n in range(120)]
        for standin in standins:
            b.attach(standin)  # type: ignore[arg-type]
        for n in range(200):
            await b.terminate(f"rs_{n}")
        assert await client.xlen(f"{prefix}:control:log") == 150
        assert await b.catch_up() == 70  # the oldest 50 were trimmed: rs_50 .. rs_119 are still in the log
        assert [s.ended for s in standins] == [False] * 50 + [True] * 70
    finally:
        await client.aclose()


async def test_sentinel_failover_messages_appended_with_a_replica_reach_a_replica_that_missed_them(
    tmp_path: Path, unique: str
) -> None:
    """With Sentinel the append waits for a replica's copy (WAIT 1). The master is killed: B loses its
    subscription; a termination and a revocation accepted by the new master (its replica back in sync) while B
    has not subscribed again reach nobody by pub/sub, and still end B's sessions, once, from the log."""
    from sidecar.redis_conn import RedisTarget, connect_redis
    from tests.redis_ha import SERVICE, SentinelGroup

    group = SentinelGroup(tmp_path / "sentinel")
    await group.start()
    target = RedisTarget(mode="sentinel", nodes=tuple(s.address for s in group.sentinels), service_name=SERVICE)
    channel, prefix = f"test:{unique}:control", f"test:{unique}"
    admin_client = connect_redis(target, socket_timeout=5, socket_connect_timeout=2)
    b_client = connect_redis(target, socket_timeout=5, socket_connect_timeout=2)
    try:
        a = supervisor(RedisStore(admin_client, channel=channel, prefix=prefix, wait_replicas=1), "a")
        store = GatedStore(b_client, channel=channel, prefix=prefix)
        b = supervisor(store, "b")
        first, target_session, revoked = (
            StandIn("rs_1"),
            StandIn("rs_t", key_hash="k" * 64),
            StandIn("rs_w", key_hash="w" * 64, user_id="w"),
        )
        for standin in (first, target_session, revoked):
            b.attach(standin)  # type: ignore[arg-type]
        task = asyncio.create_task(b.run())
        try:
            master = await group.master()
            probe = master.client()
            try:
                await poll(lambda: _subscribed(probe, channel, b), what="B subscribed on the master")
            finally:
                await probe.aclose()
            await a.revoke(key_hash=KEY)  # before the failover: pushed, and in the replica's copy of the log
            await poll(lambda: _true(first.ended), what="the first revocation by pub/sub")
            old = await group.kill_master()
            await poll(lambda: _gated(store), what="B's listener lost its subscription and waits to subscribe again")
            await group.restart(master)
            counts = push_counts(admin_client)
            # The new master's replica may still be resynchronising: 503 (ControlError) until it has a copy, and
            # the admin repeats the call; a repeat ends nothing twice.
            await accepted(lambda: a.terminate("rs_t"))
            await accepted(lambda: a.revoke(user_id="w"))
            assert counts == [0, 0]  # B is not subscribed: only the log carries these

            async def both_ended() -> bool:
                return target_session.ended and revoked.ended

            await poll(both_ended, what="B's sessions ended from the new master's log")
            store.gate.set()
            await poll(lambda: _subscribed_at(old, channel), what="B subscribed on the new master")
            assert await b.catch_up() == 0
            assert first.endings == revoked.endings == ["key_revoked"]
            assert target_session.endings == ["session_terminated"]
            assert (ended(b, "session_terminated"), ended(b, "key_revoked")) == (1.0, 2.0)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await admin_client.aclose()
        await b_client.aclose()
        await group.stop()


async def accepted(action: Callable[[], Awaitable[None]]) -> None:
    """Call an admin action until it is accepted, as an operator repeats one answered 503."""

    async def attempt() -> bool:
        try:
            await action()
        except ControlError:
            return False
        return True

    await poll(attempt, what="the control message accepted")


async def _true(value: bool) -> bool:
    return value


async def _subscribed_at(node: RedisNode, channel: str) -> bool:
    client = node.client()
    try:
        return await subscribers(client, channel) == 1
    finally:
        await client.aclose()


async def test_cluster_failover_of_the_channels_shard_messages_reach_a_replica_from_the_log(
    tmp_path: Path, unique: str
) -> None:
    """On a Redis Cluster the control channel is sharded and the log is a key of its own slot. The channel's shard
    fails over (the server unsubscribes B); a termination published before B subscribes again reaches nobody by
    sharded pub/sub and still ends B's session, once, from the log."""
    from tests.redis_cluster import RedisCluster

    servers = RedisCluster(tmp_path / "cluster")
    await servers.start()
    channel, prefix = f"test:{unique}:control", f"test:{unique}"
    admin_client, b_client = servers.client(), servers.client()
    try:
        a = supervisor(RedisStore(admin_client, channel=channel, prefix=prefix), "a")  # type: ignore[arg-type]
        store = GatedStore(b_client, channel=channel, prefix=prefix)  # type: ignore[arg-type]
        b = supervisor(store, "b")
        pushed, target_session = StandIn("rs_p"), StandIn("rs_t")
        for standin in (pushed, target_session):
            b.attach(standin)  # type: ignore[arg-type]
        task = asyncio.create_task(b.run())
        try:
            await poll(lambda: _true(store.subscriptions == 1 and b.log_cursor is not None), what="B subscribed")
            await a.terminate("rs_p")  # the subscription works: by sharded pub/sub (or the log: either way once)
            await poll(lambda: _true(pushed.ended), what="the first termination")
            await servers.failover(channel)
            await poll(lambda: _gated(store), what="B's listener was unsubscribed and waits to subscribe again")
            counts: list[int] = []
            original = admin_client.spublish

            async def spublish(name: str, data: bytes) -> int:
                counts.append(int(await original(name, data)))
                return counts[-1]

            admin_client.spublish = spublish  # type: ignore[method-assign]
            await a.terminate("rs_t")
            assert counts == [0]
            await poll(lambda: _true(target_session.ended), what="B's session ended from the log")
            store.gate.set()
            await poll(lambda: _true(store.subscriptions == 2), what="B subscribed again")
            assert await b.catch_up() == 0
            assert pushed.endings == target_session.endings == ["session_terminated"]
            assert ended(b, "session_terminated") == 2.0
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await admin_client.aclose()
        await b_client.aclose()
        servers.stop()
