"""Live sessions ride Redis Cluster master failovers, end to end (issue 18, "How it is shown", the Cluster half).

Real processes: a three-master Redis Cluster with a replica each (tests/redis_cluster.py), `sidecar serve` and
`sidecar consume` dialling it by its seed nodes (SIDECAR_REDIS_CLUSTER_NODES), PostgreSQL for the billing rows, a
fake LiteLLM admin API and a fake provider on real sockets. Two sessions from the official openai SDK stream audio
in real time while the master holding the usage stream is failed over (CLUSTER FAILOVER on its replica) and the
new master is then killed (its replica, the old master, takes over); the master holding the control channel's
slot is failed over too. Then one session is revoked through `POST /admin/revocations` (reaching the sidecar on
the sharded control channel's new master) and the other closes. Both are billed exactly what the client sent,
to the microsecond, each usage event stored once, none lost. Every wait is a bounded poll of a condition.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI

from sidecar.auth import hash_key
from sidecar.billing import RealtimeUsage, make_engine
from sidecar.testing.fake_litellm import FakeLiteLLM, LiteLLMServer
from sidecar.testing.fake_provider import FakeProvider
from tests.billing_support import (
    MODEL,
    PacedStreamer,
    SidecarProcess,
    cost_of,
    next_event,
    poll,
    read_billing,
    seconds_of,
    serve_env,
    until_closed,
)
from tests.redis_cluster import RedisCluster
from tests.relay_stack import MASTER_KEY
from tests.support import COMPLETED, TRANSCRIBE
from tests.test_ledger_e2e import ConsumeProcess

KEY_CLOSE = "sk-cluster-close-0001"
KEY_REVOKE = "sk-cluster-revoke-0001"
STREAM = "realtime:usage"
CHANNEL = "realtime:control"
CHECKPOINT_S = "0.3"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A cluster of its own: this test kills a master."""
    servers = RedisCluster(tmp_path / "cluster")
    try:
        asyncio.run(servers.start())
        yield servers
    finally:
        servers.stop()


@pytest.fixture
async def litellm_api() -> AsyncIterator[LiteLLMServer]:
    """LiteLLM's admin API knowing both keys."""
    fake = FakeLiteLLM(master_key=MASTER_KEY)
    fake.add_key(KEY_CLOSE, key_alias="close", user_id="u1", team_id="t1")
    fake.add_key(KEY_REVOKE, key_alias="revoke", user_id="u2", team_id="t2")
    async with LiteLLMServer(fake) as server:
        yield server


class Live:
    """One SDK session streaming in real time."""

    def __init__(self, conn: object, streamer: PacedStreamer) -> None:
        self.conn = conn
        self.streamer = streamer
        self.task = asyncio.create_task(streamer.run())

    async def stop_streaming(self) -> None:
        """Stop appending, then commit and wait for the transcript: the sidecar has metered every byte sent."""
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.conn.input_audio_buffer.commit()  # type: ignore[attr-defined]
        await next_event(self.conn, COMPLETED)


async def open_session(key: str, http: str, audio: bytes) -> Live:
    client = AsyncOpenAI(base_url=f"{http}/v1", api_key=key, max_retries=0)
    conn = await client.realtime.connect(model=MODEL, extra_query=TRANSCRIBE).enter()
    await next_event(conn, "session.created")
    return Live(conn, PacedStreamer(conn, audio))


def billed(pg_url: str) -> tuple[list[RealtimeUsage], list[tuple[str, int, str]]]:
    engine = make_engine(pg_url)
    try:
        found = read_billing(engine)
    finally:
        engine.dispose()
    return found.rows, [(e.session_id, e.seq, e.type) for e in found.events]


async def subscribed(cluster: RedisCluster) -> bool:
    """The sidecar's supervisor is subscribed to the control channel on the master now serving its slot."""
    master = cluster.node(await cluster.master_of(CHANNEL))
    reply = await cluster.ask(master, "PUBSUB", "SHARDNUMSUB", CHANNEL)
    assert isinstance(reply, list)
    return int(reply[1]) > 0


async def test_sessions_ride_cluster_failovers_billed_exactly_once(
    tmp_path: Path, cluster: RedisCluster, litellm_api: LiteLLMServer, pg_url: str, speech_pcm16: bytes
) -> None:
    """Failover and a killed master mid-session: exact rows, every event once, revocation after the failover."""
    audio = speech_pcm16 * 4  # long enough to stream through both failovers
    async with FakeProvider() as provider:
        env = serve_env(
            tmp_path,
            provider,
            redis_cluster_nodes=cluster.seeds,
            litellm_url=litellm_api.url,
            checkpoint_s=CHECKPOINT_S,
        )
        serve = SidecarProcess(env, workdir=tmp_path / "serve")
        consume = ConsumeProcess(
            {"SIDECAR_REDIS_CLUSTER_NODES": cluster.seeds, "SIDECAR_DATABASE_URL": pg_url},
            workdir=tmp_path / "consume",
        )
        await consume.start()
        await serve.start()
        try:
            closing = await open_session(KEY_CLOSE, serve.http, audio)
            revoked = await open_session(KEY_REVOKE, serve.http, audio)
            await closing.streamer.reach(10)

            before = await cluster.master_of(STREAM)
            await cluster.failover(STREAM)
            await closing.streamer.reach(closing.streamer.sent_chunks + 5)
            killed, now = await cluster.kill_master(STREAM)
            assert before == now != killed  # the old master serves the stream again
            if await cluster.master_of(CHANNEL) not in (before, killed):
                await cluster.failover(CHANNEL)
            await closing.streamer.reach(closing.streamer.sent_chunks + 5)

            await revoked.stop_streaming()
            await poll(lambda: subscribed(cluster), what="the control channel's subscription on its new master")
            async with httpx.AsyncClient(base_url=serve.http) as http:
                answer = await http.post(
                    "/admin/revocations",
                    json={"key_hash": hash_key(KEY_REVOKE)},
                    headers={"Authorization": f"Bearer {MASTER_KEY}"},
                )
                assert answer.status_code == 202, answer.text
            _, code = await until_closed(revoked.conn)
            assert code == 4001

            await closing.stop_streaming()
            await closing.conn.close()  # type: ignore[attr-defined]

            async def both_final() -> tuple[list[RealtimeUsage], list[tuple[str, int, str]]] | None:
                consume.check_running()
                rows, events = await asyncio.to_thread(billed, pg_url)
                done = len(rows) == 2 and all(r.status == "final" for r in rows)
                return (rows, events) if done else None

            rows, events = await poll(both_final, what="both sessions billed final", every_s=0.1)
        finally:
            assert await serve.terminate() == 0
            await serve.kill()
            try:
                assert await consume.terminate() == 0
            finally:
                await consume.kill()

    for log in (serve.log, consume.log):  # a cross-slot command would have been refused and logged
        text = log.read_text()
        assert "CROSSSLOT" not in text and "CrossSlot" not in text, log
    by_key = {r.key_hash: r for r in rows}
    for key, live, reason in ((KEY_CLOSE, closing, "client_close"), (KEY_REVOKE, revoked, "key_revoked")):
        row = by_key[hash_key(key)]
        sent = live.streamer.sent_bytes
        assert (row.close_reason, row.audio_bytes) == (reason, sent)
        assert (row.audio_seconds, row.quantity, row.cost_usd) == (
            seconds_of(sent),
            seconds_of(sent),
            cost_of(seconds_of(sent)),
        )
        mine = [(seq, kind) for sid, seq, kind in events if sid == row.session_id]
        # Every event the sidecar published stored once: seqs 1..last without a gap or a repeat, the last the final.
        assert [seq for seq, _ in mine] == list(range(1, row.last_seq + 1))
        assert [kind for _, kind in mine] == ["checkpoint"] * (row.last_seq - 1) + ["final"]
        assert row.last_seq > 3  # checkpoints were published across the failovers
