"""Keys -> principals: who is calling, and may they open this model (CONTRACT.md, "Auth").

The raw key is hashed at once (sha256 hex, LiteLLM's own token hash) and only the hash travels further.
LiteLLM is asked with `GET /key/info?key=<hash>` (and `GET /team/info?team_id=...` for the team), with the
master key when the config has one, else with the caller's own key. Answers are cached briefly.
`authorize` applies LiteLLM's semantics (blocked, expired, allowed models, max budget) purely.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

import httpx

from sidecar.errors import (
    BudgetExceeded,
    InvalidApiKey,
    KeyBlocked,
    KeyCheckError,
    ModelNotAllowed,
)

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


class KeyChecker:
    """Looks keys up in the LiteLLM proxy, with a short cache. The master key always authenticates."""

    def __init__(
        self,
        *,
        master_key: str | None,
        client: httpx.AsyncClient | None,
        cache_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._master_key = master_key
        self._master_hash = hash_key(master_key) if master_key else None
        self._client = client
        self._cache_s = cache_s
        self._clock = clock
        self._cache: dict[str, tuple[float, Principal]] = {}

    def is_master(self, key: str) -> bool:
        """True for the config's master key (constant-time comparison)."""
        return self._master_key is not None and hmac.compare_digest(key, self._master_key)

    async def principal(self, key: str) -> Principal:
        """The principal for a raw key. Raises InvalidApiKey (unknown) or KeyCheckError (LiteLLM unreachable)."""
        if self.is_master(key):
            return Principal(key_hash=hash_key(key), key_alias="master", is_master=True)
        return await self.lookup(hash_key(key), raw_key=key)

    async def lookup(self, key_hash: str, *, raw_key: str | None = None, fresh: bool = False) -> Principal:
        """The principal for a key hash (re-checks pass fresh=True). Raises InvalidApiKey or KeyCheckError."""
        if key_hash == self._master_hash:
            return Principal(key_hash=key_hash, key_alias="master", is_master=True)
        now = self._clock()
        cached = self._cache.get(key_hash)
        if cached is not None and not fresh and now - cached[0] < self._cache_s:
            return cached[1]
        if self._client is None:
            raise InvalidApiKey("Incorrect API key provided.")
        principal = await self._fetch(key_hash, raw_key)
        self._cache[key_hash] = (now, principal)
        return principal

    def forget(self, key_hash: str) -> None:
        """Drop a cached answer."""
        self._cache.pop(key_hash, None)

    async def _fetch(self, key_hash: str, raw_key: str | None) -> Principal:
        auth = self._master_key or raw_key
        if auth is None:
            raise InvalidApiKey("Incorrect API key provided.")
        info = await self._get("/key/info", {"key": key_hash}, auth)
        if info is None:
            raise InvalidApiKey("Incorrect API key provided.")
        principal = principal_from_key_info(key_hash, info.get("info") or {})
        if principal.team_id and self._master_key:
            team = await self._get("/team/info", {"team_id": principal.team_id}, self._master_key)
            if team is not None:
                principal = with_team_info(principal, team.get("team_info") or {})
        return principal

    async def _get(self, path: str, params: dict[str, str], auth: str) -> dict[str, Any] | None:
        assert self._client is not None
        try:
            response = await self._client.get(path, params=params, headers={"Authorization": f"Bearer {auth}"})
        except httpx.HTTPError as exc:
            raise KeyCheckError(f"LiteLLM proxy unreachable for {path}") from exc
        if response.status_code in (400, 401, 403, 404):
            return None
        if response.status_code >= 300:
            raise KeyCheckError(f"LiteLLM proxy answered {response.status_code} for {path}")
        try:
            body = response.json()
        except ValueError as exc:
            raise KeyCheckError(f"LiteLLM proxy sent no JSON for {path}") from exc
        return body if isinstance(body, dict) else None
