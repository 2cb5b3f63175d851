"""`sidecar consume`: a consumer group of the usage stream (docs/api.md, "Metering and billing").

One `UsageConsumer` runs one group through one writer: the `billing` group into the billing database
(`BillingWriter`), the `litellm` group into LiteLLM's own ledger (`sidecar.ledger.sink.LedgerSink`).
Delivery is at least once and writes are idempotent: an entry is acknowledged only after the DB
transaction holding its event commits (or after it was dead-lettered), so a consumer that dies at any
point leaves its entries pending, and another one reclaims them with XAUTOCLAIM; replaying them changes
nothing. Unparsable entries, and events a writer refuses for good, go to `<stream>:dead` (`{<stream>}:dead`
on a Redis Cluster: the stream's hash slot) with the reason and the group that buried them.

The stream is trimmed with XTRIM MINID below the oldest entry any group on it still needs, never by
length, so no group loses an entry it has not acknowledged or not yet read. A trim costs XINFO GROUPS, an
XPENDING per group and the XTRIM, so while entries keep coming it runs at most every `trim_every_s`, and at once
when the consumer has caught up (nothing waiting).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeAlias, runtime_checkable

import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT
from sqlalchemy.engine import Engine

from sidecar.billing.writer import BillingDataError, BillingError, check_storable, upgrade
from sidecar.redis_conn import REDIS_ERRORS
from sidecar.redis_keys import dead_stream, is_cluster
from sidecar.usage import UsageDecodeError, UsageEvent

if TYPE_CHECKING:
    from sidecar.ledger.writer import Outcome

GROUP: Final = "billing"
LITELLM_GROUP: Final = "litellm"
DEFAULT_STREAM: Final = "realtime:usage"
SWEEP_EVERY_S: Final = 5.0
BACKOFF_S: Final = 0.5
BACKOFF_MAX_S: Final = 30.0
IDLE_WAIT_S: Final = 0.1
"""How long `run` pauses between empty polls when `block_ms` is 0 (no server-side blocking)."""
PROGRESS_EVERY_S: Final = 60.0
"""How often `run` logs a progress line: events written since the last one, the group's lag and pending count."""
TRIM_EVERY_S: Final = 1.0
"""The longest `run_once` goes without trimming while entries keep coming; caught up, it trims at once."""
AFTER_COMMIT_TIMEOUT_S: Final = 10.0
"""The longest the post-commit hook may hold up the acknowledgement of a batch."""

log = logging.getLogger(__name__)

Fields: TypeAlias = Mapping[Any, Any]
Entry: TypeAlias = tuple[str, Fields | None]


class BillingStreamError(BillingError):
    """Redis failed under the consumer (unreachable, or a command refused); nothing uncommitted was acked."""


class UsageWriter(Protocol):
    """What a consumer writes through (blocking; run in a worker thread).

    `write` stores the events idempotently and returns either how many were new (`BillingWriter`) or one
    Outcome per event, in order (`LedgerSink`): a `dead_letter` outcome is buried in `<stream>:dead`, the
    others are acknowledged. It raises BillingDataError when an event cannot be stored (the consumer then
    writes one by one and buries the ones that fail), BillingDatabaseError when nothing can be written now.
    """

    def write(self, events: Sequence[UsageEvent], *, now: datetime) -> int | Sequence[Outcome]: ...


@runtime_checkable
class LostSweeper(Protocol):
    """A writer that also closes sessions whose replica died (`BillingWriter`; the billing group only)."""

    def close_lost(self, *, now: datetime, horizon_s: float) -> int: ...


class ProgressObserver(Protocol):
    """Told the group's figures at each progress report (the consumer's Prometheus gauges)."""

    def progress(self, group: str, *, lag: int | None, pending: int) -> None: ...


AfterCommit: TypeAlias = Callable[[Sequence[UsageEvent], Sequence["Outcome"]], Awaitable[None]]
"""Called after a batch committed and before it is acknowledged, with its events and their outcomes (empty
for a writer that returns none); best effort: its failure is logged and never holds back the ack for long."""


def utc_now() -> datetime:
    """The current time, aware UTC."""
    return datetime.now(UTC)


def default_consumer_name() -> str:
    """`<hostname>-<pid>`: unique per process, so a restarted process never takes over a dead one's name."""
    return f"{socket.gethostname()}-{os.getpid()}"


class UsageConsumer:
    """Reads usage events from the stream in a consumer group (`billing`, `litellm`) and writes them through a writer.

    `block_ms` is how long XREADGROUP waits for new entries; 0 means not at all (unlike Redis's own
    BLOCK 0, which waits forever). Entries pending longer than `claim_idle_ms` in any consumer of the
    group are taken over. Sessions with no stored event for `lost_after_s` are closed as lost by
    `sweep_lost`, which `run` calls every `sweep_every_s` once the backlog is drained (writers that are
    a LostSweeper only). `after_commit` runs after each committed batch, before its XACK.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        writer: UsageWriter,
        *,
        stream: str = DEFAULT_STREAM,
        group: str = GROUP,
        consumer: str | None = None,
        batch: int = 500,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        lost_after_s: float = 60.0,
        clock: Callable[[], datetime] = utc_now,
        sweep_every_s: float = SWEEP_EVERY_S,
        backoff_s: float = BACKOFF_S,
        progress_every_s: float = PROGRESS_EVERY_S,
        after_commit: AfterCommit | None = None,
        observer: ProgressObserver | None = None,
        trim_every_s: float = TRIM_EVERY_S,
    ) -> None:
        self._redis = redis
        self._writer = writer
        self._stream = stream
        # In the stream's hash slot (`{<stream>}:dead` on a Redis Cluster): `_bury` adds and acknowledges in one MULTI.
        self._dead_stream = dead_stream(stream, cluster=is_cluster(redis))
        self._group = group
        self._consumer = consumer or default_consumer_name()
        self._batch = batch
        self._block_ms = block_ms
        self._claim_idle_ms = claim_idle_ms
        self._lost_after_s = lost_after_s
        self._clock = clock
        self._sweep_every_s = sweep_every_s
        self._backoff_s = backoff_s
        self._claim_cursor = "0-0"
        self._retry_own = False  # after a failure: this consumer's own pending entries come first
        self._progress_every_s = progress_every_s
        self._after_commit = after_commit
        self._observer = observer
        self._trim_every_s = trim_every_s
        self._next_trim = 0.0  # event-loop time: the first batch trims
        self._untrimmed = False  # entries were handled since the last trim
        self.written = 0  # events stored and acknowledged by this consumer (duplicates included)

    @property
    def name(self) -> str:
        """This consumer's name in the group."""
        return self._consumer

    @property
    def group(self) -> str:
        """The consumer group it reads in."""
        return self._group

    async def ensure_group(self) -> None:
        """Create the group (from the stream's start, creating the stream) unless it exists.

        Raises BillingStreamError if Redis fails.
        """
        await create_group(self._redis, self._stream, self._group)

    async def run_once(self) -> int:
        """Handle one batch and trim the stream when due; return how many entries were handled (0: none waiting).

        The trim is due `trim_every_s` after the last one, and whenever nothing is waiting after entries were
        handled since the last trim (so a consumer that has caught up leaves an empty stream).

        The batch is entries idle for `claim_idle_ms` in the group (a dead consumer's) if there are
        any, else (after a failed batch) this consumer's own pending entries, else new entries (waiting up
        to `block_ms`). Parsed events are written in a worker thread and acknowledged after the commit;
        unparsable or unstorable ones are dead-lettered and acknowledged. Raises BillingStreamError
        (Redis) or BillingDatabaseError (DB): the entries not yet acknowledged stay pending and are
        retried, by this consumer (first thing after the failure) or another, once idle.
        """
        entries = await self._claim()
        if not entries and self._retry_own:
            entries = await self._read(own=True)
            self._retry_own = bool(entries)
        if not entries:
            entries = await self._read()
        if not entries:
            if self._untrimmed:
                await self._trim_now()
            return 0
        await self._handle(entries)
        self._untrimmed = True
        if asyncio.get_running_loop().time() >= self._next_trim:
            await self._trim_now()
        return len(entries)

    async def _trim_now(self) -> None:
        await self.trim()
        self._untrimmed = False
        self._next_trim = asyncio.get_running_loop().time() + self._trim_every_s

    async def sweep_lost(self) -> int:
        """Close sessions with no stored event for `lost_after_s` as lost; return how many.

        Returns 0 at once for a writer that is not a LostSweeper. Raises BillingDatabaseError if the DB fails.
        """
        if not isinstance(self._writer, LostSweeper):
            return 0
        now = self._clock()
        return await asyncio.to_thread(self._writer.close_lost, now=now, horizon_s=self._lost_after_s)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set: batches, a lost sweep every `sweep_every_s` when caught up.

        A Redis or DB failure (a DB that does not answer within the writer's timeout included) is logged
        as a warning and retried after a back-off (doubling up to 30 s, cut short by `stop`), this
        consumer's own pending entries first; it never acknowledges an uncommitted entry. `stop` is
        checked between batches, so it takes effect within `block_ms` plus one batch. Other exceptions
        (bugs) propagate.
        """
        loop = asyncio.get_running_loop()
        backoff = self._backoff_s
        next_sweep = loop.time()
        next_progress, reported = loop.time() + self._progress_every_s, self.written
        ready = False
        log.info("%s consumer %s started: stream %s, group %s", self._group, self._consumer, self._stream, self._group)
        while not stop.is_set():
            try:
                if not ready:
                    await self.ensure_group()
                    ready = True
                handled = await self.run_once()
                if handled < self._batch and loop.time() >= next_sweep:
                    if closed := await self.sweep_lost():
                        log.info("billing: closed %d lost sessions", closed)
                    next_sweep = loop.time() + self._sweep_every_s
                if loop.time() >= next_progress:
                    await self._report(self.written - reported)
                    next_progress, reported = loop.time() + self._progress_every_s, self.written
                backoff = self._backoff_s
            except BillingError as exc:
                log.warning("%s consumer %s: %s; retrying in %.1fs", self._group, self._consumer, exc, backoff)
                ready = False  # the stream or group may have been deleted with Redis's data
                self._retry_own = True
                await _wait(stop, backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            if handled == 0 and self._block_ms == 0:
                await _wait(stop, IDLE_WAIT_S)
        log.info("%s consumer %s stopped: %d events written", self._group, self._consumer, self.written)

    async def _report(self, written: int) -> None:
        """The progress line: events written since the last one, and the group's lag (entries never delivered;
        Redis 7) and pending entries (delivered, not yet acknowledged). Raises BillingStreamError."""
        with _redis_errors("XINFO GROUPS"):
            groups = await self._redis.xinfo_groups(self._stream)
        mine = next((g for g in groups if _text(g["name"]) == self._group), {})
        lag = mine.get("lag")
        if self._observer is not None:
            self._observer.progress(self._group, lag=lag, pending=int(mine.get("pending", 0)))
        log.info(
            "%s consumer %s: %d events written in the last %.0fs; lag %s, %s pending",
            self._group,
            self._consumer,
            written,
            self._progress_every_s,
            "unknown" if lag is None else lag,
            mine.get("pending", 0),
        )

    async def trim(self) -> int:
        """XTRIM MINID to the oldest entry any group on the stream still needs; return how many went.

        Needed: each group's oldest pending (unacknowledged) entry, and everything after its
        last-delivered id. Entries below the smallest of these are acknowledged by every group.
        Raises BillingStreamError if Redis fails.
        """
        with _redis_errors("trim"):
            floor: tuple[int, int] | None = None
            for group in await self._redis.xinfo_groups(self._stream):
                needed = await self._oldest_needed(group)
                floor = needed if floor is None else min(floor, needed)
            if floor is None:
                return 0
            removed: int = await self._redis.xtrim(self._stream, minid=f"{floor[0]}-{floor[1]}", approximate=False)
            return removed

    async def _oldest_needed(self, group: Mapping[str, Any]) -> tuple[int, int]:
        ms, seq = _parse_id(group["last-delivered-id"])
        after_last = (ms, seq + 1) if seq < 2**64 - 1 else (ms + 1, 0)
        if not group["pending"]:
            return after_last
        summary = await self._redis.xpending(self._stream, group["name"])
        oldest = summary["min"]  # None if acknowledged meanwhile
        return after_last if oldest is None else min(_parse_id(oldest), after_last)

    async def _claim(self) -> list[Entry]:
        with _redis_errors("XAUTOCLAIM"):
            reply = await self._redis.xautoclaim(
                self._stream,
                self._group,
                self._consumer,
                min_idle_time=self._claim_idle_ms,
                start_id=self._claim_cursor,
                count=self._batch,
            )
        self._claim_cursor = _text(reply[0])
        return [(_text(entry_id), fields) for entry_id, fields in reply[1]]

    async def _read(self, *, own: bool = False) -> list[Entry]:
        """New entries (waiting up to `block_ms`), or with `own` this consumer's pending ones (no wait)."""
        with _redis_errors("XREADGROUP"):
            reply = await self._redis.xreadgroup(
                self._group,
                self._consumer,
                {self._stream: "0" if own else ">"},
                count=self._batch,
                block=None if own else self._block_ms or None,
            )
        return [(_text(entry_id), fields) for entry_id, fields in _stream_entries(reply)]

    async def _handle(self, entries: Sequence[Entry]) -> None:
        events: list[tuple[str, Fields, UsageEvent]] = []
        dead: list[tuple[str, Fields, str]] = []
        gone: list[str] = []
        for entry_id, fields in entries:
            if not fields:  # deleted while pending (Redis < 7 still lists it): nothing to bill
                gone.append(entry_id)
                continue
            try:
                event = UsageEvent.from_fields(dict(fields))
                check_storable(event)
            except (UsageDecodeError, BillingDataError) as exc:
                dead.append((entry_id, fields, str(exc)))
            else:
                events.append((entry_id, fields, event))
        if dead or gone:
            await self._bury(dead, gone)
        if events:
            await self._write(events)

    async def _write(self, events: Sequence[tuple[str, Fields, UsageEvent]]) -> None:
        now = self._clock()
        try:
            result = await asyncio.to_thread(self._writer.write, [event for _, _, event in events], now=now)
        except BillingDataError:
            # The DB refused a value check_storable let through: find it, write the rest.
            await self._write_one_by_one(events, now)
            return
        await self._settle(events, result)

    async def _write_one_by_one(self, events: Sequence[tuple[str, Fields, UsageEvent]], now: datetime) -> None:
        for entry in events:
            try:
                result = await asyncio.to_thread(self._writer.write, [entry[2]], now=now)
            except BillingDataError as exc:
                await self._bury([(entry[0], entry[1], str(exc))], [])
            else:
                await self._settle([entry], result)

    async def _settle(self, events: Sequence[tuple[str, Fields, UsageEvent]], result: int | Sequence[Outcome]) -> None:
        """After the commit: bury what the writer refused for good, run the hook on the rest, acknowledge them."""
        outcomes: list[Outcome | None] = [None] * len(events) if isinstance(result, int) else list(result)
        dead: list[tuple[str, Fields, str]] = []
        kept: list[tuple[str, Fields, UsageEvent]] = []
        kept_outcomes: list[Outcome] = []
        for entry, outcome in zip(events, outcomes, strict=True):
            if outcome is not None and outcome.kind == "dead_letter":
                dead.append((entry[0], entry[1], outcome.reason))
                continue
            kept.append(entry)
            if outcome is not None:
                kept_outcomes.append(outcome)
        if self._after_commit is not None and kept:
            await self._notify([event for _, _, event in kept], kept_outcomes)
        if dead:
            await self._bury(dead, [])
        if kept:
            await self._ack([entry_id for entry_id, _, _ in kept])
            self.written += len(kept)

    async def _notify(self, events: Sequence[UsageEvent], outcomes: Sequence[Outcome]) -> None:
        assert self._after_commit is not None
        try:
            async with asyncio.timeout(AFTER_COMMIT_TIMEOUT_S):
                await self._after_commit(events, outcomes)
        except Exception as exc:  # best effort: the commit stands and the entries must be acknowledged
            log.warning("%s consumer %s: after-commit hook failed: %s", self._group, self._consumer, _describe(exc))

    async def _bury(self, dead: Sequence[tuple[str, Fields, str]], gone: Sequence[str]) -> None:
        """Dead-letter entries with their reason and acknowledge them, atomically (MULTI/EXEC)."""
        for entry_id, _, reason in dead:
            log.warning("%s: dead-lettering %s from %s: %s", self._group, entry_id, self._stream, reason)
        with _redis_errors("dead-letter"):
            async with self._redis.pipeline(transaction=True) as pipe:
                for entry_id, fields, reason in dead:
                    letter: dict[FieldT, EncodableT] = {_key(k): v for k, v in fields.items()}
                    letter.update({"reason": reason, "original_id": entry_id, "group": self._group})
                    pipe.xadd(self._dead_stream, letter)
                pipe.xack(self._stream, self._group, *(entry_id for entry_id, _, _ in dead), *gone)
                await pipe.execute()

    async def _ack(self, entry_ids: Sequence[str]) -> None:
        with _redis_errors("XACK"):
            await self._redis.xack(self._stream, self._group, *entry_ids)


async def create_group(redis: aioredis.Redis, stream: str, group: str) -> None:
    """Create `group` on `stream` from the stream's start (creating the stream) unless it exists.

    A group created after others trimmed the stream starts from what is left: trimming keeps only what the
    groups that exist still need. Raises BillingStreamError if Redis fails.
    """
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise BillingStreamError(f"cannot create group {group!r}: {exc}") from exc
    except REDIS_ERRORS as exc:
        raise BillingStreamError(f"cannot create group {group!r}: {_describe(exc)}") from exc


async def create_groups_when_reachable(
    redis: aioredis.Redis,
    stream: str,
    groups: Sequence[str],
    stop: asyncio.Event,
    *,
    backoff_s: float = BACKOFF_S,
    max_backoff_s: float = BACKOFF_MAX_S,
) -> bool:
    """Create every group before any of them consumes, so that no group's trim removes entries another has
    not read; retried with a back-off (each failure a warning) while Redis fails. False when `stop` came first."""
    while not stop.is_set():
        try:
            for group in groups:
                await create_group(redis, stream, group)
        except BillingStreamError as exc:
            log.warning("consumer groups not created at start: %s; retrying in %.1fs", exc, backoff_s)
            await _wait(stop, backoff_s)
            backoff_s = min(backoff_s * 2, max_backoff_s)
            continue
        return True
    return False


async def upgrade_when_reachable(
    engine: Engine, stop: asyncio.Event, *, backoff_s: float = BACKOFF_S, max_backoff_s: float = BACKOFF_MAX_S
) -> bool:
    """Create the billing tables, retrying while the database cannot be reached (down at start): each failed
    attempt is logged as a warning with its cause, the back-off doubles up to `max_backoff_s` and `stop` cuts
    it short. Returns True once the tables are there, False when `stop` was set first."""
    while not stop.is_set():
        try:
            await asyncio.to_thread(upgrade, engine)
        except BillingError as exc:
            log.warning("billing database not ready at start: %s; retrying in %.1fs", exc, backoff_s)
            await _wait(stop, backoff_s)
            backoff_s = min(backoff_s * 2, max_backoff_s)
            continue
        return True
    return False


def _stream_entries(reply: Any) -> list[tuple[Any, Fields | None]]:
    """The entries of a one-stream XREADGROUP reply, RESP2 (list) or RESP3 (dict)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        (batches,) = reply.values()
        return [entry for batch in batches for entry in batch]
    entries: list[tuple[Any, Fields | None]] = reply[0][1]
    return entries


def _parse_id(entry_id: bytes | str) -> tuple[int, int]:
    ms, _, seq = _text(entry_id).partition("-")
    return int(ms), int(seq or 0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _key(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@contextmanager
def _redis_errors(action: str) -> Iterator[None]:
    try:
        yield
    except REDIS_ERRORS as exc:
        raise BillingStreamError(f"{action} failed: {_describe(exc)}") from exc


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
