"""Keys -> principals: who is calling, and may they open this model (docs/api.md, "The WebSocket session").

The raw key is hashed at once (sha256 hex, LiteLLM's own token hash) and only the hash travels further.
LiteLLM is asked with `GET /key/info?key=<hash>` (and `GET /team/info?team_id=...` for the team), with the
master key when the config has one, else with the caller's own key. Answers are cached briefly.
`authorize` applies LiteLLM's semantics (blocked, expired, allowed models, max budget) purely.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, Literal

import httpx

from sidecar.errors import (
    BudgetExceeded,
    InvalidApiKey,
    KeyBlocked,
    KeyCheckError,
    ModelNotAllowed,
)

log = logging.getLogger("sidecar.auth")

SUBPROTOCOL: Final = "realtime"
KEY_SUBPROTOCOL_PREFIX: Final = "openai-insecure-api-key."
ALL_MODELS: Final = frozenset({"all-proxy-models", "*"})


def hash_key(key: str) -> str:
    """sha256 hex of the raw key: the only form of a key that is logged, stored or sent on."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the client presented: the raw key and, for the browser form, the subprotocol to select."""

    key: str
    subprotocol: str | None = None


def credentials(headers: Mapping[str, str], subprotocols: Iterable[str]) -> Credentials | None:
    """The key from `Authorization: Bearer`, `api-key`, or the browser subprotocol form, in that order."""
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return Credentials(token.strip(), _selected(subprotocols))
    api_key = headers.get("api-key", "").strip()
    if api_key:
        return Credentials(api_key, _selected(subprotocols))
    offered = list(subprotocols)
    for proto in offered:
        if proto.startswith(KEY_SUBPROTOCOL_PREFIX) and len(proto) > len(KEY_SUBPROTOCOL_PREFIX):
            return Credentials(proto[len(KEY_SUBPROTOCOL_PREFIX) :], _selected(offered))
    return None


def _selected(subprotocols: Iterable[str]) -> str | None:
    return SUBPROTOCOL if SUBPROTOCOL in subprotocols else None


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller, as LiteLLM describes its key (and team)."""

    key_hash: str
    key_alias: str = ""
    user_id: str = ""
    team_id: str = ""
    models: tuple[str, ...] = ()
    team_models: tuple[str, ...] = ()
    max_budget: Decimal | None = None
    spend: Decimal = Decimal(0)
    team_max_budget: Decimal | None = None
    team_spend: Decimal = Decimal(0)
    max_parallel_requests: int | None = None
    blocked: bool = False
    team_blocked: bool = False
    expires: datetime | None = None
    status: str = "active"
    budget_reset_at: str = ""
    team_budget_reset_at: str = ""
    is_master: bool = False


def authorize(principal: Principal, model: str, *, now: datetime) -> None:
    """Refuse per LiteLLM's semantics. Raises InvalidApiKey, KeyBlocked, ModelNotAllowed, BudgetExceeded."""
    if principal.is_master:
        return
    if principal.status in ("deleted",):
        raise InvalidApiKey("The API key was deleted.")
    if principal.status == "expired" or (principal.expires is not None and principal.expires <= now):
        raise InvalidApiKey("The API key has expired.")
    if principal.blocked or principal.status == "revoked":
        raise KeyBlocked("The API key is blocked.")
    if principal.team_blocked:
        raise KeyBlocked("The API key's team is blocked.")
    if not _allowed(principal, model):
        raise ModelNotAllowed(f"The API key is not allowed to access model {model}.")
    if principal.max_budget is not None and principal.spend >= principal.max_budget:
        raise BudgetExceeded("The API key's budget is exceeded.")
    if principal.team_max_budget is not None and principal.team_spend >= principal.team_max_budget:
        raise BudgetExceeded("The API key's team budget is exceeded.")


def may_use(principal: Principal, model: str) -> bool:
    """True when the key may use `model` by its allowed models (LiteLLM semantics; the master key may)."""
    return principal.is_master or _allowed(principal, model)


def _allowed(principal: Principal, model: str) -> bool:
    models = set(principal.models)
    if "all-team-models" in models:
        models.discard("all-team-models")
        models.update(principal.team_models or ("*",))
    if not models and principal.team_models:
        models = set(principal.team_models)
    return not models or bool(models & ALL_MODELS) or model in models


def _decimal(value: Any) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value))
    except ArithmeticError:
        return None


def _moment(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def principal_from_key_info(key_hash: str, info: Mapping[str, Any]) -> Principal:
    """Map LiteLLM's `/key/info` `info` object to a Principal."""
    parallel = info.get("max_parallel_requests")
    return Principal(
        key_hash=key_hash,
        key_alias=str(info.get("key_alias") or ""),
        user_id=str(info.get("user_id") or ""),
        team_id=str(info.get("team_id") or ""),
        models=tuple(str(m) for m in info.get("models") or ()),
        max_budget=_decimal(info.get("max_budget")),
        spend=_decimal(info.get("spend")) or Decimal(0),
        max_parallel_requests=parallel if isinstance(parallel, int) and parallel > 0 else None,
        blocked=bool(info.get("blocked")),
        expires=_moment(info.get("expires")),
        status=str(info.get("status") or "active"),
        budget_reset_at=str(info.get("budget_reset_at") or ""),
    )


def with_team_info(principal: Principal, info: Mapping[str, Any]) -> Principal:
    """Add LiteLLM's `/team/info` `team_info` object to a Principal."""
    return replace(
        principal,
        team_models=tuple(str(m) for m in info.get("models") or ()),
        team_max_budget=_decimal(info.get("max_budget")),
        team_spend=_decimal(info.get("spend")) or Decimal(0),
        team_blocked=bool(info.get("blocked")),
        team_budget_reset_at=str(info.get("budget_reset_at") or ""),
    )


#: Unknown key hashes remembered at most; past it the oldest is forgotten first, so a flood of random keys
#: cannot grow the negative cache without bound (about 2 MB at the cap).
NEGATIVE_CACHE_MAX: Final = 10_000
#: Transport failures that mean LiteLLM closed a pooled keep-alive connection as the request went out on it.
#: A lookup is a GET, so it is sent once more (on a new connection) before the lookup fails.
RETRIED: Final = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
#: Idle connections to LiteLLM are dropped after this long: before LiteLLM's own keep-alive timeout (uvicorn's
#: default is 5 s, the same as httpx's) closes them, so a lookup seldom goes out on a connection being closed.
LITELLM_KEEPALIVE_S: Final = 2.0
LITELLM_TIMEOUT_S: Final = 5.0


def litellm_client(url: str, connections: int) -> httpx.AsyncClient:
    """A client of LiteLLM's admin API with a connection pool of its own, of `connections` at most."""
    limits = httpx.Limits(
        max_connections=connections, max_keepalive_connections=connections, keepalive_expiry=LITELLM_KEEPALIVE_S
    )
    return httpx.AsyncClient(base_url=url, timeout=LITELLM_TIMEOUT_S, limits=limits)


class _Slots:
    """A semaphore with two queues: a waiter marked `first` (a key LiteLLM knew before) is let in before
    every other waiter (keys never seen, e.g. a flood of made-up ones)."""

    def __init__(self, count: int) -> None:
        self._free = count
        self._first: deque[asyncio.Future[None]] = deque()
        self._rest: deque[asyncio.Future[None]] = deque()

    @contextlib.asynccontextmanager
    async def held(self, *, first: bool) -> AsyncIterator[None]:
        """Hold a slot for the block (waiting for one first, in its queue)."""
        if self._free > 0 and not self._first and not self._rest:
            self._free -= 1
        else:
            turn = asyncio.get_running_loop().create_future()
            (self._first if first else self._rest).append(turn)
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():  # handed a slot as it was cancelled: pass it on
                    self._release()
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        for queue in (self._first, self._rest):
            while queue:
                turn = queue.popleft()
                if not turn.done():  # a cancelled waiter's turn is skipped
                    turn.set_result(None)
                    return
        self._free += 1


class _Lane:
    """One way to LiteLLM: a client (its connection pool), a bound on concurrent requests, a bound on the
    lookups in flight or waiting for a request (None: unbounded), and those lookups by key hash."""

    def __init__(self, name: str, client: httpx.AsyncClient | None, *, concurrency: int, backlog: int | None):
        self.name = name
        self.client = client
        self.slots = _Slots(concurrency)
        self.limit = None if backlog is None else concurrency + backlog
        self.flights: dict[str, asyncio.Task[Principal]] = {}


class KeyChecker:
    """Looks keys up in the LiteLLM proxy. The master key always authenticates.

    Known keys are cached for `cache_s`, unknown key hashes for `negative_cache_s`. Concurrent lookups of one
    key share one request (single flight). Admission lookups (`principal`, `lookup`) and live-session
    re-checks (`recheck`) go through separate lanes: each its own client (pass `recheck_client` for a
    separate connection pool) and its own bound on concurrent requests, so a flood of connects with bad keys
    cannot starve re-checks, nor re-checks connects. At most `lookups + lookup_backlog` distinct admission
    lookups are in flight or waiting; past that a lookup of a key never seen fails at once (KeyCheckError)
    instead of waiting behind the flood; a key LiteLLM knew before is never refused so, and waits ahead of
    every key never seen.
    """

    def __init__(
        self,
        *,
        master_key: str | None,
        client: httpx.AsyncClient | None,
        recheck_client: httpx.AsyncClient | None = None,
        cache_s: float = 5.0,
        negative_cache_s: float = 5.0,
        lookups: int = 32,
        lookup_backlog: int = 256,
        rechecks: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._master_key = master_key
        self._master_hash = hash_key(master_key) if master_key else None
        self._cache_s = cache_s
        self._negative_cache_s = negative_cache_s
        self._clock = clock
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._negative: dict[str, float] = {}  # key hash -> when LiteLLM's "unknown" stops being trusted
        self._admission = _Lane("admission", client, concurrency=lookups, backlog=lookup_backlog)
        self._rechecks = _Lane("re-check", recheck_client or client, concurrency=rechecks, backlog=None)

    def is_master(self, key: str) -> bool:
        """True for the config's master key (constant-time comparison)."""
        return self._master_key is not None and hmac.compare_digest(key, self._master_key)

    async def principal(self, key: str) -> Principal:
        """The principal for a raw key. Raises InvalidApiKey (unknown) or KeyCheckError (LiteLLM unreachable)."""
        if self.is_master(key):
            return Principal(key_hash=hash_key(key), key_alias="master", is_master=True)
        return await self.lookup(hash_key(key), raw_key=key)

    async def lookup(self, key_hash: str, *, raw_key: str | None = None, fresh: bool = False) -> Principal:
        """The principal for a key hash, at admission (fresh=True skips the cache of known keys). Raises
        InvalidApiKey (unknown, remembered for negative_cache_s) or KeyCheckError (LiteLLM unreachable or
        answering 5xx, or too many admission lookups waiting)."""
        if key_hash == self._master_hash:
            return Principal(key_hash=key_hash, key_alias="master", is_master=True)
        cached = None if fresh else self._cache.get(key_hash)
        if cached is not None and self._clock() - cached[0] < self._cache_s:
            return cached[1]
        return await self._ask(self._admission, key_hash, raw_key)

    async def recheck(self, key_hash: str) -> Principal:
        """A fresh answer for a live session's key, through the re-check lane. Raises InvalidApiKey or
        KeyCheckError."""
        if key_hash == self._master_hash:
            return Principal(key_hash=key_hash, key_alias="master", is_master=True)
        return await self._ask(self._rechecks, key_hash, None)

    def forget(self, key_hash: str) -> None:
        """Drop a cached answer (known or unknown)."""
        self._cache.pop(key_hash, None)
        self._negative.pop(key_hash, None)

    async def aclose(self) -> None:
        """Cancel the lookups still in flight (the lifespan calls it before closing the clients)."""
        flights = [f for lane in (self._admission, self._rechecks) for f in lane.flights.values()]
        for flight in flights:
            flight.cancel()
        await asyncio.gather(*flights, return_exceptions=True)

    async def _ask(self, lane: _Lane, key_hash: str, raw_key: str | None) -> Principal:
        if self._unknown(key_hash) or lane.client is None:
            raise InvalidApiKey("Incorrect API key provided.")
        if self._master_key is None and raw_key is None:  # LiteLLM answers by hash only to its master key;
            raise InvalidApiKey("Incorrect API key provided.")  # not remembered: the key may well be valid
        flight = lane.flights.get(key_hash)
        if flight is None:
            # A key LiteLLM has known before (its cache entry expired) still queues: only keys never seen are
            # refused at once, so a flood of made-up keys does not turn returning users away.
            if lane.limit is not None and len(lane.flights) >= lane.limit and key_hash not in self._cache:
                raise KeyCheckError(f"{len(lane.flights)} {lane.name} lookups already in flight or waiting")
            flight = asyncio.create_task(self._fly(lane, lane.client, key_hash, raw_key))
            lane.flights[key_hash] = flight
            flight.add_done_callback(lambda done: _landed(lane, key_hash, done))
        # Shielded: a caller that gives up (its client went away) does not cancel the others' answer.
        return await asyncio.shield(flight)

    async def _fly(self, lane: _Lane, client: httpx.AsyncClient, key_hash: str, raw_key: str | None) -> Principal:
        asked = self._clock()
        async with lane.slots.held(first=key_hash in self._cache):
            try:
                principal = await self._fetch(client, key_hash, raw_key)
            except InvalidApiKey:
                self._remember_unknown(key_hash, asked)
                raise
        self._negative.pop(key_hash, None)
        self._cache[key_hash] = (asked, principal)
        return principal

    def _unknown(self, key_hash: str) -> bool:
        until = self._negative.get(key_hash)
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._negative[key_hash]
        return False

    def _remember_unknown(self, key_hash: str, asked: float) -> None:
        self._cache.pop(key_hash, None)  # a key LiteLLM no longer knows is not served from the cache either
        self._negative.pop(key_hash, None)
        while len(self._negative) >= NEGATIVE_CACHE_MAX:  # insertion order is expiry order (one TTL)
            del self._negative[next(iter(self._negative))]
        self._negative[key_hash] = asked + self._negative_cache_s

    async def _fetch(self, client: httpx.AsyncClient, key_hash: str, raw_key: str | None) -> Principal:
        auth = self._master_key or raw_key
        assert auth is not None  # _ask refuses a lookup by hash without the master key
        info = await _get(client, "/key/info", {"key": key_hash}, auth)
        if info is None:
            raise InvalidApiKey("Incorrect API key provided.")
        principal = principal_from_key_info(key_hash, info.get("info") or {})
        if principal.team_id and self._master_key:
            team = await _get(client, "/team/info", {"team_id": principal.team_id}, self._master_key)
            if team is not None:
                principal = with_team_info(principal, team.get("team_info") or {})
        return principal


def _landed(lane: _Lane, key_hash: str, flight: asyncio.Task[Principal]) -> None:
    if lane.flights.get(key_hash) is flight:
        del lane.flights[key_hash]
    if not flight.cancelled():
        flight.exception()  # retrieved here: every caller may have gone away


async def _get(client: httpx.AsyncClient, path: str, params: dict[str, str], auth: str) -> dict[str, Any] | None:
    """LiteLLM's JSON answer; None for 400/401/403/404. Raises KeyCheckError naming the cause."""
    headers = {"Authorization": f"Bearer {auth}"}
    try:
        try:
            response = await client.get(path, params=params, headers=headers)
        except RETRIED:  # a pooled connection LiteLLM had closed: once more, on another connection
            response = await client.get(path, params=params, headers=headers)
    except httpx.HTTPError as exc:
        raise KeyCheckError(f"LiteLLM proxy unreachable for {path} ({type(exc).__name__})") from exc
    if response.status_code in (400, 401, 403, 404):
        return None
    if response.status_code >= 300:
        raise KeyCheckError(f"LiteLLM proxy answered {response.status_code} for {path}")
    try:
        body = response.json()
    except ValueError as exc:
        raise KeyCheckError(f"LiteLLM proxy sent no JSON for {path}") from exc
    return body if isinstance(body, dict) else None


Verdict = Literal["accepted", "rejected", "unreachable"]
#: The master-key check retries this often at first, doubling up to the cap (a rejected key included: a
#: LiteLLM given the right key, or a sidecar's config fixed and reloaded on LiteLLM's side, is noticed).
MASTER_CHECK_BACKOFF_S: Final = 1.0
MASTER_CHECK_BACKOFF_MAX_S: Final = 60.0


async def ask_master_key(client: httpx.AsyncClient, master_key: str) -> tuple[Verdict, str]:
    """Whether LiteLLM accepts `master_key`, and why not: it is asked `/key/info` about the master key's own
    hash, with that key. LiteLLM authenticates the caller before anything else: 401/403 means it rejects the
    key; 502/503/504 (a proxy in front) or no answer means it cannot be asked; any other answer (404 for a key
    it does not store, 500 without a database) means the key got past its auth."""
    try:
        response = await client.get(
            "/key/info", params={"key": hash_key(master_key)}, headers={"Authorization": f"Bearer {master_key}"}
        )
    except httpx.HTTPError as exc:
        return "unreachable", type(exc).__name__
    if response.status_code in (401, 403):
        return "rejected", f"it answered {response.status_code}"
    if response.status_code in (502, 503, 504):
        return "unreachable", f"it answered {response.status_code}"
    return "accepted", ""


class MasterKeyCheck:
    """Checks at start that LiteLLM accepts the sidecar's master key (with which every virtual key is looked up).

    `run` asks until LiteLLM accepts it. Rejected: one ERROR line, `rejected` is True (readiness fails: every
    client would get 401 and nothing else would say why), and it keeps asking, so a fixed LiteLLM recovers.
    Unreachable: a warning per attempt, with a back-off doubling up to `max_backoff_s`; readiness is not
    failed for it (as for a Redis outage: admission fails open, and taking every replica out of the load
    balancer would not bring LiteLLM back). `checked` is set at the first answer of either kind.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        master_key: str,
        *,
        url: str = "",
        backoff_s: float = MASTER_CHECK_BACKOFF_S,
        max_backoff_s: float = MASTER_CHECK_BACKOFF_MAX_S,
    ) -> None:
        self._client = client
        self._master_key = master_key
        self._url = url or str(client.base_url)
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self.rejected = False
        self.checked = asyncio.Event()
        self.verdicts = 0  # answers so far (tests wait on `changed` for the next one)
        self.changed = asyncio.Event()

    async def run(self) -> None:
        """Ask until LiteLLM accepts the master key (module docstring); never raises but CancelledError."""
        backoff = self._backoff_s
        while True:
            verdict, why = await ask_master_key(self._client, self._master_key)
            if verdict == "accepted":
                if self.rejected:
                    log.info("LiteLLM at %s now accepts the master key: ready", self._url)
                self.rejected = False
                self._answered()
                return
            if verdict == "rejected" and not self.rejected:
                log.error(
                    "LiteLLM at %s rejects the master key (%s): every virtual key will be refused 401 until "
                    "general_settings.master_key (or LITELLM_MASTER_KEY) is the proxy's own; /readyz fails",
                    self._url,
                    why,
                )
            elif verdict == "unreachable":
                log.warning(
                    "LiteLLM at %s unreachable for the master-key check (%s); retrying in %gs", self._url, why, backoff
                )
            self.rejected = verdict == "rejected"
            self._answered()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff_s)

    def _answered(self) -> None:
        self.verdicts += 1
        self.checked.set()
        self.changed.set()
        self.changed = asyncio.Event()
