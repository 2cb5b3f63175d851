"""A stalled or black-holed PostgreSQL: billing times out, logs a warning, retries, and bills everything once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
import redis.asyncio as aioredis
from sqlalchemy import Engine, func, select, text
from sqlalchemy.engine import make_url

from sidecar.billing import BillingDatabaseError, BillingWriter, UsageConsumer, make_engine, upgrade
from sidecar.billing.tables import EVENT_TABLE, USAGE_TABLE
from sidecar.publisher import EmbeddedPublisher
from sidecar.spool import Spool
from sidecar.testing.factories import T0, usage_event
from sidecar.usage import UsageEvent
from tests.billing_support import DEADLINE_S, drain, poll

TIMEOUT_S = 0.5
"""A tiny SIDECAR_DB_TIMEOUT_S: the tests await its outcome, they never measure it."""


class FreezableProxy:
    """A TCP proxy on 127.0.0.1 in front of PostgreSQL that can stop forwarding and resume.

    Frozen, it still accepts connections and its kernel still acknowledges what the client sends, but
    nothing reaches the server and nothing comes back: a hung server or middlebox, which neither TCP
    keepalives nor a TCP user timeout can tell from a slow one. Held bytes go on when thawed.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def freeze(self) -> None:
        """Stop forwarding, both ways, on every connection (new ones included)."""
        self._flowing.clear()

    def thaw(self) -> None:
        """Forward again, held bytes first."""
        self._flowing.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def stop(self) -> None:
        self.thaw()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._flowing.wait()
            up_reader, up_writer = await asyncio.open_connection(*self._target)
            self._writers.add(up_writer)
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        except OSError:
            pass
        finally:
            writer.close()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                await self._flowing.wait()
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            sink.close()


@contextlib.asynccontextmanager
async def proxied(pg_url: str) -> AsyncIterator[tuple[FreezableProxy, str]]:
    """A FreezableProxy to the test's PostgreSQL database, and the database's URL through it."""
    url = make_url(pg_url)
    proxy = FreezableProxy((url.host or "127.0.0.1", url.port or 5432))
    await proxy.start()
    try:
        yield proxy, url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    finally:
        await proxy.stop()


class Warnings(logging.Handler):
    """Collects WARNING lines of the billing loggers and lets a test await the first matching one."""

    def __init__(self, needle: str) -> None:
        super().__init__(logging.WARNING)
        self.needle = needle
        self.lines: list[str] = []
        self._loop = asyncio.get_running_loop()
        self._seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        self.lines.append(line)
        if self.needle in line:
            self._loop.call_soon_threadsafe(self._seen.set)

    async def seen(self) -> None:
        async with asyncio.timeout(DEADLINE_S):
            await self._seen.wait()


@contextlib.contextmanager
def watching(handler: Warnings, *names: str) -> Iterator[Warnings]:
    """`handler` attached to the named loggers for the block."""
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def stored(engine: Engine) -> tuple[int, int, int]:
    """(event rows, distinct event ids, usage rows) in the billing DB."""
    with engine.connect() as conn:
        events = conn.execute(select(func.count()).select_from(EVENT_TABLE)).scalar_one()
        distinct = conn.execute(select(func.count(EVENT_TABLE.c.event_id.distinct()))).scalar_one()
        rows = conn.execute(select(func.count()).select_from(USAGE_TABLE)).scalar_one()
    return events, distinct, rows


async def xadd_all(redis: aioredis.Redis, stream: str, events: Sequence[UsageEvent]) -> None:
    """Add the events to the stream as the publisher would."""
    for event in events:
        await redis.xadd(stream, event.to_fields())  # type: ignore[arg-type]


async def pending(redis: aioredis.Redis, stream: str) -> int:
    """Entries delivered to the billing group and not acknowledged."""
    count: int = (await redis.xpending(stream, "billing"))["pending"]
    return count


@contextlib.asynccontextmanager
async def frozen_writer(pg_url: str) -> AsyncIterator[tuple[Engine, FreezableProxy, BillingWriter]]:
    """The billing tables in `pg_url`, a direct engine to read them, and a writer whose connections go through a
    proxy the test can freeze and thaw (with the billing timeouts at TIMEOUT_S)."""
    direct = make_engine(pg_url)
    upgrade(direct)
    try:
        async with proxied(pg_url) as (proxy, url):
            engine = make_engine(url, timeout_s=TIMEOUT_S)
            try:
                yield direct, proxy, BillingWriter(engine, timeout_s=TIMEOUT_S)
            finally:
                engine.dispose()
    finally:
        direct.dispose()


async def test_consumer_times_out_on_a_frozen_database_logs_retries_and_bills_once(
    pg_url: str, redis_client: aioredis.Redis, usage_stream: str
) -> None:
    """A frozen DB mid-run: a warning within the timeout, nothing acked, and once thawed each event stored once."""
    async with frozen_writer(pg_url) as (direct, proxy, writer):
        consumer = UsageConsumer(redis_client, writer, stream=usage_stream, block_ms=50, backoff_s=0.05)
        await xadd_all(redis_client, usage_stream, [usage_event("s0", 1)])
        assert await drain(consumer) == 1  # a pooled connection through the proxy
        proxy.freeze()
        events = [usage_event(f"s{i}", 1) for i in range(1, 21)]
        await xadd_all(redis_client, usage_stream, events)
        stop = asyncio.Event()
        with watching(Warnings("no answer from the database"), "sidecar.billing") as warnings:
            task = asyncio.create_task(consumer.run(stop))
            await warnings.seen()
            assert stored(direct) == (1, 1, 1)
            assert await pending(redis_client, usage_stream) == 20  # nothing acknowledged uncommitted
            proxy.thaw()
            await poll(lambda: _settled(direct, redis_client, usage_stream, 21), what="billing after the thaw")
            stop.set()
            await task
        assert any("retrying in" in line for line in warnings.lines)
        assert stored(direct) == (21, 21, 21)


async def _settled(engine: Engine, redis: aioredis.Redis, stream: str, count: int) -> bool:
    """`count` events stored and nothing pending."""
    events = await asyncio.to_thread(lambda: stored(engine)[0])
    return events == count and await pending(redis, stream) == 0


async def test_embedded_writer_times_out_on_a_frozen_database_spools_and_bills_once(
    pg_url: str, tmp_path: Path
) -> None:
    """Embedded mode: a frozen DB fails the write within the timeout (logged), events spool, then land once."""
    async with frozen_writer(pg_url) as (direct, proxy, writer):
        await asyncio.to_thread(writer.write, [usage_event("s0", 1)], now=T0)  # a pooled connection via the proxy
        proxy.freeze()
        with Spool(tmp_path / "spool") as spool, watching(Warnings("no answer"), "sidecar.publisher") as warnings:
            publisher = EmbeddedPublisher(
                lambda events: writer.write_or_dead_letter(events, now=datetime.now(UTC)), spool=spool, retry_s=0.05
            )
            await publisher.start()
            for i in range(1, 11):
                publisher.submit(usage_event(f"s{i}", 1))
            await warnings.seen()
            assert stored(direct) == (1, 1, 1)
            proxy.thaw()
            async with asyncio.timeout(DEADLINE_S):
                await publisher.drained()
            await publisher.aclose()
        assert stored(direct) == (11, 11, 11)


async def test_black_holed_listener_fails_the_connect_within_the_timeout() -> None:
    """A listener that accepts and never answers: BillingDatabaseError from the connect timeout, not a hang."""
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    engine = make_engine(f"postgresql://postgres@127.0.0.1:{port}/test", timeout_s=TIMEOUT_S)
    try:
        with pytest.raises(BillingDatabaseError):
            await asyncio.to_thread(BillingWriter(engine, timeout_s=TIMEOUT_S).write, [usage_event("s1", 1)], now=T0)
    finally:
        engine.dispose()
        silent.close()


def test_postgresql_connections_get_statement_timeout_and_keepalives(pg_url: str) -> None:
    """Each billing connection has the statement and idle-in-transaction timeouts, keepalives and a user timeout."""
    engine = make_engine(pg_url, timeout_s=TIMEOUT_S)
    with engine.connect() as conn:
        settings = [conn.execute(text(f"SHOW {name}")).scalar_one() for name in ("statement_timeout",)]
        settings.append(conn.execute(text("SHOW idle_in_transaction_session_timeout")).scalar_one())
        raw = conn.connection.dbapi_connection
        assert isinstance(raw, psycopg.Connection)
        with socket.socket(fileno=os.dup(raw.pgconn.socket)) as sock:
            keepalive = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            user_timeout = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
    engine.dispose()
    assert settings == ["500ms", "500ms"]
    assert (keepalive, user_timeout) == (1, 500)


async def test_a_lock_wait_is_cancelled_by_the_statement_timeout(pg_url: str) -> None:
    """A live server stuck on a lock: the write fails within the timeout (server or client side) and retries clean."""
    engine = make_engine(pg_url, timeout_s=TIMEOUT_S)
    upgrade(engine)
    writer = BillingWriter(engine, timeout_s=TIMEOUT_S)
    admin = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin) as holder:
        holder.execute("LOCK TABLE realtime_usage_event IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(BillingDatabaseError) as caught:
            await asyncio.to_thread(writer.write, [usage_event("s1", 1)], now=T0)
        holder.rollback()
    assert isinstance(caught.value, BillingDatabaseError)
    assert writer.write([usage_event("s1", 1)], now=T0) == 1
    engine.dispose()


def test_a_connection_the_server_dropped_is_replaced_without_an_error(pg_url: str) -> None:
    """No ping per checkout: a pooled connection PostgreSQL terminated (a restart) is replaced on the next write."""
    engine = make_engine(pg_url, timeout_s=TIMEOUT_S)
    upgrade(engine)
    writer = BillingWriter(engine, timeout_s=TIMEOUT_S)
    assert writer.write([usage_event("s1", 1)], now=T0) == 1
    admin = make_url(pg_url).set(drivername="postgresql", database="test").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        name = make_url(pg_url).database
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
    assert writer.write([usage_event("s2", 1)], now=T0) == 1
    engine.dispose()
