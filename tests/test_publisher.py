"""Usage publishing against real Redis: order, flushing, outages, restarts, and the embedded writer."""

from __future__ import annotations

import asyncio
import errno
import inspect
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from sidecar.publisher import EmbeddedPublisher, RedisPublisher, UsagePublisher, database_sink, redis_sink
from sidecar.spool import Spool
from sidecar.testing.factories import usage_event
from sidecar.usage import UsageEvent

# A hang guard, never a pass/fail threshold: a test that waits this long has already failed.
GUARD_S = 30.0
STARTED = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
# docs/api.md, "Metering and billing": the fields of one stream entry.
CONTRACT_FIELDS = {
    "event_id", "schema", "type", "session_id", "seq", "key_hash", "key_alias", "user_id", "team_id",
    "model", "provider_model", "kind", "unit", "quantity", "audio_seconds", "audio_bytes", "input_tokens",
    "output_tokens", "cost_usd", "started_at", "ended_at", "close_reason", "upstream_usage", "budget_windows",
}  # fmt: skip


def event(seq: int, *, session_id: str = "sess_1", final: bool = False) -> UsageEvent:
    """A usage event with every field set (a final one also ends and has upstream usage)."""
    return usage_event(
        session_id, seq, final=final, started_at=STARTED, upstream_usage='{"total_tokens": 120}' if final else ""
    )


async def guard(waiting: Awaitable[None]) -> None:
    """Await `waiting`, failing the test instead of hanging if it never completes."""
    async with asyncio.timeout(GUARD_S):
        await waiting


def free_port() -> int:
    """A loopback port nothing listens on (just released by the OS)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def client_for(port: int) -> aioredis.Redis:
    """A client that fails at once when the server is down (no client-side retries)."""
    return aioredis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0))


async def stream_fields(client: aioredis.Redis, stream: str) -> list[dict[str, str]]:
    """Every entry of `stream` as a field map, in stream order."""
    # redis-py types replies as a union; without decode_responses they are bytes.
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(stream))
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


async def stream_events(client: aioredis.Redis, stream: str) -> list[UsageEvent]:
    """Every event in `stream`, in stream order."""
    return [UsageEvent.from_fields(fields) for fields in await stream_fields(client, stream)]


class RedisServer:
    """A throwaway redis-server (no persistence) that a test can stop and start again on one port."""

    def __init__(self) -> None:
        self.port = free_port()
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start the server and wait until its log says it accepts connections."""
        self._process = await asyncio.create_subprocess_exec(
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        assert self._process.stdout is not None
        async with asyncio.timeout(GUARD_S):
            while b"Ready to accept connections" not in (line := await self._process.stdout.readline()):
                if not line:
                    raise RuntimeError(f"redis-server on port {self.port} exited before it was ready")

    async def stop(self) -> None:
        """Terminate the server (SIGTERM) and wait for it to exit."""
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            await self._process.wait()


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    """A running throwaway redis-server, stopped after the test."""
    server = RedisServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def dead_redis() -> AsyncIterator[aioredis.Redis]:
    """A client for a port where no Redis listens."""
    client = client_for(free_port())
    yield client
    await client.aclose()


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    """This test's spool directory."""
    return tmp_path / "spool"


@pytest.fixture
def spool(spool_dir: Path) -> Iterator[Spool]:
    """An open spool, closed after the test."""
    with Spool(spool_dir) as opened:
        yield opened


def test_publishers_implement_the_protocol(spool: Spool, redis_client: aioredis.Redis) -> None:
    """Both publishers satisfy UsagePublisher, and submit is a plain (non-async) method."""
    publishers: list[UsagePublisher] = [RedisPublisher(redis_client, spool=spool), EmbeddedPublisher(list, spool=spool)]
    for publisher in publishers:
        assert not inspect.iscoroutinefunction(publisher.submit)


async def test_submitted_events_reach_the_stream_in_order(
    redis_client: aioredis.Redis, usage_stream: str, spool: Spool
) -> None:
    """Events appear in the stream in submit order, each with exactly the contract's fields."""
    events = [event(1), event(1, session_id="sess_2"), event(2), event(3, final=True), event(2, session_id="sess_2")]
    publisher = RedisPublisher(redis_client, stream=usage_stream, spool=spool, batch=2)
    await publisher.start()
    for one in events:
        publisher.submit(one)
    await guard(publisher.drained())
    fields = await stream_fields(redis_client, usage_stream)
    assert fields == [one.to_fields() for one in events]
    assert all(set(entry) == CONTRACT_FIELDS for entry in fields)
    assert (publisher.spool_depth, publisher.publish_failures) == (0, 0)
    await publisher.aclose()


async def test_aclose_flushes_everything_submitted(
    redis_client: aioredis.Redis, usage_stream: str, spool: Spool
) -> None:
    """aclose right after submitting publishes every event before returning."""
    events = [event(seq) for seq in range(1, 601)]
    publisher = RedisPublisher(redis_client, stream=usage_stream, spool=spool)
    await publisher.start()
    for one in events:
        publisher.submit(one)
    await guard(publisher.aclose())
    assert await stream_events(redis_client, usage_stream) == events
    assert len(spool) == 0


async def test_submit_returns_at_once_while_redis_is_down(dead_redis: aioredis.Redis, spool: Spool) -> None:
    """With Redis down, submit returns without I/O; the background task spools the events."""
    first, *more = [event(seq) for seq in range(1, 5)]
    publisher = RedisPublisher(dead_redis, spool=spool, retry_s=3600)
    await publisher.start()
    publisher.submit(first)
    await guard(publisher.settled())
    assert (publisher.spool_depth, publisher.publish_failures) == (1, 1)
    for one in more:
        publisher.submit(one)
    assert publisher.spool_depth == 1  # submit returned without writing anything
    await guard(publisher.settled())
    assert (publisher.spool_depth, publisher.publish_failures) == (4, 1)  # spooled while waiting to retry
    await guard(publisher.aclose())
    assert spool.pending() == [first, *more]


async def test_outage_spools_then_delivers_each_event_once_in_order(
    redis_server: RedisServer, spool: Spool, usage_stream: str
) -> None:
    """Events submitted while Redis is down are spooled, then arrive once each, in submit order."""
    client = client_for(redis_server.port)
    publisher = RedisPublisher(client, stream=usage_stream, spool=spool, retry_s=0.01)
    await publisher.start()
    before = event(1)
    publisher.submit(before)
    await guard(publisher.drained())
    assert await stream_events(client, usage_stream) == [before]

    await redis_server.stop()
    during = [event(seq) for seq in range(2, 6)]
    for one in during:
        publisher.submit(one)
    await guard(publisher.settled())
    assert publisher.spool_depth == len(during)
    assert publisher.publish_failures > 0

    await redis_server.start()  # empty again: the server keeps no data across restarts
    after = event(6, final=True)
    publisher.submit(after)
    await guard(publisher.drained())
    assert await stream_events(client, usage_stream) == [*during, after]
    await publisher.aclose()
    await client.aclose()


async def test_a_restart_replays_the_spool_first(
    dead_redis: aioredis.Redis, redis_client: aioredis.Redis, usage_stream: str, spool_dir: Path
) -> None:
    """A new process on the same spool directory publishes what the last one spooled, before its own."""
    spooled = [event(seq) for seq in range(1, 4)]
    with Spool(spool_dir) as old_spool:
        old = RedisPublisher(dead_redis, stream=usage_stream, spool=old_spool, retry_s=3600)
        await old.start()
        for one in spooled:
            old.submit(one)
        await guard(old.aclose())
        assert old.spool_depth == len(spooled)
        with pytest.raises(RuntimeError, match="spooled"):
            await guard(old.drained())

    newer = event(4, final=True)
    with Spool(spool_dir) as new_spool:
        new = RedisPublisher(redis_client, stream=usage_stream, spool=new_spool)
        new.submit(newer)
        await new.start()
        await guard(new.drained())
        await new.aclose()
    assert await stream_events(redis_client, usage_stream) == [*spooled, newer]


async def test_submit_after_aclose_spools_the_event(redis_client: aioredis.Redis, spool: Spool) -> None:
    """An event submitted after aclose is spooled for the next process, not lost or raised."""
    publisher = RedisPublisher(redis_client, spool=spool)
    await publisher.start()
    await publisher.aclose()
    late = event(1)
    publisher.submit(late)
    assert spool.pending() == [late]


async def test_embedded_publisher_writes_in_a_worker_thread(spool: Spool) -> None:
    """The embedded sink receives every event in order, called off the event loop's thread."""
    written: list[UsageEvent] = []
    threads: set[int] = set()

    def write(events: Sequence[UsageEvent]) -> None:
        threads.add(threading.get_ident())
        written.extend(events)

    events = [event(seq) for seq in range(1, 6)]
    publisher = EmbeddedPublisher(write, spool=spool)
    await publisher.start()
    for one in events:
        publisher.submit(one)
    await guard(publisher.drained())
    await publisher.aclose()
    assert written == events
    assert threading.get_ident() not in threads


class FlakyWrite:
    """A blocking sink whose first `failures` calls raise; records what it wrote and the spool's depth."""

    def __init__(self, spool: Spool, *, failures: int = 1) -> None:
        self.spool = spool
        self.failures = failures
        self.written: list[UsageEvent] = []
        self.depth_seen: list[int] = []

    def __call__(self, events: Sequence[UsageEvent]) -> None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("database is locked")
        self.depth_seen.append(len(self.spool))
        self.written.extend(events)


async def test_embedded_failure_spools_then_delivers_on_retry(spool: Spool) -> None:
    """A failing write spools the batch; the retry delivers it from the spool, then empties the spool."""
    flaky = FlakyWrite(spool)
    events = [event(seq) for seq in range(1, 4)]
    publisher = EmbeddedPublisher(flaky, spool=spool, retry_s=0.01)
    await publisher.start()
    for one in events:
        publisher.submit(one)
    await guard(publisher.drained())
    assert flaky.written == events
    assert flaky.depth_seen == [len(events)]  # delivered while still in the spool
    assert (publisher.spool_depth, publisher.publish_failures) == (0, 1)
    await publisher.aclose()


async def test_aclose_retries_the_spool_once_more(spool: Spool) -> None:
    """aclose interrupts the wait before a retry and makes one last attempt, which here succeeds."""
    flaky = FlakyWrite(spool)
    events = [event(seq) for seq in range(1, 4)]
    publisher = EmbeddedPublisher(flaky, spool=spool, retry_s=3600)
    await publisher.start()
    for one in events:
        publisher.submit(one)
    await guard(publisher.settled())
    assert (flaky.written, publisher.spool_depth) == ([], len(events))
    await guard(publisher.aclose())
    assert flaky.written == events
    assert len(spool) == 0


class FullDiskSpool(Spool):
    """A spool on a full disk: every append fails."""

    def append(self, events: Sequence[UsageEvent]) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


async def test_unwritable_spool_keeps_events_in_memory(spool_dir: Path) -> None:
    """When the spool cannot be written either, events wait in memory and are delivered on retry."""
    with FullDiskSpool(spool_dir) as full:
        flaky = FlakyWrite(full)
        events = [event(seq) for seq in range(1, 4)]
        publisher = EmbeddedPublisher(flaky, spool=full, retry_s=0.01)
        await publisher.start()
        for one in events:
            publisher.submit(one)
        await guard(publisher.settled())
        assert (publisher.spool_depth, len(full)) == (len(events), 0)  # held in memory
        await guard(publisher.drained())
        await publisher.aclose()
        assert flaky.written == events


def test_redis_sink_names_server_db_and_stream_without_the_password() -> None:
    """A Redis sink is `redis:<host>:<port>/<db>#<stream>` (default port filled in); the password never appears."""
    with_password = aioredis.Redis.from_url("redis://:s3cret-pw@Redis.Internal:6380/2")
    default_port = aioredis.Redis.from_url("redis://redis.internal/0")
    socket_path = aioredis.Redis.from_url("unix:///run/redis.sock?db=1")
    assert redis_sink(with_password, stream="realtime:usage") == "redis:redis.internal:6380/2#realtime:usage"
    assert redis_sink(default_port, stream="u") == "redis:redis.internal:6379/0#u"
    assert redis_sink(socket_path, stream="u") == "redis:/run/redis.sock/1#u"


def test_database_sink_names_the_database_without_the_password(tmp_path: Path) -> None:
    """A DB sink names dialect, host, port and database (driver, password and default port make no difference);
    an SQLite sink is the file's absolute path."""
    named = database_sink("postgresql+psycopg://billing:s3cret-pw@DB.internal/billing")
    assert named == "db:postgresql://db.internal:5432/billing"
    assert database_sink("postgresql://billing@db.internal:5432/billing") == named
    assert database_sink("postgresql://billing@db.internal:5433/billing") != named
    relative = database_sink("sqlite:///billing.db")
    assert relative == f"db:sqlite:{Path('billing.db').resolve()}"
    assert database_sink(f"sqlite:///{tmp_path / 'billing.db'}") == f"db:sqlite:{tmp_path / 'billing.db'}"
