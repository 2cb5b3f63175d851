"""Calls whose replica died: found through the shared registry and hung up by another replica.

    Calls (tasks.py)  --put(record) after registering the session, drop(record) once the call is billed-->  Redis
    every replica, every SWEEP_S: records whose session is no longer in the live registry (its replica's
    heartbeat lapsed, control.LEASE_TTL_S) --claim (one replica wins)--> provider hangup

A record names the call's route, public model, deployment (by its catalog identity: never its key) and the
provider's call id, so that any replica can hang it up with its own copy of the deployment's credential. What a
dead replica leaves unbilled is its calls' usage after their last checkpoint: the consumer closes those records
as `lost` (docs/api.md, "WebRTC calls"); the hangup bounds how long the provider runs (and bills) a call nobody
watches: the registry's expiry plus one sweep.

Ordering keeps live calls safe: a record is written only after its session is in the registry, and dropped before
the session leaves it; a sweep reads the records before the registry, and hangs a call up only after deleting its
record (HDEL: the replica whose delete removed it is the only one to act).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Final, Protocol

import orjson
import redis.asyncio as aioredis

from sidecar.calls.call import ProviderCall
from sidecar.catalog import ROUTES, Catalog, Deployment
from sidecar.control import ControlError, ControlStore
from sidecar.redis_conn import REDIS_ERRORS

log = logging.getLogger("sidecar.calls")

#: How often each replica looks for calls whose replica died.
SWEEP_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One watched call in the shared store. No credential: the deployment by its catalog identity."""

    session_id: str
    replica: str
    route: str
    model: str
    call_id: str
    provider: str
    deployment_model: str
    api_base: str | None
    deployment_id: str

    @classmethod
    def of(cls, session_id: str, replica: str, model: str, call: ProviderCall) -> CallRecord:
        d = call.deployment
        return cls(
            session_id, replica, call.route, model, call.call_id, d.provider, d.model, d.api_base, d.deployment_id
        )

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> CallRecord | None:
        """The record, or None for a malformed one (never raises)."""
        try:
            return cls(**orjson.loads(raw))
        except (orjson.JSONDecodeError, TypeError):
            return None

    def provider_call(self, catalog: Catalog) -> ProviderCall | None:
        """The call with this replica's copy of its deployment, or None when the catalog no longer has it."""
        route = next((r for r in ROUTES if r == self.route), None)
        model = catalog.served(route).get(self.model) if route is not None else None
        found = next((d for d in model.deployments if self._is(d)), None) if model is not None else None
        if route is None or found is None:
            return None
        return ProviderCall(route=route, deployment=found, call_id=self.call_id)

    def _is(self, deployment: Deployment) -> bool:
        if self.deployment_id:
            return deployment.deployment_id == self.deployment_id
        same = (deployment.provider, deployment.model, deployment.api_base)
        return same == (self.provider, self.deployment_model, self.api_base)


class CallRecords(Protocol):
    """Where the watched calls of every replica are recorded."""

    async def put(self, record: CallRecord) -> None: ...
    async def drop(self, session_id: str) -> None: ...
    async def all(self) -> list[CallRecord]: ...
    async def get(self, session_id: str) -> CallRecord | None: ...
    async def claim(self, session_id: str) -> bool: ...


class MemoryCallRecords:
    """One process (embedded mode): no other replica can die under it; kept so that the code path is one."""

    def __init__(self) -> None:
        self._records: dict[str, CallRecord] = {}

    async def put(self, record: CallRecord) -> None:
        self._records[record.session_id] = record

    async def drop(self, session_id: str) -> None:
        self._records.pop(session_id, None)

    async def all(self) -> list[CallRecord]:
        return list(self._records.values())

    async def get(self, session_id: str) -> CallRecord | None:
        return self._records.get(session_id)

    async def claim(self, session_id: str) -> bool:
        return self._records.pop(session_id, None) is not None


class RedisCallRecords:
    """The records in one Redis hash, `<prefix>:calls` (session id -> JSON). Raises ControlError."""

    def __init__(self, redis: aioredis.Redis, *, prefix: str = "realtime") -> None:
        self._redis = redis
        self._key = f"{prefix}:calls"

    async def _call(self, coro: Awaitable[object]) -> object:
        try:
            return await coro
        except REDIS_ERRORS as exc:
            raise ControlError(f"control store unreachable ({type(exc).__name__})") from exc

    async def put(self, record: CallRecord) -> None:
        await self._call(self._redis.hset(self._key, record.session_id, record.to_json()))

    async def drop(self, session_id: str) -> None:
        await self._call(self._redis.hdel(self._key, session_id))

    async def all(self) -> list[CallRecord]:
        raw = await self._call(self._redis.hgetall(self._key))
        assert isinstance(raw, dict)
        return [record for value in raw.values() if (record := CallRecord.from_json(value)) is not None]

    async def get(self, session_id: str) -> CallRecord | None:
        raw = await self._call(self._redis.hget(self._key, session_id))
        return CallRecord.from_json(raw) if isinstance(raw, bytes | str) else None

    async def claim(self, session_id: str) -> bool:
        return bool(await self._call(self._redis.hdel(self._key, session_id)))


async def sweep(
    records: CallRecords,
    store: ControlStore,
    catalog: Catalog,
    hangup: Callable[[ProviderCall], Awaitable[None]],
    *,
    watching: Sequence[str] | set[str],
    now: float,
) -> list[str]:
    """Hang up every recorded call whose session is in no replica's registry any more (its replica died) and
    that this replica is not watching; returns their session ids. Raises ControlError (Redis)."""
    recorded = await records.all()  # before the registry: see the module docstring
    if not recorded:
        return []
    live = {info.session_id for info in await store.sessions(now=now)}
    orphans = [r for r in recorded if r.session_id not in live and r.session_id not in watching]
    hung_up: list[str] = []
    for record in orphans:
        if not await records.claim(record.session_id):
            continue  # billed meanwhile, or another replica took it
        call = record.provider_call(catalog)
        extra = {"session_id": record.session_id, "reason": record.replica}
        if call is None:
            log.warning("a dead replica's call names a deployment no longer served: not hung up", extra=extra)
            continue
        log.warning("hanging up a call whose replica stopped (its heartbeat lapsed)", extra=extra)
        with contextlib.suppress(Exception):  # the provider may have ended it already
            await hangup(call)
        hung_up.append(record.session_id)
    return hung_up
