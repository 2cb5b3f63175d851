"""In-flight control: live sessions across replicas, concurrency leases, re-checks, budgets, revocation, drain.

    Supervisor (one task per replica)
      every 0.25 s  poll each session: idle/length limits, checkpoints; budgets of budgeted keys and teams
      every 1 s     heartbeat: this replica's sessions (and their running costs) into the shared store
      every key_recheck_s  re-check each live key once against LiteLLM (by hash, with the master key)
      always        control messages (revocations, terminations, model reloads) from every replica: pushed by
                    pub/sub, and read back from the capped control log at every (re)subscription and every
                    heartbeat, so a message published while this replica was not subscribed still arrives

The shared state lives behind `ControlStore`: `RedisStore` (replicas share one Redis: a registry hash with
expiry, a lease sorted set per key, running costs per budget scope, billed-spend counters per budget window,
pub/sub on `realtime:control`, sharded pub/sub on a Redis Cluster, and the capped control log
`<prefix>:control:log`, a stream every control message is appended to first) or `MemoryStore` (embedded mode: one
process, nothing to lose).

A live session is anything `Watched`: a relayed WebSocket session (relay.Relay) or a WebRTC call watched
through its sideband (calls.watch.CallWatch); the loops below treat both alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterPubSub, RedisCluster

from sidecar import tuning
from sidecar.auth import KeyChecker, Principal, authorize
from sidecar.errors import (
    BudgetExceeded,
    ConcurrencyLimit,
    InvalidApiKey,
    KeyBlocked,
    KeyCheckError,
    ModelNotAllowed,
    ServiceUnavailable,
    SidecarError,
)
from sidecar.metrics import Metrics
from sidecar.redis_conn import REDIS_ERRORS
from sidecar.redis_keys import budget_prefix, is_cluster

if TYPE_CHECKING:
    from sidecar.metering import Figures
    from sidecar.surfaces.account import Account
    from sidecar.usage import UsageEvent

log = logging.getLogger("sidecar.control")

POLL_S: Final = 0.25
HEARTBEAT_S: Final = 1.0
# Sessions per registry write in a heartbeat: a heartbeat of 1000 sessions in one go held the event loop for
# about 36 ms every second (the relay's p99 round trip); in slices, frames are relayed between them.
HEARTBEAT_SLICE: Final = 100
RELEASE_AFTER_S: Final = 0.5  # after the last session ends: collect garbage, malloc_trim
#: Under steady churn no burst ever ends: after this many sessions have ended, and at most once per
#: CHURN_RELEASE_S, a full collection runs with sessions live (the raised GC threshold leaves the cycles of ended
#: sessions to generation 2, which a steady load reaches too rarely: `make soak` saw RSS climb 35 MiB in 10 min).
CHURN_RELEASE_SESSIONS: Final = 1000
CHURN_RELEASE_S: Final = 30.0
LEASE_TTL_S: Final = 5.0  # a dead replica's sessions disappear from the registry after this long
BILLED_TTL_S: Final = 40 * 86400  # billed-spend counters without a budget window expire after 40 days
#: The endings a `terminate` control message may ask for (any other reason is read as `session_terminated`).
TERMINATIONS: Final = frozenset({"session_terminated", "client_hangup"})
#: The control log keeps this many messages (XADD MAXLEN): a replica cut off from Redis while more were
#: published misses the oldest of them (docs/operations.md, "Redis high availability").
CONTROL_LOG_MAXLEN: Final = 1000
#: How long an admin's append waits for its replicas (SIDECAR_REDIS_WAIT_REPLICAS) before the sentinels are asked.
CONTROL_WAIT_TIMEOUT_MS: Final = 250
#: Control log entries read per XREAD while catching up.
CATCH_UP_BATCH: Final = 100
#: Ids of messages applied from pub/sub ahead of the control log cursor that a replica remembers (not read back twice).
SEEN_AHEAD: Final = 1024
#: What `RedisStore.messages` yields (this very object) once subscribed: the supervisor then catches up from the log.
SUBSCRIBED: Final[dict[str, str]] = {"action": "subscribed"}


class ControlError(SidecarError):
    """The shared control store failed (Redis unreachable)."""


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One live session as `GET /admin/sessions` lists it (no secrets)."""

    session_id: str
    replica: str
    key_hash: str
    key_alias: str
    user_id: str
    team_id: str
    model: str
    started_at: str
    audio_seconds: str
    cost_usd: str

    def to_json(self) -> bytes:
        return orjson.dumps(self)  # orjson serialises dataclasses natively (asdict deep-copies: 10x slower)


def scopes_of(principal: Principal) -> list[tuple[str, Decimal]]:
    """The budget scopes of a principal with a max budget: ("key:<hash>", max) and ("team:<id>", max)."""
    found: list[tuple[str, Decimal]] = []
    if principal.max_budget is not None:
        found.append((f"key:{principal.key_hash}", principal.max_budget))
    if principal.team_id and principal.team_max_budget is not None:
        found.append((f"team:{principal.team_id}", principal.team_max_budget))
    return found


def window_of(principal: Principal, scope: str) -> str:
    """The budget window a billed-spend counter belongs to (LiteLLM resets spend at budget_reset_at)."""
    reset = principal.budget_reset_at if scope.startswith("key:") else principal.team_budget_reset_at
    return reset or "all"


def budget_windows(principal: Principal) -> str:
    """The usage event's `budget_windows`: compact JSON scope -> window, '' for a key without a budget.

    Built once per session (sidecar/app.py), never per event: the LiteLLM sink settles the applied spend
    against these very counters (sidecar/ledger/budget.py; docs/billing.md).
    """
    if principal.is_master:
        return ""
    found = {scope: window_of(principal, scope) for scope, _ in scopes_of(principal)}
    return orjson.dumps(found).decode() if found else ""


def billed_key(prefix: str, scope: str, window: str) -> str:
    """The Redis key of a scope's billed-spend counter in one budget window (`prefix`: the budget family's,
    sidecar/redis_keys.py `budget_prefix`: `{realtime}` on a Redis Cluster)."""
    return f"{prefix}:billed:{scope}:{window}"


class Watched(Protocol):
    """One live session as the Supervisor sees it: relay.Relay (a WebSocket session) or
    calls.watch.CallWatch (a WebRTC call). Read a few times a second, never per frame."""

    #: Who the session belongs to, its model, and its usage events.
    session: Account
    #: Empty while live; the final event's close_reason once over.
    close_reason: str
    #: Frames and bytes relayed so far (folded into the metrics; a call relays none).
    frames_in: int
    frames_out: int
    bytes_in: int
    bytes_out: int
    #: False when the session's audio never passes through the sidecar (a WebRTC call): the provider's
    #: reported seconds are then not reconciled against metered audio.
    meters_audio: bool

    @property
    def ended(self) -> bool: ...
    def end(self, code: str) -> None: ...
    def poll(self, now: float) -> UsageEvent | None: ...
    def figures(self) -> Figures: ...
    def cost(self) -> Decimal: ...


class ControlStore(Protocol):
    """Shared state across replicas."""

    async def acquire(self, key_hash: str, session_id: str, *, limit: int, now: float) -> bool: ...
    async def release(self, key_hash: str, session_id: str) -> None: ...
    async def heartbeat(
        self, infos: Sequence[SessionInfo], costs: Mapping[str, Mapping[str, Decimal]], *, now: float
    ) -> None: ...
    async def sessions(self, *, now: float) -> list[SessionInfo]: ...
    async def live_costs(self, scope: str, *, now: float) -> dict[str, Decimal]: ...
    async def add_billed(self, scope: str, window: str, amount: Decimal) -> None: ...
    async def billed(self, scope: str, window: str) -> Decimal: ...
    async def publish(self, message: dict[str, str]) -> None: ...
    def messages(self) -> AsyncIterator[dict[str, str]]: ...
    async def read_log(self, after: str | None) -> tuple[str, list[tuple[str, dict[str, str]]]]: ...
    async def ping(self) -> bool: ...


class MemoryStore:
    """ControlStore for one process (embedded mode)."""

    def __init__(self) -> None:
        self._leases: dict[str, dict[str, float]] = defaultdict(dict)
        self._sessions: dict[str, tuple[float, SessionInfo]] = {}
        self._costs: dict[str, dict[str, tuple[float, Decimal]]] = defaultdict(dict)
        self._billed: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
        self._queue: asyncio.Queue[dict[str, str]] = asyncio.Queue()

    async def acquire(self, key_hash: str, session_id: str, *, limit: int, now: float) -> bool:
        leases = self._leases[key_hash]
        for sid, expires in list(leases.items()):
            if expires <= now:
                del leases[sid]
        if len(leases) >= limit:
            return False
        leases[session_id] = now + LEASE_TTL_S
        return True

    async def release(self, key_hash: str, session_id: str) -> None:
        self._leases[key_hash].pop(session_id, None)
        self._sessions.pop(session_id, None)
        for costs in self._costs.values():
            costs.pop(session_id, None)

    async def heartbeat(
        self, infos: Sequence[SessionInfo], costs: Mapping[str, Mapping[str, Decimal]], *, now: float
    ) -> None:
        expires = now + LEASE_TTL_S
        for info in infos:
            self._sessions[info.session_id] = (expires, info)
            if info.session_id in self._leases[info.key_hash]:
                self._leases[info.key_hash][info.session_id] = expires
        for scope, by_session in costs.items():
            for sid, cost in by_session.items():
                self._costs[scope][sid] = (expires, cost)

    async def sessions(self, *, now: float) -> list[SessionInfo]:
        return [info for expires, info in self._sessions.values() if expires > now]

    async def live_costs(self, scope: str, *, now: float) -> dict[str, Decimal]:
        return {sid: cost for sid, (expires, cost) in self._costs[scope].items() if expires > now}

    async def add_billed(self, scope: str, window: str, amount: Decimal) -> None:
        self._billed[(scope, window)] += amount

    async def billed(self, scope: str, window: str) -> Decimal:
        return self._billed[(scope, window)]

    async def publish(self, message: dict[str, str]) -> None:
        self._queue.put_nowait(message)

    async def messages(self) -> AsyncIterator[dict[str, str]]:
        while True:
            yield await self._queue.get()

    async def read_log(self, after: str | None) -> tuple[str, list[tuple[str, dict[str, str]]]]:
        """One process: the queue loses nothing, so there is no log to read."""
        return after or "0-0", []

    async def ping(self) -> bool:
        return True


# Acquire a lease if the key holds fewer than ARGV[1] live ones: drop expired leases, count, add.
_ACQUIRE: Final = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], 3600)
return 1
"""


class RedisStore:
    """ControlStore over one Redis (or one Redis Cluster) shared by every replica. Times are wall-clock seconds
    (`now`).

    Every operation touches one key at a time (the release and heartbeat pipelines are not transactions), so on a
    cluster leases, registry and costs live wherever their names hash; the billed counters are the budget family
    (sidecar/redis_keys.py). On a cluster the control channel is a sharded channel (SPUBLISH / SSUBSCRIBE): one
    shard carries it instead of every node's bus."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        channel: str = "realtime:control",
        prefix: str = "realtime",
        wait_replicas: int = 0,
        log_maxlen: int = CONTROL_LOG_MAXLEN,
    ) -> None:
        self._redis = redis
        self._channel = channel
        self._prefix = prefix
        self._log = f"{prefix}:control:log"  # one key: its own slot on a cluster
        self._log_maxlen = log_maxlen
        self._wait_replicas = wait_replicas
        self._cluster = is_cluster(redis)
        self._budget = budget_prefix(prefix, cluster=self._cluster)
        self._acquire = redis.register_script(_ACQUIRE)

    def _k(self, *parts: str) -> str:
        return ":".join((self._prefix, *parts))

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except REDIS_ERRORS as exc:
            raise ControlError(f"control store unreachable ({type(exc).__name__})") from exc

    async def acquire(self, key_hash: str, session_id: str, *, limit: int, now: float) -> bool:
        result = await self._call(
            self._acquire(keys=[self._k("leases", key_hash)], args=[limit, now + LEASE_TTL_S, now, session_id])
        )
        return bool(result)

    async def release(self, key_hash: str, session_id: str) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrem(self._k("leases", key_hash), session_id)
        pipe.hdel(self._k("sessions"), session_id)
        await self._call(pipe.execute())

    async def heartbeat(
        self, infos: Sequence[SessionInfo], costs: Mapping[str, Mapping[str, Decimal]], *, now: float
    ) -> None:
        if not infos:
            return
        expires = now + LEASE_TTL_S
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(
            self._k("sessions"),
            mapping={i.session_id: f"{expires} ".encode() + i.to_json() for i in infos},
        )
        leases: dict[str, dict[str, float]] = defaultdict(dict)  # one ZADD per key, not per session
        for info in infos:
            leases[info.key_hash][info.session_id] = expires
        # Not XX: a lease Redis lost (a failover before it replicated, a restart) comes back with the next beat. A
        # beat racing a release may re-add an ended session's lease; it expires within LEASE_TTL_S, like the registry.
        for key_hash, members in leases.items():
            pipe.zadd(self._k("leases", key_hash), members)
        for scope, by_session in costs.items():
            key = self._k("cost", scope)
            pipe.hset(key, mapping={sid: f"{expires} {cost}" for sid, cost in by_session.items()})
            pipe.expire(key, 3600)
        await self._call(pipe.execute())

    async def sessions(self, *, now: float) -> list[SessionInfo]:
        raw: dict[bytes, bytes] = await self._call(self._redis.hgetall(self._k("sessions")))
        live: list[SessionInfo] = []
        stale: list[bytes] = []
        for sid, value in raw.items():
            expires, _, body = value.partition(b" ")
            if float(expires) > now:
                live.append(SessionInfo(**orjson.loads(body)))
            else:
                stale.append(sid)
        if stale:
            await self._call(self._redis.hdel(self._k("sessions"), *stale))
        return live

    async def live_costs(self, scope: str, *, now: float) -> dict[str, Decimal]:
        raw: dict[bytes, bytes] = await self._call(self._redis.hgetall(self._k("cost", scope)))
        out: dict[str, Decimal] = {}
        for sid, value in raw.items():
            expires, _, cost = value.decode().partition(" ")
            if float(expires) > now:
                out[sid.decode()] = Decimal(cost)
        return out

    async def add_billed(self, scope: str, window: str, amount: Decimal) -> None:
        key = billed_key(self._budget, scope, window)
        pipe = self._redis.pipeline(transaction=True)  # one key: one slot
        pipe.incrbyfloat(key, float(amount))
        pipe.expire(key, BILLED_TTL_S)
        await self._call(pipe.execute())

    async def billed(self, scope: str, window: str) -> Decimal:
        raw = await self._call(self._redis.get(billed_key(self._budget, scope, window)))
        return Decimal(raw.decode()) if raw else Decimal(0)

    async def publish(self, message: dict[str, str]) -> None:
        """Append `message` to the control log, then push it (with its log id) on the channel.

        With `wait_replicas` (Sentinel) the append counts once that many replicas have it (WAIT), so a failover
        cannot drop it; short of that, ControlError (the admin call answers 503: repeat it), after dropping the
        pool's connections when the sentinels name another master. A master with no healthy replica at all is
        appended to anyway (no failover can drop the entry). The push failing after the append is no failure:
        every replica reads the log within a heartbeat."""
        body = orjson.dumps(message)
        if self._cluster:  # no WAIT on a cluster (it would answer for whichever node it reached)
            log_id = await self._call(
                self._redis.xadd(self._log, {"m": body}, maxlen=self._log_maxlen, approximate=False)
            )
        else:
            pipe = self._redis.pipeline(transaction=False)
            pipe.xadd(self._log, {"m": body}, maxlen=self._log_maxlen, approximate=False)
            if self._wait_replicas:
                pipe.wait(self._wait_replicas, CONTROL_WAIT_TIMEOUT_MS)
            replies = await self._call(pipe.execute())
            log_id = replies[0]
            if self._wait_replicas and int(replies[-1]) < self._wait_replicas:
                await self._shortfall(int(replies[-1]))
        pushed = orjson.dumps({**message, "log_id": _text(log_id)})
        send = self._redis.spublish if self._cluster else self._redis.publish
        try:
            await send(self._channel, pushed)
        except REDIS_ERRORS as exc:
            log.warning(
                "control: pushing a logged message failed; replicas read it from the log", extra={"reason": repr(exc)}
            )

    async def _shortfall(self, acknowledged: int) -> None:
        from sidecar.redis_conn import replication_shortfall

        why = await self._call(replication_shortfall(self._redis))
        if why == "alone":
            return
        if why == "demoted":
            await self._redis.connection_pool.disconnect()  # the next attempt dials the master the sentinels name
        raise ControlError(
            f"control log: {acknowledged} of {self._wait_replicas} replicas acknowledged the message"
            + (" (a demoted master)" if why == "demoted" else "")
        )

    async def read_log(self, after: str | None) -> tuple[str, list[tuple[str, dict[str, str]]]]:
        """The control log's entries after the id `after`, up to CATCH_UP_BATCH, and the id to read after next;
        `after` None (a replica starting): none, and the log's current end (`0-0` while empty)."""
        if after is None:
            last = await self._call(self._redis.xrevrange(self._log, "+", "-", count=1))
            return (_text(last[0][0]) if last else "0-0"), []
        reply = await self._call(self._redis.xread({self._log: after}, count=CATCH_UP_BATCH))
        entries: list[tuple[str, dict[str, str]]] = []
        cursor = after
        for _, items in reply or ():
            for entry_id, fields in items:
                cursor = _text(entry_id)
                with contextlib.suppress(orjson.JSONDecodeError, TypeError):
                    message = orjson.loads(fields.get(b"m", b""))
                    if isinstance(message, dict):
                        entries.append((cursor, {str(k): str(v) for k, v in message.items()}))
        return cursor, entries

    async def messages(self) -> AsyncIterator[dict[str, str]]:
        """The control messages, as they arrive, after SUBSCRIBED once subscribed. Raises redis-py's errors when
        the subscription is lost (the Supervisor subscribes again, then reads what it missed from the log)."""
        # On a cluster the (un)subscribe confirmations are read: the server's `sunsubscribe` says the slot moved.
        pubsub = self._redis.pubsub(ignore_subscribe_messages=not self._cluster)
        try:
            if self._cluster:
                # Read the slot map afresh: after a failover the cached owner of the channel's slot may be gone.
                cluster = cast("RedisCluster", self._redis)
                await cluster.initialize()
                await cluster.nodes_manager.initialize()
                await pubsub.ssubscribe(self._channel)
                items = _sharded(cast("ClusterPubSub", pubsub))
            else:
                await pubsub.subscribe(self._channel)
                items = pubsub.listen()
            yield SUBSCRIBED  # what was published while not subscribed is in the log
            async for item in items:
                if item.get("type") not in ("message", "smessage"):
                    continue
                with contextlib.suppress(orjson.JSONDecodeError, TypeError):
                    message = orjson.loads(item["data"])
                    if isinstance(message, dict):
                        yield {str(k): str(v) for k, v in message.items()}
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except REDIS_ERRORS:
            return False


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _log_order(log_id: str) -> tuple[int, int]:
    """A stream id (`<ms>-<seq>`) as a comparable pair; a malformed one sorts first (never applied twice)."""
    ms, _, seq = log_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return -1, -1


def _still_cancelled() -> None:
    """Raise CancelledError when the current task was cancelled but a library swallowed it: on Python 3.11,
    `asyncio.timeout` (redis-py's reads) turns a cancellation landing as its timeout expires into a TimeoutError,
    which a Redis-failure handler then takes for an outage (fixed in 3.12). Without this a supervisor loop that
    handles Redis failures would never stop, and the app's shutdown would wait on it forever (seen in CI)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _sharded(pubsub: ClusterPubSub) -> AsyncIterator[dict[str, Any]]:
    """The messages of a cluster pub/sub's sharded channel (redis-py's ClusterPubSub has no `listen` for them).

    Raises ControlError when the subscription is gone: the server unsubscribes sharded subscribers when their slot
    changes master (a failover), after which redis-py would wait on nothing."""
    task = asyncio.current_task()
    while True:
        try:
            item = await pubsub.get_sharded_message(timeout=HEARTBEAT_S)
        except RuntimeError as exc:  # a per-node pub/sub redis-py closed while moving the subscription itself
            raise ControlError("control channel lost (its shard subscription was closed)") from exc
        if task is not None and task.cancelling():
            # A cancellation landing as redis-py's read timeout expires is swallowed by asyncio.timeout on
            # Python 3.11 (fixed in 3.12): without this the supervisor's listener would never stop.
            raise asyncio.CancelledError
        if item is None:
            if not pubsub.node_pubsub_mapping:
                raise ControlError("control channel lost (no shard subscription left)")
            continue
        if item.get("type") == "sunsubscribe":
            raise ControlError("control channel lost (its slot moved to another master)")
        yield item


@dataclass
class _Live:
    relay: Watched
    folded: Any
    cost: Decimal = Decimal(0)


class Supervisor:
    """Watches every live session of this replica and applies control from every replica."""

    def __init__(
        self,
        *,
        store: ControlStore,
        checker: KeyChecker,
        metrics: Metrics,
        replica: str,
        key_recheck_s: float,
        max_sessions: int,
        max_sessions_per_key: int,
        wall: Callable[[], float] = time.time,
        heartbeat_slice: int = HEARTBEAT_SLICE,
    ) -> None:
        self.store = store
        self.heartbeat_slice = heartbeat_slice
        self.checker = checker
        self.metrics = metrics
        self.replica = replica
        self.key_recheck_s = key_recheck_s
        self.max_sessions = max_sessions
        self.max_sessions_per_key = max_sessions_per_key
        self.wall = wall
        self.live: dict[str, _Live] = {}
        self.principals: dict[str, Principal] = {}
        self.draining = False
        #: Set when the drain starts: connections not yet sessions (a GPT-Live client before its session.start)
        #: are refused at once rather than holding the drain up.
        self.drain_started = asyncio.Event()
        self._static: dict[str, Decimal] = {}  # scope -> LiteLLM spend + realtime billed in window
        self._remote: dict[str, Decimal] = {}  # scope -> running cost of this scope's sessions elsewhere
        self._polled = asyncio.Event()
        self._changed = asyncio.Event()  # set whenever a session is detached
        self._release: asyncio.TimerHandle | None = None  # the memory release after a burst, when due
        self._ended_since_release = 0  # sessions ended since the last full collection
        self._released_at = float("-inf")  # loop time of the last full collection
        self.store_up = True  # False from a failed Redis operation until a heartbeat succeeds again
        #: Called for another replica's `reload_models` message (the app reloads its catalog in the background).
        self.on_reload: Callable[[], None] | None = None
        #: The control log read so far (every entry up to it applied or, before this replica started, skipped);
        #: None until the first read, which starts at the log's end.
        self.log_cursor: str | None = None
        self._seen_ahead: dict[str, None] = {}  # ids applied from pub/sub past the cursor (oldest first)

    # ---- admission ------------------------------------------------------------------------------

    async def admit(self, principal: Principal, session_id: str) -> None:
        """Take a concurrency lease and check budgets. Raises ConcurrencyLimit or BudgetExceeded."""
        if self.draining:
            raise ServiceUnavailable("The server is draining; reconnect to another replica.")
        if len(self.live) >= self.max_sessions:
            raise ConcurrencyLimit("This replica holds its maximum of live sessions.")
        if principal.is_master:
            return
        limit = principal.max_parallel_requests or self.max_sessions_per_key
        try:
            if not await self.store.acquire(principal.key_hash, session_id, limit=limit, now=self.wall()):
                raise ConcurrencyLimit(f"The API key already holds its maximum of {limit} live sessions.")
            for scope, max_budget in scopes_of(principal):
                spent = await self._scope_total(principal, scope)
                if spent >= max_budget:
                    await self.store.release(principal.key_hash, session_id)
                    raise BudgetExceeded("The API key's budget is exceeded.")
        except ControlError as exc:
            self._store_failed("admission", exc)

    async def release(self, principal: Principal, session_id: str) -> None:
        """Give back a lease taken by `admit` for a session that never started."""
        if principal.is_master:
            return
        try:
            await self.store.release(principal.key_hash, session_id)
        except ControlError as exc:
            self._store_failed("release", exc)

    async def _scope_total(self, principal: Principal, scope: str) -> Decimal:
        spend = principal.spend if scope.startswith("key:") else principal.team_spend
        billed = await self.store.billed(scope, window_of(principal, scope))
        self._static[scope] = spend + billed
        live = await self.store.live_costs(scope, now=self.wall())
        return spend + billed + sum(live.values(), Decimal(0))

    def _release_memory(self) -> None:
        self._release = None
        if not self.live:
            self._collect()

    def _collect(self) -> None:
        """A full collection and malloc_trim (tuning.release_memory); restarts the churn count."""
        self._ended_since_release = 0
        self._released_at = asyncio.get_running_loop().time()
        tuning.release_memory()

    def attach(self, relay: Watched) -> None:
        """Start watching a session (a relay after the upgrade, a call once the provider answered)."""
        principal = relay.session.principal
        self.principals.setdefault(principal.key_hash, principal)
        self.live[relay.session.session_id] = _Live(relay, self.metrics.new_fold())
        self.metrics.live_sessions.set(len(self.live))

    async def detach(self, relay: Watched) -> None:
        """Stop watching a finished session: release its lease, count its spend in its budget windows."""
        entry = self.live.pop(relay.session.session_id, None)
        self.metrics.live_sessions.set(len(self.live))
        self._changed.set()
        self._ended_since_release += 1
        if not self.live and self._release is None:
            # The last session of a burst: once its objects are gone too, collect and hand freed pages back.
            self._release = asyncio.get_running_loop().call_later(RELEASE_AFTER_S, self._release_memory)
        elif (
            self._ended_since_release >= CHURN_RELEASE_SESSIONS
            and asyncio.get_running_loop().time() - self._released_at >= CHURN_RELEASE_S
        ):
            self._collect()  # steady churn: no burst ends, so collect now and then with sessions live
        principal = relay.session.principal
        model = relay.session.model.name
        # None for a core that meters no audio bytes (GPT-Live) or a session whose audio the sidecar never sees.
        meter = relay.session.meter if relay.meters_audio else None
        figures = relay.figures()  # the final usage event's figures (the core's meter has stopped)
        if entry is not None:
            self.metrics.fold(relay, entry.folded)
            self.metrics.accrue(model, entry.folded, audio_seconds=figures.audio_seconds, cost_usd=figures.cost_usd)
        self.metrics.sessions.labels(relay.close_reason or "unknown", model).inc()
        if meter is not None and meter.reported_over_metered:  # billed at the provider's figure (docs/billing.md)
            self.metrics.reported_over_metered.inc()
            log.warning(
                "the provider reported more audio than was metered; billed the reported seconds",
                extra={"session_id": relay.session.session_id, "model": relay.session.model.name},
            )
        if meter is not None and meter.transcription_unpriced:
            self.metrics.transcription_unpriced.inc(meter.transcription_unpriced)
        if principal.is_master:
            return
        try:
            await self.store.release(principal.key_hash, relay.session.session_id)
            fresh = self.principals.get(principal.key_hash, principal)
            for scope, _ in scopes_of(fresh):
                if figures.cost_usd:
                    await self.store.add_billed(scope, window_of(fresh, scope), figures.cost_usd)
        except ControlError as exc:
            self._store_failed("session_end", exc)
        if not any(e.relay.session.principal.key_hash == principal.key_hash for e in self.live.values()):
            self.principals.pop(principal.key_hash, None)

    # ---- control messages -----------------------------------------------------------------------

    async def revoke(self, **match: str) -> None:
        """Publish a revocation ({key_hash | team_id | user_id}) to every replica."""
        await self.store.publish({"action": "revoke", **match})

    async def terminate(self, session_id: str, *, reason: str = "session_terminated") -> None:
        """Publish a termination of one session to every replica. `reason`: `session_terminated` (an admin)
        or `client_hangup` (a WebRTC call's owner hung it up through the sidecar)."""
        await self.store.publish({"action": "terminate", "session_id": session_id, "reason": reason})

    async def reload_models(self) -> None:
        """Publish a catalog reload to every other replica (this one has just reloaded)."""
        await self.store.publish({"action": "reload_models", "replica": self.replica})

    def receive(self, message: Mapping[str, str]) -> int:
        """Apply a message pushed by pub/sub, unless the control log has given it already (its `log_id` at or
        before the cursor, or applied from pub/sub before); returns how many sessions were ended."""
        log_id = message.get("log_id")
        if log_id is None:  # a replica of an earlier version, which logs nothing
            return self.apply(message)
        if log_id in self._seen_ahead or (
            self.log_cursor is not None and _log_order(log_id) <= _log_order(self.log_cursor)
        ):
            return 0
        self._seen_ahead[log_id] = None
        while len(self._seen_ahead) > SEEN_AHEAD:
            del self._seen_ahead[next(iter(self._seen_ahead))]
        return self.apply(message)

    async def catch_up(self) -> int:
        """Apply what the control log holds past the cursor and pub/sub did not bring (never raises: a failure
        is counted, and the next heartbeat reads again); returns how many sessions were ended.

        A replica's first read only finds the log's end: what was published before it started is not for it
        (it had no session then; a revocation ends sessions, and keeping a key out is LiteLLM's)."""
        ended = 0
        try:
            while True:
                start = self.log_cursor
                cursor, entries = await self.store.read_log(start)
                if start != self.log_cursor:  # another catch-up moved the cursor meanwhile: read from there
                    continue
                for log_id, message in entries:
                    if log_id in self._seen_ahead:  # pushed and applied already
                        del self._seen_ahead[log_id]
                        continue
                    ended += self.apply(message)
                self.log_cursor = cursor
                order = _log_order(cursor)
                for log_id in [i for i in self._seen_ahead if _log_order(i) <= order]:
                    del self._seen_ahead[log_id]
                if start is None or cursor == start:  # nothing past the cursor: one XREAD when nothing is new
                    return ended
        except ControlError as exc:
            self._store_failed("control_log", exc)
            return ended

    def apply(self, message: Mapping[str, str]) -> int:
        """Apply one control message to this replica's sessions; returns how many were ended."""
        action = message.get("action")
        if action == "reload_models":
            if message.get("replica") != self.replica and self.on_reload is not None:
                self.on_reload()
            return 0
        if action == "terminate":
            entry = self.live.get(message.get("session_id", ""))
            if entry is None or entry.relay.ended:  # a message repeated after a 503 ends nothing twice
                return 0
            reason = message.get("reason", "session_terminated")
            reason = reason if reason in TERMINATIONS else "session_terminated"
            entry.relay.end(reason)
            self.metrics.revocations.labels(reason).inc()
            return 1
        if action != "revoke":
            return 0
        ended = 0
        for entry in list(self.live.values()):
            p = entry.relay.session.principal
            if not entry.relay.ended and any(
                message.get(f) and message.get(f) == getattr(p, f) for f in ("key_hash", "team_id", "user_id")
            ):
                entry.relay.end("key_revoked")
                ended += 1
        if message.get("key_hash"):
            self.checker.forget(message["key_hash"])
        self.metrics.revocations.labels("key_revoked").inc(ended)
        return ended

    # ---- the loops --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll, heartbeat, re-check and listen until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._poll_loop())
            group.create_task(self._listen_loop())
            group.create_task(self._periodic(HEARTBEAT_S, self.beat, "heartbeat"))
            group.create_task(self._periodic(self.key_recheck_s, self.recheck, "recheck"))

    async def next_poll(self) -> None:
        """Wait until the next poll cycle has run (tests use it instead of sleeping)."""
        self._polled.clear()
        await self._polled.wait()

    async def _poll_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(POLL_S)
            self.poll(loop.time())

    def poll(self, now: float) -> None:
        """Limits, checkpoints and in-flight budgets for every local session."""
        by_scope: dict[str, list[_Live]] = defaultdict(list)
        for entry in self.live.values():
            relay = entry.relay
            checkpoint = relay.poll(now)
            if checkpoint is not None:  # audio and cost accrue per checkpoint (never per frame)
                self.metrics.accrue(
                    relay.session.model.name,
                    entry.folded,
                    audio_seconds=checkpoint.audio_seconds,
                    cost_usd=checkpoint.cost_usd,
                )
            p = self.principals.get(relay.session.principal.key_hash, relay.session.principal)
            scopes = scopes_of(p) if not p.is_master else []
            if scopes:
                entry.cost = relay.cost()
                for scope, _ in scopes:
                    by_scope[scope].append(entry)
        for scope, entries in by_scope.items():
            self._enforce(scope, entries)
        self._polled.set()

    def _enforce(self, scope: str, entries: list[_Live]) -> None:
        principal = self.principals.get(entries[0].relay.session.principal.key_hash)
        if principal is None:
            return
        max_budget = dict(scopes_of(principal)).get(scope)
        if max_budget is None:
            return
        total = self._static.get(scope, Decimal(0)) + self._remote.get(scope, Decimal(0))
        total += sum((e.cost for e in entries), Decimal(0))
        if total >= max_budget:
            for entry in entries:
                if not entry.relay.ended:
                    entry.relay.end("budget_exceeded")
                    self.metrics.revocations.labels("budget_exceeded").inc()

    async def _listen_loop(self) -> None:
        while True:
            try:
                async for message in self.store.messages():
                    if message is SUBSCRIBED:  # what was published while not subscribed
                        await self.catch_up()
                    else:
                        self.receive(message)
            except ControlError as exc:
                self._store_failed("control_channel", exc)
            except REDIS_ERRORS as exc:
                self._store_failed("control_channel", ControlError(f"control channel lost ({type(exc).__name__})"))
            _still_cancelled()
            await asyncio.sleep(HEARTBEAT_S)

    async def _periodic(self, period: float, step: Callable[[], Any], operation: str) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await step()
            except ControlError as exc:
                self._store_failed(operation, exc)
            _still_cancelled()

    # ---- the shared store's health ------------------------------------------------------------------

    def _store_failed(self, operation: str, exc: ControlError) -> None:
        """Count a failed Redis operation; the first of an outage is logged (a warning), the rest only counted.

        Admission is fail-open, so an outage does not fail readiness: it shows in `sidecar_redis_up`,
        `sidecar_redis_errors_total` and this one line."""
        self.metrics.redis_errors.labels(operation).inc()
        if self.store_up:
            self.store_up = False
            self.metrics.redis_up.set(0)
            log.warning(
                "Redis unreachable: admitting without cross-replica limits, spooling usage until it is back",
                extra={"reason": str(exc)},
            )

    async def beat(self) -> None:
        """Each second: refresh the gauges, heartbeat, find out whether Redis answers, and read the control log
        past the cursor (never raises)."""
        self.metrics.refresh()
        try:
            await self.heartbeat()
            if not await self.store.ping():  # without sessions the heartbeat writes nothing: ask
                raise ControlError("control store unreachable (no answer to PING)")
        except ControlError as exc:
            self._store_failed("heartbeat", exc)
            return
        if not self.store_up:
            self.store_up = True
            self.metrics.redis_up.set(1)
            log.info("Redis reachable again")
        await self.catch_up()  # one XREAD: control messages a lost subscription missed

    def _info(self, session_id: str, relay: Watched) -> SessionInfo:
        figures = relay.figures()
        p = relay.session.principal
        return SessionInfo(
            session_id=session_id,
            replica=self.replica,
            key_hash=p.key_hash,
            key_alias=p.key_alias,
            user_id=p.user_id,
            team_id=p.team_id,
            model=relay.session.model.name,
            started_at=relay.session.started_at.isoformat(),
            audio_seconds=str(figures.audio_seconds),
            cost_usd=str(figures.cost_usd),
        )

    async def register(self, relay: Watched) -> None:
        """Put a new session in the shared registry at once (not only at the next heartbeat)."""
        try:
            await self.store.heartbeat([self._info(relay.session.session_id, relay)], {}, now=self.wall())
        except ControlError as exc:
            self._store_failed("registration", exc)

    async def heartbeat(self) -> None:
        """Publish this replica's sessions and running costs; read other replicas' costs per budget scope."""
        now = self.wall()
        scopes: set[str] = set()
        entries = list(self.live.items())
        for start in range(0, len(entries), self.heartbeat_slice):
            infos: list[SessionInfo] = []
            costs: dict[str, dict[str, Decimal]] = defaultdict(dict)
            for sid, entry in entries[start : start + self.heartbeat_slice]:
                if sid not in self.live:  # ended while an earlier slice was being written
                    continue
                relay = entry.relay
                self.metrics.fold(relay, entry.folded)
                info = self._info(sid, relay)
                infos.append(info)
                p = relay.session.principal
                for scope, _ in scopes_of(self.principals.get(p.key_hash, p)) if not p.is_master else []:
                    costs[scope][sid] = Decimal(info.cost_usd)
            await self.store.heartbeat(infos, costs, now=now)
            scopes.update(costs)
            await asyncio.sleep(0)  # frames go through between slices (MemoryStore.heartbeat never yields)
        for scope in scopes:
            remote = await self.store.live_costs(scope, now=now)
            self._remote[scope] = sum((c for sid, c in remote.items() if sid not in self.live), Decimal(0))

    async def recheck(self) -> None:
        """Re-check each live key once against LiteLLM; end the sessions of keys that lost access.

        The keys are asked together, through the checker's re-check lane (its own connections and its own
        bound on concurrent requests: connects with bad keys cannot hold re-checks back)."""
        now = datetime.now(UTC)
        models: dict[str, str] = {}  # key hash -> the model of one of its sessions
        for entry in self.live.values():
            session = entry.relay.session
            if not session.principal.is_master:
                models.setdefault(session.principal.key_hash, session.model.name)
        answers = await asyncio.gather(*(self.checker.recheck(h) for h in models), return_exceptions=True)
        unanswered: list[str] = []
        for (key_hash, model), answer in zip(models.items(), answers, strict=True):
            try:
                if isinstance(answer, BaseException):
                    raise answer
                authorize(answer, model, now=now)
            except KeyCheckError as exc:
                self.metrics.key_check_failures.inc()
                unanswered.append(str(exc))
                continue
            except (InvalidApiKey, KeyBlocked, ModelNotAllowed):
                self._end_key(key_hash, "key_revoked")
                continue
            except BudgetExceeded:
                self._end_key(key_hash, "budget_exceeded")
                continue
            self.principals[key_hash] = answer
            for scope, _ in scopes_of(answer):
                billed = await self.store.billed(scope, window_of(answer, scope))
                spend = answer.spend if scope.startswith("key:") else answer.team_spend
                self._static[scope] = spend + billed
        if unanswered:  # sessions are kept; one line per cycle, not one per key
            log.warning(
                "re-check: %d of %d keys unanswered; their sessions go on",
                len(unanswered),
                len(models),
                extra={"reason": unanswered[0]},
            )

    def _end_key(self, key_hash: str, code: str) -> None:
        for entry in self.live.values():
            if entry.relay.session.principal.key_hash == key_hash and not entry.relay.ended:
                entry.relay.end(code)
                self.metrics.revocations.labels(code).inc()

    # ---- drain ------------------------------------------------------------------------------------

    async def drain(self, grace_s: float) -> None:
        """Refuse new sessions, give live ones `grace_s` to finish, then end them (1001) and wait for them."""
        self.draining = True
        self.drain_started.set()
        self.metrics.draining.set(1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.live and loop.time() < deadline:
            await self._next_change(deadline - loop.time())
        for entry in list(self.live.values()):
            entry.relay.end("server_shutdown")
        await self.live_empty()

    async def live_empty(self) -> None:
        """Wait until no session is live on this replica (each one billed and detached)."""
        while self.live:
            await self._next_change(None)

    async def _next_change(self, timeout_s: float | None) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._changed.wait()


def matching(infos: Iterable[SessionInfo], **match: str) -> list[SessionInfo]:
    """The sessions whose fields equal every given value."""
    return [i for i in infos if all(getattr(i, k) == v for k, v in match.items())]
