"""Usage publishing that never loses an event and never blocks the audio path (docs/api.md, "Metering
and billing").

`submit` only appends to an in-memory queue. One background task drains it in batches into a sink:
the Redis stream (`RedisPublisher`, XADD) or the embedded billing writer run in a worker thread
(`EmbeddedPublisher`). When the sink fails, the batch goes to the durable `Spool` and the spool is
retried every `retry_s`, oldest first. While anything is spooled, new events are spooled behind it, so
the sink sees events in submit order. Delivery is at-least-once: events leave the spool only after the
sink accepted them, and the billing consumer is idempotent on `event_id`.

The backlog is the spool file followed by `_held`: events whose append to the spool failed (a full
disk), kept in memory and retried rather than dropped. All spool I/O runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, Protocol

import redis.asyncio as aioredis

from sidecar.config import DEFAULT_USAGE_STREAM
from sidecar.spool import Spool
from sidecar.usage import UsageEvent

log = logging.getLogger(__name__)

DEFAULT_RETRY_S: Final = 1.0
DEFAULT_BATCH: Final = 256
DEFAULT_REDIS_TIMEOUT_S: Final = 10.0
#: How long a batch waits for its replicas (SIDECAR_REDIS_WAIT_REPLICAS) before the sentinels are asked why.
DEFAULT_WAIT_TIMEOUT_MS: Final = 250
#: A master the sentinels know no healthy replica of is published to without WAIT this long, then asked again.
ALONE_RECHECK_S: Final = 5.0
# A replay chunk grows with the spool (up to this many batches): each drop rewrites the spool file, so
# a long replay stays linear in the spool's size, while one pipeline stays well inside its timeout.
MAX_REPLAY_BATCHES: Final = 32
# A database URL without a port means the dialect's default: both forms name one sink.
DEFAULT_DB_PORTS: Final[dict[str, int]] = {"postgresql": 5432, "mysql": 3306}


class UsagePublisher(Protocol):
    """Where sessions hand their usage events."""

    def submit(self, event: UsageEvent) -> None:
        """Enqueue `event` for background publishing. Never blocks, never raises."""

    async def start(self) -> None:
        """Start publishing in the background, the spool's events first."""

    async def aclose(self) -> None:
        """Publish or spool everything submitted, then stop."""

    @property
    def spool_depth(self) -> int:
        """Events waiting in the spool for the sink to come back."""

    @property
    def publish_failures(self) -> int:
        """Failed publish attempts since start."""


class SpoolingPublisher:
    """The queue, batching, spooling and retry shared by every publisher; subclasses supply `_send`.

    `submit` must be called from the event loop's thread.
    """

    def __init__(self, *, spool: Spool, retry_s: float = DEFAULT_RETRY_S, batch: int = DEFAULT_BATCH) -> None:
        self._spool = spool
        self._retry_s = retry_s
        self._batch = batch
        self._queue: deque[UsageEvent] = deque()
        self._held: list[UsageEvent] = []
        self._failures = 0
        self._wakeup = asyncio.Event()  # set by submit and aclose
        self._closing = asyncio.Event()
        self._changed = asyncio.Condition()  # notified whenever the task comes to rest, and on close
        self._resting = False
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    async def _send(self, events: Sequence[UsageEvent]) -> None:
        """Deliver `events` in order, or raise (anything): then they are spooled and retried."""
        raise NotImplementedError

    @property
    def spool_depth(self) -> int:
        return len(self._spool) + len(self._held)

    @property
    def publish_failures(self) -> int:
        return self._failures

    @property
    def foreign_spool_files(self) -> int:
        """Dead processes' spool files of other sinks, left in place when the spool opened."""
        return len(self._spool.foreign)

    def submit(self, event: UsageEvent) -> None:
        """Enqueue `event`. After aclose it is spooled directly (the next process publishes it)."""
        if not self._closed:
            self._queue.append(event)
            self._wakeup.set()
            return
        context = {"session_id": event.session_id}
        try:
            self._spool.append([event])
        except Exception:
            log.exception("usage event %s submitted after close was lost", event.event_id, extra=context)
        else:
            log.warning("usage event %s submitted after close was spooled", event.event_id, extra=context)

    async def start(self) -> None:
        """Start the background task; it replays the spool before anything newer."""
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run(), name=type(self).__name__)

    async def aclose(self) -> None:
        """Publish what the sink takes (one more attempt if it is failing), spool the rest, then stop."""
        self._closing.set()
        self._wakeup.set()
        await self.start()
        if self._task is not None:
            await self._task
        while True:  # anything submitted during the last attempt (or during this stash)
            await self._stash()
            if not self._queue:
                break
        if self._held:
            log.error("the usage spool is unwritable: %d usage events lost at shutdown", len(self._held))
        self._closed = True
        await self._notify()

    async def settled(self) -> None:
        """Wait until every event submitted so far is published or spooled.

        Raises RuntimeError before start().
        """
        await self._wait_for(lambda: (self._resting or self._closed) and not self._queue)

    async def drained(self) -> None:
        """Wait until every event submitted so far is published (the spool is empty too).

        Raises RuntimeError before start(), or when the publisher closes with events still spooled.
        """
        await self._wait_for(lambda: (self._resting or self._closed) and not self._queue and not self.spool_depth)

    async def _run(self) -> None:
        while True:
            try:
                if not await self._step():
                    return
            except Exception:  # a spool read or rewrite failed: nothing is lost, try again later
                log.exception("usage publisher step failed")
                if not await self._pause():
                    return

    async def _step(self) -> bool:
        """One round: replay the backlog, or publish the next batch. False when done closing."""
        if self.spool_depth:
            await self._stash()
            return await self._replay() or await self._pause()
        batch = await self._take()
        if not batch:
            return False
        if await self._attempt(batch):
            return True
        self._held = batch
        await self._stash()
        return await self._pause()

    async def _take(self) -> list[UsageEvent]:
        """Up to `batch` queued events, waiting for the first; [] when closing with nothing queued."""
        while not self._queue and not self._closing.is_set():
            await self._rest(None)
        return [self._queue.popleft() for _ in range(min(self._batch, len(self._queue)))]

    async def _attempt(self, events: Sequence[UsageEvent]) -> bool:
        try:
            await self._send(events)
        except Exception as exc:
            self._failures += 1
            log.warning(
                "usage publish failed (%s: %s); %d events wait in the spool", type(exc).__name__, exc, len(events)
            )
            return False
        return True

    async def _replay(self) -> bool:
        """Publish the backlog, oldest first, dropping each chunk once the sink took it. True when empty."""
        while len(self._spool):
            limit = min(max(self._batch, len(self._spool) // 8), self._batch * MAX_REPLAY_BATCHES)
            events = await asyncio.to_thread(self._spool.pending, limit)
            if events:  # none: the file held fewer readable events than counted, and len() is now exact
                if not await self._attempt(events):
                    return False
                await asyncio.to_thread(self._spool.drop_first, len(events))
        if self._held:
            if not await self._attempt(self._held):
                return False
            self._held = []
        return True

    async def _stash(self) -> None:
        """Move held and queued events to the end of the spool (keeping them held if that fails)."""
        events = self._held + list(self._queue)
        self._queue.clear()
        if not events:
            return
        try:
            await asyncio.to_thread(self._spool.append, events)
        except Exception:
            log.exception("cannot write the usage spool; %d events held in memory", len(events))
            self._held = events
        else:
            self._held = []

    async def _pause(self) -> bool:
        """Wait `retry_s` before the next attempt, spooling new events meanwhile; aclose cuts the wait
        short for one last attempt. False when the attempt that just failed was that last one."""
        if self._closing.is_set():
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._retry_s
        while not self._closing.is_set():
            await self._stash()
            if loop.time() >= deadline:
                break
            await self._rest(deadline)
        return True

    async def _rest(self, deadline: float | None) -> None:
        """Wait for a submit, aclose or `deadline`, telling `settled`/`drained` waiters we are at rest."""
        self._wakeup.clear()
        if self._queue or self._closing.is_set():
            return
        self._resting = True
        try:
            await self._notify()
            async with asyncio.timeout_at(deadline):
                await self._wakeup.wait()
        except TimeoutError:
            pass
        finally:
            self._resting = False

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _wait_for(self, predicate: Callable[[], bool]) -> None:
        if self._task is None and not self._closed:
            raise RuntimeError("the publisher is not started")
        async with self._changed:
            await self._changed.wait_for(lambda: predicate() or self._closed)
        if not predicate():
            raise RuntimeError("the publisher closed with events still spooled")


class ReplicationShortfall(Exception):
    """A batch reached the master but fewer replicas than asked acknowledged it (WAIT), and the sentinels say a
    failover could still drop it: not yet published."""


class RedisPublisher(SpoolingPublisher):
    """Publishes to the usage stream: one XADD per event, pipelined (no MAXLEN: the consumer trims).

    With `wait_replicas` the pipeline ends with WAIT: a batch counts as published once that many replicas have
    it, so a failover cannot drop it. Fewer, and the sentinels are asked why (sidecar/redis_conn.py,
    `replication_shortfall`): a master they have demoted but that still answers (its writes are dropped when it
    resynchronises): the pool's connections are dropped so the next attempt dials the new master, and the batch
    is spooled like any failure; a healthy replica that did not acknowledge (one being promoted): spooled; no
    healthy replica at all: published (no failover can drop it), and the next `ALONE_RECHECK_S` skip the WAIT.
    A spooled batch is sent again, and the consumer stores each `event_id` once.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        stream: str = DEFAULT_USAGE_STREAM,
        spool: Spool,
        retry_s: float = DEFAULT_RETRY_S,
        batch: int = DEFAULT_BATCH,
        timeout_s: float = DEFAULT_REDIS_TIMEOUT_S,
        wait_replicas: int = 0,
        wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS,
    ) -> None:
        super().__init__(spool=spool, retry_s=retry_s, batch=batch)
        self._redis = redis
        self._stream = stream
        self._timeout_s = timeout_s  # a hung connection fails the attempt instead of stalling publishing
        self._wait_replicas = wait_replicas
        self._wait_timeout_ms = wait_timeout_ms
        self._alone_until = float("-inf")  # the master had no healthy replica: no WAIT until then

    async def _send(self, events: Sequence[UsageEvent]) -> None:
        async with asyncio.timeout(self._timeout_s):
            async with self._redis.pipeline(transaction=False) as pipe:
                for event in events:
                    # redis-py types fields as dict[FieldT, EncodableT], which dict[str, bytes] (invariant) is not.
                    pipe.xadd(self._stream, stream_fields(event))  # type: ignore[arg-type]
                waits = self._wait_replicas > 0 and asyncio.get_running_loop().time() >= self._alone_until
                if waits:
                    pipe.wait(self._wait_replicas, self._wait_timeout_ms)
                replies = await pipe.execute()
            if waits and int(replies[-1]) < self._wait_replicas:
                await self._shortfall(int(replies[-1]))

    async def _shortfall(self, acknowledged: int) -> None:
        from sidecar.redis_conn import replication_shortfall

        why = await replication_shortfall(self._redis)
        if why == "alone":
            if self._alone_until == float("-inf"):
                log.warning("the Redis master has no healthy replica: usage is published without a replica's copy")
            self._alone_until = asyncio.get_running_loop().time() + ALONE_RECHECK_S
            return
        self._alone_until = float("-inf")
        if why == "demoted":
            await self._redis.connection_pool.disconnect()  # the next attempt dials the master the sentinels name
        raise ReplicationShortfall(
            f"{acknowledged} of {self._wait_replicas} replicas acknowledged the batch"
            + (" (a demoted master)" if why == "demoted" else "")
        )


def redis_sink(redis: aioredis.Redis, *, stream: str) -> str:
    """The spool's name for `stream` on this server, never its password: `redis:<host>:<port>/<db>#<stream>`
    (a Unix socket: `redis:<path>/<db>#<stream>`; a Sentinel-managed master, which moves between servers:
    `redis-sentinel:<service name>/<db>#<stream>`; a cluster: `redis-cluster:<seed nodes, sorted>#<stream>`)."""
    from redis.asyncio.sentinel import SentinelConnectionPool

    from sidecar.redis_conn import is_cluster

    if is_cluster(redis):
        seeds = sorted(getattr(redis, "nodes_manager").startup_nodes)  # noqa: B009 - absent from the Redis type
        return f"redis-cluster:{','.join(seeds)}#{stream}"
    pool = redis.connection_pool
    kwargs = pool.connection_kwargs
    if isinstance(pool, SentinelConnectionPool):
        return f"redis-sentinel:{pool.service_name}/{kwargs.get('db') or 0}#{stream}"
    path = kwargs.get("path")
    where = path or f"{str(kwargs.get('host', 'localhost')).lower()}:{kwargs.get('port') or 6379}"
    return f"redis:{where}/{kwargs.get('db') or 0}#{stream}"


def database_sink(url: str) -> str:
    """The spool's name for the billing DB at `url`, never its password: `db:<dialect>://<host>:<port>/<database>`,
    or `db:sqlite:<absolute path>` (relative to the working directory, as SQLAlchemy opens it).

    Raises sqlalchemy.exc.ArgumentError for a malformed URL.
    """
    from sqlalchemy.engine import make_url  # embedded mode only: see sidecar/app.py

    parsed = make_url(url)
    dialect = parsed.get_backend_name()
    database = parsed.database or ""
    if dialect == "sqlite":
        in_memory = database in ("", ":memory:") or database.startswith("file:")
        return f"db:sqlite:{database or ':memory:'}" if in_memory else f"db:sqlite:{Path(database).resolve()}"
    port = parsed.port or DEFAULT_DB_PORTS.get(dialect)
    return f"db:{dialect}://{(parsed.host or '').lower()}:{port or ''}/{database}"


def stream_fields(event: UsageEvent) -> dict[str, bytes]:
    """The event's stream entry as UTF-8 bytes; a lone surrogate (which strict UTF-8 refuses) is sent as is.

    Such an entry is not UTF-8, so the billing consumer dead-letters that one entry; refusing to send it
    would instead fail the batch, spool it and retry it, with every later event behind it, forever.
    """
    return {name: value.encode("utf-8", "surrogatepass") for name, value in event.to_fields().items()}


class EmbeddedPublisher(SpoolingPublisher):
    """Writes straight to the billing DB (no Redis): `write` is blocking and runs in a worker thread."""

    def __init__(
        self,
        write: Callable[[Sequence[UsageEvent]], object],
        *,
        spool: Spool,
        retry_s: float = DEFAULT_RETRY_S,
        batch: int = DEFAULT_BATCH,
    ) -> None:
        super().__init__(spool=spool, retry_s=retry_s, batch=batch)
        self._write = write

    async def _send(self, events: Sequence[UsageEvent]) -> None:
        await asyncio.to_thread(self._write, events)
