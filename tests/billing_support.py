"""Support for the end-to-end billing tests: billing sinks, a tapped publisher, throwaway processes.

- `TappedPublisher` wraps a real publisher and remembers every usage event the relay submits, so a test
  can await "the final was submitted" instead of sleeping.
- `embedded_sink` (EmbeddedPublisher -> SQLite) and `redis_sink` (RedisPublisher -> stream -> UsageConsumer
  -> PostgreSQL) are the two ways a sidecar bills; `Sink.billed()` settles one and reads both tables.
- `assert_billed_once` is the one assertion every ending must pass: exactly one record with the right figures,
  and every submitted event stored exactly once.
- `RedisServer` is a throwaway `redis-server` on its own port; `SidecarProcess` runs `sidecar serve` as a
  subprocess so that it can be SIGKILLed. Waiting for another process to come up is a bounded poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import httpx
import redis.asyncio as aioredis
import yaml
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from sqlalchemy import Engine
from sqlmodel import Session, select
from websockets.exceptions import ConnectionClosed

from sidecar.auth import hash_key
from sidecar.billing import BillingWriter, RealtimeUsage, RealtimeUsageEvent, UsageConsumer, make_engine, upgrade
from sidecar.publisher import EmbeddedPublisher, RedisPublisher, SpoolingPublisher
from sidecar.spool import Spool
from sidecar.testing.fake_provider import FakeProvider
from sidecar.usage import UsageEvent
from tests.relay_stack import MASTER_KEY, catalog_for, entry
from tests.support import COMPLETED, chunks, next_of

MODEL = "gpt-realtime-whisper"
PCM16_BYTES_PER_SECOND = 48_000  # docs/api.md: audio/pcm 24 kHz 16-bit mono
CHUNK_BYTES = 4_800  # 100 ms of audio, as tests.support.chunks cuts it


def _catalog_price() -> Decimal:
    """The catalog's price of gpt-realtime-whisper per second (input_cost_per_second, LiteLLM's price map)."""
    price = catalog_for([entry(MODEL, f"openai/{MODEL}", "ws://unused", "unused")]).resolve(MODEL).price
    assert price.unit == "second" and price.per_unit is not None
    return price.per_unit


PRICE_PER_SECOND = _catalog_price()
DEADLINE_S = 30.0
"""A safety net for waits on things that must happen; never a synchronisation."""


# ---- expected figures -------------------------------------------------------------------------------


def seconds_of(audio_bytes: int) -> Decimal:
    """The exact seconds of `audio_bytes` of 24 kHz PCM16 (raises if not exact to the microsecond)."""
    exact = Fraction(audio_bytes, PCM16_BYTES_PER_SECOND)
    seconds = Decimal(exact.numerator) / Decimal(exact.denominator)
    assert Fraction(seconds) == exact, "not a whole number of microseconds"
    return seconds


def cost_of(seconds: Decimal) -> Decimal:
    """What `seconds` of gpt-realtime-whisper cost: quantity times the catalog price, to 10 places."""
    return (seconds * PRICE_PER_SECOND).quantize(Decimal("1e-10"), rounding=ROUND_HALF_EVEN)


# ---- the tapped publisher ---------------------------------------------------------------------------


class TappedPublisher:
    """A real publisher that also remembers every submitted event, so tests can await submissions."""

    def __init__(self, inner: SpoolingPublisher) -> None:
        self.inner = inner
        self.events: list[UsageEvent] = []
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    def submit(self, event: UsageEvent) -> None:
        self.events.append(event)
        self.inner.submit(event)
        for predicate, future in list(self._waiters):
            if not future.done() and predicate():
                future.set_result(None)

    async def start(self) -> None:
        await self.inner.start()

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def spool_depth(self) -> int:
        return self.inner.spool_depth

    @property
    def publish_failures(self) -> int:
        return self.inner.publish_failures

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait until `predicate()` holds after some submit (or already holds). Raises TimeoutError."""
        if predicate():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = (predicate, future)
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(DEADLINE_S):
                await future
        finally:
            self._waiters.remove(waiter)

    async def submitted(self, count: int) -> None:
        """Wait until at least `count` events were submitted."""
        await self.until(lambda: len(self.events) >= count)

    async def final(self) -> UsageEvent:
        """Wait for the session's final event and return it."""
        await self.until(lambda: any(e.type == "final" for e in self.events))
        return next(e for e in self.events if e.type == "final")


# ---- what the billing DB holds ----------------------------------------------------------------------


@dataclass
class Billed:
    """Both billing tables, as read after the session was billed."""

    rows: list[RealtimeUsage]
    events: list[RealtimeUsageEvent]


def read_billing(engine: Engine) -> Billed:
    """Every realtime_usage row and realtime_usage_event (ordered by session, seq)."""
    with Session(engine) as db:
        rows = list(db.exec(select(RealtimeUsage)).all())
        query = select(RealtimeUsageEvent).order_by(RealtimeUsageEvent.session_id, RealtimeUsageEvent.seq)  # type: ignore[arg-type]
        events = list(db.exec(query).all())
    return Billed(rows, events)


class EventLike(Protocol):
    """What `assert_billed_once` compares: a UsageEvent or a stored RealtimeUsageEvent."""

    @property
    def session_id(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def event_id(self) -> str: ...
    @property
    def type(self) -> str: ...


def assert_billed_once(
    billed: Billed,
    submitted: Sequence[EventLike],
    *,
    audio_bytes: int,
    close_reason: str,
    status: str = "final",
    key: str | None = None,
) -> RealtimeUsage:
    """Exactly one record with these figures, and each submitted event stored once (seqs 1..N, no gap)."""
    assert len(billed.rows) == 1, f"one record per session, got {[(r.status, r.close_reason) for r in billed.rows]}"
    row = billed.rows[0]
    seconds = seconds_of(audio_bytes)
    _same("status, close_reason", (row.status, row.close_reason), (status, close_reason))
    _same("audio_bytes, audio_seconds", (row.audio_bytes, row.audio_seconds), (audio_bytes, seconds))
    _same("unit, quantity, cost_usd", (row.unit, row.quantity, row.cost_usd), ("second", seconds, cost_of(seconds)))
    _same("model, kind", (row.model, row.kind), (MODEL, "realtime-transcription"))
    if key is not None:
        _same("key_hash", row.key_hash, hash_key(key))
    stored = [(e.session_id, e.seq, e.event_id, e.type) for e in billed.events]
    expected = sorted((e.session_id, e.seq, e.event_id, e.type) for e in submitted)
    _same("stored events (each submitted event exactly once)", stored, expected)
    _same("seqs", [e.seq for e in billed.events], list(range(1, len(submitted) + 1)))
    _same("sessions", {e.session_id for e in billed.events}, {row.session_id})
    last = billed.events[-1]
    _same("last_seq, last_event_id", (row.last_seq, row.last_event_id), (last.seq, last.event_id))
    if status == "final":
        _same("event types", [e.type for e in billed.events], ["checkpoint"] * (len(billed.events) - 1) + ["final"])
        assert row.ended_at is not None, "a final record has ended_at"
    return row


def _same(what: str, got: object, expected: object) -> None:
    assert got == expected, f"{what}: got {got!r}, expected {expected!r}"


# ---- billing sinks ----------------------------------------------------------------------------------


class Sink:
    """One way of billing: a publisher for the sidecar, and how to read what it billed."""

    def __init__(self, tap: TappedPublisher, engine: Engine, consumer: UsageConsumer | None) -> None:
        self.tap = tap
        self.engine = engine
        self.consumer = consumer

    async def billed(self) -> Billed:
        """Wait for the final, publish everything, run the consumer dry (Redis mode), read the tables."""
        await self.tap.final()
        await self.tap.inner.drained()
        if self.consumer is not None:
            await drain(self.consumer)
        return read_billing(self.engine)


@contextlib.asynccontextmanager
async def embedded_sink(tmp_path: Path, *, database_url: str | None = None) -> AsyncIterator[Sink]:
    """EmbeddedPublisher writing straight into a billing DB (a fresh SQLite file unless given)."""
    engine = make_engine(database_url or f"sqlite:///{tmp_path / 'billing-embedded.db'}")
    upgrade(engine)
    writer = BillingWriter(engine)
    with Spool(tmp_path / "spool-embedded") as spool:
        publisher = EmbeddedPublisher(lambda events: writer.write(events, now=datetime.now(UTC)), spool=spool)
        tap = TappedPublisher(publisher)
        await tap.start()
        try:
            yield Sink(tap, engine, None)
        finally:
            await tap.aclose()
            engine.dispose()


@contextlib.asynccontextmanager
async def redis_sink(tmp_path: Path, *, redis_url: str, stream: str, database_url: str) -> AsyncIterator[Sink]:
    """RedisPublisher -> `stream` -> UsageConsumer -> `database_url`; the stream is deleted afterwards."""
    engine = make_engine(database_url)
    upgrade(engine)
    redis = aioredis.Redis.from_url(redis_url)
    consumer = UsageConsumer(redis, BillingWriter(engine), stream=stream, block_ms=0)
    try:
        with Spool(tmp_path / "spool-redis") as spool:
            tap = TappedPublisher(RedisPublisher(redis, stream=stream, spool=spool))
            await tap.start()
            try:
                yield Sink(tap, engine, consumer)
            finally:
                await tap.aclose()
    finally:
        await redis.delete(stream, f"{stream}:dead")
        await redis.aclose()
        engine.dispose()


async def drain(consumer: UsageConsumer) -> int:
    """Run `consumer` until it finds nothing waiting; return how many entries it handled."""
    await consumer.ensure_group()
    total = 0
    while handled := await consumer.run_once():
        total += handled
    return total


class FakeClock:
    """A settable clock for the consumer."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


# ---- clients ----------------------------------------------------------------------------------------


async def stream_speech(conn: Any, audio: bytes) -> None:
    """Append `audio` in 100 ms chunks, commit, and wait for the transcript: the relay metered it all."""
    for piece in chunks(audio):
        await conn.input_audio_buffer.append(audio=piece)
    await conn.input_audio_buffer.commit()
    await next_event(conn, COMPLETED)


async def next_event(conn: Any, kind: str) -> Any:
    """The next server event of type `kind` (others skipped), within the deadline."""
    async with asyncio.timeout(DEADLINE_S):
        return await next_of(conn, kind)


async def until_closed(conn: Any) -> tuple[list[Any], int | None]:
    """Read server events until the sidecar closes; (events, the close code received, None without one)."""
    events: list[Any] = []
    try:
        async with asyncio.timeout(DEADLINE_S):
            while True:
                events.append(await conn.recv())
    except ConnectionClosed as exc:
        return events, exc.rcvd.code if exc.rcvd is not None else None


class PacedStreamer:
    """Appends audio in real time (one 100 ms chunk every 100 ms) and counts what it handed over."""

    def __init__(self, conn: Any, audio: bytes) -> None:
        self.conn = conn
        self.audio = audio
        self.sent_bytes = 0
        self.sent_chunks = 0
        self._progress = asyncio.Condition()

    async def run(self) -> None:
        """Stream until the audio ends or the task is cancelled."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for index, piece in enumerate(chunks(self.audio, CHUNK_BYTES)):
            await asyncio.sleep(max(0.0, start + index * 0.1 - loop.time()))  # pacing, not synchronisation
            await self.conn.input_audio_buffer.append(audio=piece)
            self.sent_bytes += min(CHUNK_BYTES, len(self.audio) - index * CHUNK_BYTES)
            self.sent_chunks += 1
            async with self._progress:
                self._progress.notify_all()

    async def reach(self, count: int) -> None:
        """Wait until `count` chunks were sent."""
        async with asyncio.timeout(DEADLINE_S), self._progress:
            await self._progress.wait_for(lambda: self.sent_chunks >= count)


# ---- throwaway processes ----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def poll(check: Callable[[], Any], *, what: str, every_s: float = 0.05, deadline_s: float = DEADLINE_S) -> Any:
    """Call async `check()` until it returns something truthy; a bounded poll of another process's state.

    Raises TimeoutError after `deadline_s`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        await asyncio.sleep(every_s)


def quick_redis(url: str) -> aioredis.Redis:
    """A client that fails at once when the server is down: one immediate retry (a connection the server
    closed is replaced), short timeouts."""
    return aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 1), socket_connect_timeout=2, socket_timeout=5)


class RedisServer:
    """A throwaway `redis-server` on 127.0.0.1:`port`, with its data (and AOF, if asked) in `directory`."""

    def __init__(self, directory: Path, *, port: int | None = None, appendonly: bool = False) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.appendonly = appendonly
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start the server and wait until it answers PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.directory)]
        args += ["--appendonly", "yes" if self.appendonly else "no", "--logfile", "redis.log"]
        self._process = await asyncio.create_subprocess_exec("redis-server", *args, stdout=subprocess.DEVNULL)
        client = quick_redis(self.url)
        try:
            await poll(lambda: self._answers(client), what=f"redis-server on port {self.port}")
        finally:
            await client.aclose()

    async def _answers(self, client: aioredis.Redis) -> bool:
        if self._process is not None and self._process.returncode is not None:
            raise RuntimeError(f"redis-server exited with {self._process.returncode}; see {self.directory}/redis.log")
        try:
            return bool(await client.ping())
        except (RedisError, OSError):
            return False

    async def shutdown(self) -> None:
        """SHUTDOWN (which writes the AOF when enabled) and wait for the process to exit."""
        client = quick_redis(self.url)
        try:
            await client.shutdown()
        finally:
            await client.aclose()
        await self.wait()

    async def wait(self) -> None:
        if self._process is not None:
            async with asyncio.timeout(DEADLINE_S):
                await self._process.wait()
            self._process = None

    async def stop(self) -> None:
        """Kill the server if it still runs (cleanup)."""
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
        await self.wait()


class SidecarProcess:
    """`sidecar serve` as a subprocess with the given environment (only SIDECAR_* of ours)."""

    def __init__(self, env: Mapping[str, str], *, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        base = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        self.env = {**base, **env, "SIDECAR_HOST": "127.0.0.1", "SIDECAR_PORT": str(self.port)}
        self._process: asyncio.subprocess.Process | None = None
        self.log = workdir / "sidecar.log"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    async def start(self) -> None:
        """Start it and wait until GET /readyz answers 200."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sidecar.cli", "serve", env=self.env, cwd=self.workdir, stdout=log, stderr=log
            )
        finally:
            os.close(log)
        async with httpx.AsyncClient(base_url=self.http, timeout=2.0) as http:
            await poll(lambda: self._ready(http), what="sidecar /readyz")

    async def _ready(self, http: httpx.AsyncClient) -> bool:
        if self._process is not None and self._process.returncode is not None:
            raise RuntimeError(f"sidecar exited with {self._process.returncode}:\n{self.log.read_text()[-2000:]}")
        try:
            return (await http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def kill(self) -> None:
        """SIGKILL it and wait until it is gone."""
        await self._signal(signal.SIGKILL)

    async def terminate(self) -> int | None:
        """SIGTERM it (a graceful drain), wait until it exits and return its exit code."""
        await self._signal(signal.SIGTERM)
        return self.returncode

    async def _signal(self, signum: signal.Signals) -> None:
        if self._process is None:
            return
        if self._process.returncode is None:
            os.kill(self._process.pid, signum)
        async with asyncio.timeout(DEADLINE_S):
            await self._process.wait()

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.returncode


# ---- a real `sidecar serve` -----------------------------------------------------------------------------


def litellm_config(path: Path, provider: FakeProvider, *, master_key: str = MASTER_KEY) -> Path:
    """A LiteLLM config.yaml serving gpt-realtime-whisper from `provider`, with `master_key`."""
    config = {
        "model_list": [entry(MODEL, f"openai/{MODEL}", provider.url, provider.api_key)],
        "general_settings": {"master_key": master_key},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def serve_env(
    tmp_path: Path, provider: FakeProvider, *, master_key: str = MASTER_KEY, **settings: str
) -> dict[str, str]:
    """The environment of a `sidecar serve` on `provider`: SIDECAR_<NAME> for each `name=value` given."""
    env = {
        "SIDECAR_LITELLM_CONFIG": str(litellm_config(tmp_path / "litellm.yaml", provider, master_key=master_key)),
        "SIDECAR_SPOOL_DIR": str(tmp_path / "spool-serve"),
        "SIDECAR_DATABASE_URL": f"sqlite:///{tmp_path / 'unused.db'}",
    }
    return env | {f"SIDECAR_{name.upper()}": value for name, value in settings.items()}
