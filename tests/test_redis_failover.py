"""Redis high availability (docs/operations.md, "Redis high availability"): a Sentinel failover in the middle of
live sessions loses and doubles nothing, and the control plane comes back.

Real processes throughout: a Sentinel group (tests/redis_ha.py: a master, a replica, three sentinels), `sidecar
serve` and `sidecar consume` pointed at it by SIDECAR_REDIS_SENTINEL_NODES, PostgreSQL, the openai SDK as the
client. The focused tests use the shared Redis at 127.0.0.1:6379 or a throwaway redis-server.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from openai import AsyncOpenAI
from redis.exceptions import RedisError
from sqlalchemy import Engine

from sidecar.auth import hash_key
from sidecar.billing import BillingWriter, RealtimeUsage, UsageConsumer, make_engine, upgrade
from sidecar.control import RedisStore, SessionInfo
from sidecar.publisher import RedisPublisher
from sidecar.redis_conn import RedisTarget, connect_redis
from sidecar.spool import Spool
from sidecar.testing.fake_provider import FakeProvider
from sidecar.usage import UsageEvent
from tests.billing_support import (
    DEADLINE_S,
    MODEL,
    Billed,
    PacedStreamer,
    SidecarProcess,
    TappedPublisher,
    cost_of,
    drain,
    next_event,
    poll,
    read_billing,
    seconds_of,
    serve_env,
    until_closed,
)
from tests.redis_ha import RedisNode, SentinelGroup
from tests.relay_stack import MASTER_KEY, USER_KEY, stack
from tests.support import COMPLETED, TRANSCRIBE

STREAM = "realtime:usage"  # fixed for `sidecar serve` and `consume`; each test has its own Redis servers
CONTROL = "realtime:control"


class ConsumeProcess:
    """`sidecar consume` as a subprocess with the given SIDECAR_* settings only."""

    def __init__(self, env: Mapping[str, str], *, workdir: Path) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        self.env = {**base, **env}
        self.workdir = workdir
        self.log = workdir / "consume.log"
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sidecar.cli", "consume", env=self.env, cwd=self.workdir, stdout=log, stderr=log
            )
        finally:
            os.close(log)

    def check_running(self) -> None:
        """Raise (with the log's tail) if it exited: a poll on its work would otherwise wait for nothing."""
        if self._process is not None and self._process.returncode is not None:
            raise RuntimeError(f"sidecar consume exited with {self._process.returncode}:\n{self.log.read_text()}")

    async def terminate(self) -> int | None:
        if self._process is None:
            return None
        if self._process.returncode is None:
            os.kill(self._process.pid, signal.SIGTERM)
        async with asyncio.timeout(DEADLINE_S):
            return await self._process.wait()

    async def kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()


@pytest.fixture
async def sentinel_group(tmp_path: Path) -> AsyncIterator[SentinelGroup]:
    """A master, a replica and three sentinels on free loopback ports; every process killed afterwards."""
    group = SentinelGroup(tmp_path / "redis")
    await group.start()
    try:
        yield group
    finally:
        await group.stop()


async def finished(conn: object, streamer: PacedStreamer) -> int:
    """Commit what the streamer sent and wait for its transcript (the relay metered every append); its bytes."""
    await conn.input_audio_buffer.commit()  # type: ignore[attr-defined]
    await next_event(conn, COMPLETED)
    return streamer.sent_bytes


async def subscribed(group: SentinelGroup) -> bool:
    """Whether the sidecar listens on the control channel of the current master."""
    client = (await group.master()).client()
    try:
        counts = await client.pubsub_numsub(CONTROL)
    finally:
        await client.aclose()
    return bool(counts) and int(counts[0][1]) >= 1


def billed_sessions(engine: Engine, count: int) -> Billed | None:
    """Both billing tables once `count` sessions have their final record, else None."""
    billed = read_billing(engine)
    return billed if len([r for r in billed.rows if r.status == "final"]) >= count else None


def assert_exact(billed: Billed, row: RealtimeUsage, *, audio_bytes: int) -> None:
    """A final record of exactly `audio_bytes` (seconds and cost to the microsecond), its events stored once each
    with no seq missing (nothing lost in the failovers, nothing counted twice)."""
    session_id = row.session_id
    seconds = seconds_of(audio_bytes)
    assert row.status == "final"
    assert (row.audio_bytes, row.audio_seconds, row.cost_usd) == (audio_bytes, seconds, cost_of(seconds))
    assert row.key_hash == hash_key(MASTER_KEY)
    seqs = [e.seq for e in billed.events if e.session_id == session_id]
    assert seqs == list(range(1, row.last_seq + 1)), "every event stored once, none lost"
    types = [e.type for e in billed.events if e.session_id == session_id]
    assert types == ["checkpoint"] * (len(types) - 1) + ["final"]


async def test_sentinel_failover_mid_session_bills_exactly_and_revocation_still_works(
    tmp_path: Path, speech_pcm16: bytes, sentinel_group: SentinelGroup, pg_url: str
) -> None:
    """Two paced SDK sessions through `sidecar serve` on a Sentinel group ride a SENTINEL FAILOVER and then the
    new master SIGKILLed: both go on, each is billed once to the microsecond of the audio sent with no event lost
    or doubled, and a revocation sent after the failovers ends a third session (4001 key_revoked)."""
    group = sentinel_group
    settings = {"redis_sentinel_nodes": group.sentinel_nodes, "redis_service_name": "mymaster"}
    audio = speech_pcm16 * 3  # 20 s in real time: the sessions stream through both failovers
    engine = make_engine(pg_url)
    async with FakeProvider() as provider:
        env = serve_env(tmp_path, provider, checkpoint_s="0.5", **settings)
        serve = SidecarProcess(env, workdir=tmp_path / "serve")
        consume = ConsumeProcess(
            {f"SIDECAR_{k.upper()}": v for k, v in settings.items()} | {"SIDECAR_DATABASE_URL": pg_url},
            workdir=tmp_path / "consume",
        )
        await serve.start()
        await consume.start()
        try:
            client = AsyncOpenAI(base_url=f"{serve.http}/v1", api_key=MASTER_KEY, max_retries=0)
            connect = client.realtime.connect
            async with (
                connect(model=MODEL, extra_query=TRANSCRIBE) as one,
                connect(model=MODEL, extra_query=TRANSCRIBE) as two,
            ):
                for conn in (one, two):
                    await next_event(conn, "session.created")
                streamers = [PacedStreamer(one, audio), PacedStreamer(two, audio)]
                streaming = [asyncio.create_task(s.run()) for s in streamers]
                await streamers[0].reach(15)  # a few checkpoints on the first master
                first = await group.master()
                second = await group.failover()  # the old master is demoted and stays up
                await streamers[0].reach(streamers[0].sent_chunks + 10)
                third = await group.kill_master()  # now the new one dies: back to the first node
                assert (second.port != first.port, third.port) == (True, first.port)
                await asyncio.gather(*streaming)
                sent = [await finished(conn, s) for conn, s in zip((one, two), streamers, strict=True)]
            assert sent == [len(audio)] * 2

            await poll(lambda: subscribed(group), what="the sidecar re-subscribed to the control channel")
            async with connect(model=MODEL, extra_query=TRANSCRIBE) as three:
                await next_event(three, "session.created")
                streamer = PacedStreamer(three, speech_pcm16[: 48_000 * 2])
                await streamer.run()
                await finished(three, streamer)
                async with httpx.AsyncClient(
                    base_url=serve.http, headers={"Authorization": f"Bearer {MASTER_KEY}"}
                ) as http:
                    response = await http.post("/admin/revocations", json={"key_hash": hash_key(MASTER_KEY)})
                assert response.status_code == 202, response.text
                events, code = await until_closed(three)
                assert (code, events[-1].type, events[-1].error.code) == (4001, "error", "key_revoked")

            async def all_billed() -> Billed | None:
                consume.check_running()
                return await asyncio.to_thread(billed_sessions, engine, 3)

            billed = await poll(all_billed, what="three final billing records", every_s=0.2)
        finally:
            assert await serve.terminate() == 0
            assert await consume.terminate() == 0
            await serve.kill()
            await consume.kill()
    engine.dispose()
    rows = sorted(billed.rows, key=lambda r: r.close_reason)
    assert [r.close_reason for r in rows] == ["client_close", "client_close", "key_revoked"]
    for row in rows[:2]:
        assert_exact(billed, row, audio_bytes=len(audio))
    assert_exact(billed, rows[2], audio_bytes=48_000 * 2)
    status = await ledger_status(settings)
    assert status["groups"]["billing"]["exists"], status  # `sidecar ledger status` finds the group on the new master
    log = serve.log.read_text()
    # The batches the old master took after its replica was promoted were spooled (and sent again to the new one);
    # whether one saw the sentinels already naming the new master ("a demoted master") depends on timing.
    assert "ReplicationShortfall: 0 of 1 replicas acknowledged the batch" in log
    assert "the Redis master has no healthy replica" in log, "alone after the kill, the master is published to"
    print(f"\nbilled {sum(r.audio_seconds for r in billed.rows)} s across two failovers, none lost or doubled")


async def ledger_status(settings: Mapping[str, str]) -> dict[str, Any]:
    """`sidecar ledger status --json` with these settings (SIDECAR_<NAME>); its output, once it exited 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env |= {f"SIDECAR_{k.upper()}": v for k, v in settings.items()}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar.cli", "ledger", "status", "--json", env=env, stdout=subprocess.PIPE
    )
    async with asyncio.timeout(DEADLINE_S):
        out, _ = await process.communicate()
    assert process.returncode == 0, out
    result: dict[str, Any] = json.loads(out)
    return result


async def test_a_write_a_replica_refuses_is_spooled_until_it_is_master(
    tmp_path: Path, speech_pcm16: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """READONLY (a write that reached a replica, e.g. a master demoted under a client) fails the batch like an
    unreachable Redis: spooled, nothing lost; once that node is master again the spool drains in order."""
    master = RedisNode(tmp_path / "master", args=[])
    await master.start()
    replica = RedisNode(tmp_path / "replica", args=["--replicaof", "127.0.0.1", str(master.port)])
    await replica.start()
    redis = replica.client()
    try:
        with Spool(tmp_path / "spool") as spool:
            inner = RedisPublisher(redis, stream=STREAM, spool=spool, retry_s=0.1)
            tap = TappedPublisher(inner)
            await tap.start()
            try:
                async with stack(tmp_path, publisher=tap, checkpoint_s=0.2) as s:
                    async with s.sidecar.openai(USER_KEY).realtime.connect(model=MODEL, extra_query=TRANSCRIBE) as c:
                        streamer = PacedStreamer(c, speech_pcm16[:48_000])
                        await streamer.run()
                        await finished(c, streamer)
                    await tap.final()
                    await inner.settled()
                assert tap.publish_failures > 0 and tap.spool_depth == len(tap.events), "READONLY: all spooled"
                assert "usage publish failed (ReadOnlyError" in caplog.text and "read only replica" in caplog.text
                await redis.execute_command("REPLICAOF", "NO", "ONE")  # promoted: it takes writes now
                await inner.drained()
            finally:
                await tap.aclose()
        kept = [UsageEvent.from_fields(fields) for _, fields in await redis.xrange(STREAM)]
    finally:
        await redis.aclose()
        await replica.kill()
        await master.kill()
    assert [e.event_id for e in kept] == [e.event_id for e in tap.events], "each event once, in order"


def make_certificates(directory: Path) -> Path:
    """A throwaway CA and a server certificate for 127.0.0.1 it signed (ca.crt, server.crt, server.key)."""
    directory.mkdir(parents=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=DEADLINE_S)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test-ca")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "san.ext",
    )  # fmt: skip
    return directory


async def test_sentinel_with_tls_and_passwords_sends_each_where_it_belongs(tmp_path: Path) -> None:
    """The sentinels and the master speak TLS only (replication too) with a certificate of a private CA, and each
    requires its own password. SIDECAR_REDIS_SSL + SIDECAR_REDIS_SSL_CA_CERTS verify both against the CA,
    SIDECAR_REDIS_SENTINEL_PASSWORD goes to the sentinels, SIDECAR_REDIS_PASSWORD and SIDECAR_REDIS_DB to the
    master: the client works. Without the CA, with the sentinels' password wrong or the master's missing, every
    command fails with a Redis error (which every caller treats as Redis unavailable)."""
    certificates = make_certificates(tmp_path / "tls")
    group = SentinelGroup(tmp_path / "redis", password="m-secret", sentinel_password="s-secret", tls=certificates)
    await group.start()
    try:
        target = RedisTarget(
            mode="sentinel",
            nodes=tuple(s.address for s in group.sentinels),
            service_name="mymaster",
            password="m-secret",
            sentinel_password="s-secret",
            ssl=True,
            ssl_ca_certs=str(certificates / "ca.crt"),
            db=3,
        )
        client = connect_redis(target)
        try:
            await client.xadd(STREAM, {"k": "v"})
        finally:
            await client.aclose()
        probe = (await group.master()).client(db=3)
        try:
            assert await probe.xlen(STREAM) == 1, "written to SIDECAR_REDIS_DB on the master"
        finally:
            await probe.aclose()
        wrong = (
            replace(target, ssl_ca_certs=None),
            replace(target, sentinel_password="nope"),
            replace(target, password=None),
        )
        for settings in wrong:
            client = connect_redis(settings, socket_timeout=2, socket_connect_timeout=2)
            try:
                with pytest.raises(RedisError):
                    await client.set("k", "v")
            finally:
                await client.aclose()
    finally:
        await group.stop()


async def test_a_lease_redis_lost_comes_back_with_the_next_heartbeat(redis_url: str, unique: str) -> None:
    """Leases lost with Redis's data (a failover before they replicated, a restart) are written again by the
    next heartbeat, so the key's concurrency limit holds again within one beat."""
    client = aioredis.Redis.from_url(redis_url)
    store = RedisStore(client, channel=f"test:{unique}:control", prefix=f"test:{unique}")
    info = SessionInfo("rs_live", "here", "h", "", "", "", "m", "2026-01-01T00:00:00+00:00", "1", "0.1")
    try:
        assert await store.acquire("h", "rs_live", limit=1, now=1000.0)
        await client.delete(f"test:{unique}:leases:h")  # what the new master never received
        assert await store.acquire("h", "rs_other", limit=1, now=1000.5), "the limit is lost with the lease"
        await store.release("h", "rs_other")
        await store.heartbeat([info], {}, now=1001.0)
        assert not await store.acquire("h", "rs_other", limit=1, now=1001.5), "the beat restored the lease"
    finally:
        keys = [k async for k in client.scan_iter(match=f"test:{unique}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_a_batch_no_replica_acknowledged_is_spooled_until_one_does(
    tmp_path: Path, speech_pcm16: bytes, pg_url: str
) -> None:
    """With wait_replicas=1 and no replica (a demoted master's position), every batch is refused and spooled
    although the master took it; once a replica syncs, the spool drains and the session is billed once."""
    master = RedisNode(tmp_path / "master", args=[])
    await master.start()
    replica = RedisNode(tmp_path / "replica", args=["--replicaof", "127.0.0.1", str(master.port)])
    redis = master.client()
    try:
        with Spool(tmp_path / "spool") as spool:
            inner = RedisPublisher(redis, stream=STREAM, spool=spool, retry_s=0.1, wait_replicas=1, wait_timeout_ms=50)
            tap = TappedPublisher(inner)
            await tap.start()
            try:
                async with stack(tmp_path, publisher=tap, checkpoint_s=0.2) as s:
                    async with s.sidecar.openai(USER_KEY).realtime.connect(model=MODEL, extra_query=TRANSCRIBE) as c:
                        streamer = PacedStreamer(c, speech_pcm16[: 48_000 * 2])
                        await streamer.run()
                        await finished(c, streamer)
                    await tap.final()
                    await inner.settled()
                assert tap.publish_failures > 0 and tap.spool_depth == len(tap.events), "all spooled, none published"
                assert await redis.xlen(STREAM) >= 1, "the master took them: only the replicas' answer was missing"
                await replica.start()
                await inner.drained()
            finally:
                await tap.aclose()
        engine = make_engine(pg_url)
        upgrade(engine)
        await drain(UsageConsumer(redis, BillingWriter(engine), stream=STREAM, block_ms=0))
        billed = read_billing(engine)
        engine.dispose()
    finally:
        await redis.aclose()
        await replica.kill()
        await master.kill()
    (row,) = billed.rows
    assert (row.status, row.audio_bytes, row.cost_usd) == ("final", 48_000 * 2, cost_of(Decimal(2)))
    assert sorted(e.event_id for e in billed.events) == sorted(e.event_id for e in tap.events), "each once"
