"""Client secrets: short-lived, single-use credentials that let a browser open one realtime session.

    POST /v1/realtime/client_secrets        (the OpenAI Realtime API's shape; Authorization: Bearer <LiteLLM key>)
        {"expires_after": {"anchor": "created_at", "seconds": 60},
         "session": {"type": "transcription", "audio": {"input": {"transcription": {"model": "..."}}}}}
     -> {"value": "ek_...", "expires_at": <epoch seconds>, "session": {"id", "object", ...the bound settings}}

The browser then connects with the subprotocols `realtime, openai-insecure-api-key.<value>`. Refusals at
minting are the WebSocket's (docs/api.md, "Refused before the upgrade"), plus 400 `invalid_request` for a
malformed body.

A secret is `ek_<payload>.<mac>`: payload = base64url(JSON) of a random id, the minting key's sha256 hash,
the public model, whether it is a transcription session, the bound session settings, and its creation and
expiry times (epoch seconds); mac = base64url HMAC-SHA256 over `ek_<payload>`, keyed from
SIDECAR_CLIENT_SECRET_KEY. Any replica with that key verifies a secret without shared state. The payload is
signed, not encrypted: it carries nothing secret (a key hash, which LiteLLM refuses as a credential, the
model and the settings the minter chose), never the key itself.

Lifetime: 60 s unless `expires_after.seconds` asks otherwise (10..7200 accepted, as OpenAI does; capped at
600). Expiry bounds the connect, not the session. Single use: the first connect claims the secret's id in a
`ClaimStore` (Redis SET NX with expiry across replicas; memory in embedded mode). The claim is taken after
every other check of the connect (key re-checked fresh against LiteLLM, model, budget), just before the
concurrency lease, so a connect refused with 401/403/404/400 leaves the secret usable; a 429 or 502 uses it.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol

import orjson
import redis.asyncio as aioredis
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from sidecar import audio_formats, protocol
from sidecar.auth import Principal, authorize, credentials
from sidecar.catalog import REALTIME_ENDPOINT
from sidecar.catalog import Route as SessionRoute
from sidecar.errors import (
    InvalidApiKey,
    KeyCheckError,
    ModelNotAllowed,
    ModelNotFound,
    ModelNotTranscription,
    Refusal,
    ServiceUnavailable,
)
from sidecar.redis_conn import REDIS_ERRORS

if TYPE_CHECKING:
    from sidecar.app import Services

log = logging.getLogger("sidecar.client_secrets")

PREFIX: Final = "ek_"
DEFAULT_TTL_S: Final = 60
MAX_TTL_S: Final = 600
MIN_REQUESTED_TTL_S: Final = 10  # OpenAI's accepted range for expires_after.seconds
MAX_REQUESTED_TTL_S: Final = 7200
#: The subprotocol header must stay within websockets' 8 KiB request-line limit.
MAX_SECRET_CHARS: Final = 6144
#: Claims outlive the expiry by this much, so clock skew between replicas cannot reopen a used secret.
CLAIM_MARGIN_S: Final = 60
#: OpenAI's default when a realtime session names no model.
DEFAULT_REALTIME_MODEL: Final = "gpt-realtime"
NO_STORE: Final = {"Cache-Control": "no-store"}
_CONTEXT: Final = b"realtime-sidecar client secret v1"
_INVALID: Final = "Invalid client secret."


class InvalidRequest(Refusal):
    status = 400
    code = "invalid_request"
    error_type = "invalid_request_error"


def is_client_secret(credential: str) -> bool:
    """True when a presented credential is a client secret rather than a LiteLLM key (`sk-...`)."""
    return credential.startswith(PREFIX)


# ---- the secret ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grant:
    """What a client secret allows: one session of `model` with the bound `session` settings, billed to a key."""

    secret_id: str
    key_hash: str
    model: str
    transcription: bool
    session: Mapping[str, Any]
    created_at: int
    expires_at: int

    def to_payload(self) -> dict[str, Any]:
        """The compact JSON object the secret carries (short names: it travels in a header)."""
        return {
            "v": 1,
            "id": self.secret_id,
            "kh": self.key_hash,
            "m": self.model,
            "tr": self.transcription,
            "s": self.session,
            "iat": self.created_at,
            "exp": self.expires_at,
        }

    @classmethod
    def from_payload(cls, payload: Any) -> Grant:
        """Raises ValueError when the payload is not one this module wrote."""
        if not isinstance(payload, dict) or payload.get("v") != 1:
            raise ValueError("unknown payload version")
        grant = cls(
            secret_id=payload["id"],
            key_hash=payload["kh"],
            model=payload["m"],
            transcription=payload["tr"],
            session=payload["s"],
            created_at=payload["iat"],
            expires_at=payload["exp"],
        )
        texts = (grant.secret_id, grant.key_hash, grant.model)
        if not all(isinstance(t, str) for t in texts) or not isinstance(grant.session, dict):
            raise ValueError("malformed payload")
        if not isinstance(grant.created_at, int) or not isinstance(grant.expires_at, int):
            raise ValueError("malformed payload")
        return grant


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Signs and verifies secrets with one HMAC-SHA256 key (derived from the configured secret)."""

    def __init__(self, key: str | bytes) -> None:
        raw = key.encode() if isinstance(key, str) else key
        self._key = hmac.new(raw, _CONTEXT, hashlib.sha256).digest()

    def _mac(self, body: str) -> str:
        return _b64(hmac.new(self._key, body.encode("ascii"), hashlib.sha256).digest())

    def sign(self, grant: Grant) -> str:
        """The secret string for `grant`."""
        body = PREFIX + _b64(orjson.dumps(grant.to_payload()))
        return f"{body}.{self._mac(body)}"

    def verify(self, secret: str, *, now: float) -> Grant:
        """The grant of a genuine, unexpired secret. Raises InvalidApiKey (malformed, tampered, expired)."""
        body, dot, mac = secret.rpartition(".")
        if not dot or not body.startswith(PREFIX) or len(secret) > MAX_SECRET_CHARS or not body.isascii():
            raise InvalidApiKey(_INVALID)
        if not hmac.compare_digest(mac.encode(), self._mac(body).encode()):
            raise InvalidApiKey(_INVALID)
        try:
            grant = Grant.from_payload(orjson.loads(_unb64(body[len(PREFIX) :])))
        except (ValueError, KeyError) as exc:  # orjson.JSONDecodeError and binascii.Error are ValueErrors
            raise InvalidApiKey(_INVALID) from exc
        if now >= grant.expires_at:
            raise InvalidApiKey("The client secret has expired.")
        return grant


# ---- single use -------------------------------------------------------------------------------------


class ClaimStore(Protocol):
    """Where a secret's id is claimed on its first use."""

    async def claim(self, secret_id: str, *, ttl_s: int) -> bool:
        """True for the first claim of `secret_id` (remembered for `ttl_s`), False ever after.

        Raises ServiceUnavailable when the store cannot be asked."""
        ...


class MemoryClaims:
    """ClaimStore for one process (embedded mode)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._claims: dict[str, float] = {}
        self._expiries: list[tuple[float, str]] = []  # a heap, to forget expired claims cheaply

    async def claim(self, secret_id: str, *, ttl_s: int) -> bool:
        now = self._clock()
        while self._expiries and self._expiries[0][0] <= now:
            _, expired = heapq.heappop(self._expiries)
            self._claims.pop(expired, None)
        if secret_id in self._claims:
            return False
        self._claims[secret_id] = now + ttl_s
        heapq.heappush(self._expiries, (now + ttl_s, secret_id))
        return True


class RedisClaims:
    """ClaimStore shared by every replica: `SET <prefix>:client-secret:<id> 1 NX EX ttl`."""

    def __init__(self, redis: aioredis.Redis, *, prefix: str = "realtime") -> None:
        self._redis = redis
        self._prefix = prefix

    async def claim(self, secret_id: str, *, ttl_s: int) -> bool:
        try:
            created = await self._redis.set(f"{self._prefix}:client-secret:{secret_id}", b"1", nx=True, ex=ttl_s)
        except REDIS_ERRORS as exc:
            raise ServiceUnavailable("The shared store is unreachable; try again.") from exc
        return bool(created)


class ClientSecrets:
    """Mints, verifies and claims secrets for one replica. Without a signer, minting is refused (503)."""

    def __init__(self, *, signer: Signer | None, claims: ClaimStore, clock: Callable[[], float] = time.time) -> None:
        self._signer = signer
        self._claims = claims
        self._clock = clock

    def mint(
        self, *, key_hash: str, model: str, transcription: bool, session: Mapping[str, Any], ttl_s: int
    ) -> tuple[Grant, str]:
        """A new grant and its secret. Raises ServiceUnavailable (no signing key) or InvalidRequest (too large)."""
        if self._signer is None:
            raise ServiceUnavailable("Client secrets need SIDECAR_CLIENT_SECRET_KEY, the same on every replica.")
        now = int(self._clock())
        grant = Grant(
            secret_id=secrets.token_hex(16),
            key_hash=key_hash,
            model=model,
            transcription=transcription,
            session=session,
            created_at=now,
            expires_at=now + ttl_s,
        )
        value = self._signer.sign(grant)
        if len(value) > MAX_SECRET_CHARS:
            raise InvalidRequest("The session settings are too large for a client secret.")
        return grant, value

    def verify(self, secret: str) -> Grant:
        """The grant of a genuine, unexpired secret. Raises InvalidApiKey."""
        if self._signer is None:
            raise InvalidApiKey(_INVALID)
        return self._signer.verify(secret, now=self._clock())

    async def claim(self, grant: Grant) -> None:
        """Use the secret up. Raises InvalidApiKey when it was used before, ServiceUnavailable (store down)."""
        ttl_s = max(1, grant.expires_at - int(self._clock())) + CLAIM_MARGIN_S
        if not await self._claims.claim(grant.secret_id, ttl_s=ttl_s):
            raise InvalidApiKey("The client secret was already used.")


# ---- the request ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MintRequest:
    """A validated POST /v1/realtime/client_secrets body."""

    ttl_s: int
    model: str
    transcription: bool
    session: dict[str, Any]


def parse_request(body: Any, *, default_transcription_model: str) -> MintRequest:
    """Validate a request body (None = empty). Raises InvalidRequest."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    ttl_s = _ttl(body.get("expires_after"))
    session = body.get("session")
    if session is None:
        session = {"type": "realtime"}
    if not isinstance(session, dict):
        raise InvalidRequest("session must be an object.")
    kind = session.get("type")
    if kind == "realtime":
        model = session.get("model") or DEFAULT_REALTIME_MODEL
    elif kind == "transcription":
        model = protocol.dig(session, "audio", "input", "transcription", "model") or default_transcription_model
    else:
        raise InvalidRequest("session.type must be 'realtime' or 'transcription'.")
    if not isinstance(model, str):
        raise InvalidRequest("The session's model must be a string.")
    return MintRequest(ttl_s=ttl_s, model=model, transcription=kind == "transcription", session=session)


def _ttl(expires_after: Any) -> int:
    if expires_after is None:
        return DEFAULT_TTL_S
    if not isinstance(expires_after, dict):
        raise InvalidRequest("expires_after must be an object.")
    if expires_after.get("anchor", "created_at") != "created_at":
        raise InvalidRequest("expires_after.anchor must be 'created_at'.")
    seconds = expires_after.get("seconds", DEFAULT_TTL_S)
    if isinstance(seconds, bool) or not isinstance(seconds, int):
        raise InvalidRequest("expires_after.seconds must be a whole number of seconds.")
    if not MIN_REQUESTED_TTL_S <= seconds <= MAX_REQUESTED_TTL_S:
        raise InvalidRequest(f"expires_after.seconds must be from {MIN_REQUESTED_TTL_S} to {MAX_REQUESTED_TTL_S}.")
    return min(seconds, MAX_TTL_S)


def bind(request: MintRequest, model: str) -> dict[str, Any]:
    """The settings a secret pins: the request's session, naming the public `model`. Raises InvalidRequest."""
    session: dict[str, Any] = orjson.loads(orjson.dumps(request.session))
    if not request.transcription:
        session["model"] = model
        return session
    node = session
    path: list[str] = []
    for key in ("audio", "input", "transcription"):
        path.append(key)
        if node.get(key) is None:
            node[key] = {}
        if not isinstance(node[key], dict):
            raise InvalidRequest(f"session.{'.'.join(path)} must be an object.")
        node = node[key]
    node["model"] = model
    return session


def response_body(grant: Grant, value: str) -> dict[str, Any]:
    """The OpenAI-shaped answer: the secret, its expiry, and the session it opens."""
    session = {"id": f"sess_{grant.secret_id}", "object": "realtime.session", **grant.session}
    return {"value": value, "expires_at": grant.expires_at, "session": session}


# ---- at connect ---------------------------------------------------------------------------------------


def bound_model(grant: Grant, requested: str | None) -> str:
    """The model a secret's session uses. Raises ModelNotAllowed when the connect names another one."""
    if requested and requested != grant.model:
        raise ModelNotAllowed(f"This client secret is for model {grant.model}.")
    return grant.model


def session_update(grant: Grant) -> str:
    """The `session.update` that applies the bound settings upstream, sent first (a realtime session's model
    is already in the upstream URL, so only a transcription session names its model here)."""
    session = {k: v for k, v in grant.session.items() if grant.transcription or k != "model"}
    return protocol.dumps({"type": protocol.SESSION_UPDATE, "event_id": protocol.event_id(), "session": session})


# ---- HTTP -----------------------------------------------------------------------------------------------


async def principal_of(services: Services, key: str) -> Principal:
    """The principal minting with `key`. Raises InvalidApiKey or ServiceUnavailable."""
    if is_client_secret(key):
        raise InvalidApiKey("A client secret cannot create client secrets.")
    try:
        principal = await services.checker.principal(key)
    except KeyCheckError as exc:
        raise ServiceUnavailable("The key service is unavailable; try again.") from exc
    if services.catalog.master_key is None and not principal.is_master:
        # At connect the key is re-checked by hash alone, which LiteLLM answers only to its master key.
        raise ServiceUnavailable("Client secrets need general_settings.master_key in the LiteLLM config.")
    return principal


def mint(services: Services, principal: Principal, body: Any) -> dict[str, Any]:
    """Mint a secret for `principal` from a request body; the response body. Raises a Refusal."""
    request = parse_request(body, default_transcription_model=services.catalog.default_transcription_model)
    model = services.catalog.resolve(request.model, route=_route(services, request))
    if request.transcription and model.kind != "realtime-transcription":
        raise ModelNotTranscription(
            f"The model `{model.name}` is a conversation model; a transcription session needs a transcription model."
        )
    authorize(principal, model.name, now=datetime.now(UTC))
    _check_bound(services, principal, request)
    grant, value = services.client_secrets.mint(
        key_hash=principal.key_hash,
        model=model.name,
        transcription=request.transcription,
        session=bind(request, model.name),
        ttl_s=request.ttl_s,
    )
    log.info("client secret minted", extra={"key_hash": principal.key_hash, "model": model.name})
    return response_body(grant, value)


def _route(services: Services, request: MintRequest) -> SessionRoute:
    """The route a secret's session will use: its model's, when that is only GPT-Live or translation (the
    secret then works on that route only: the connect resolves the model on its own route). Such a secret
    binds its model alone; its session's settings travel on the WebSocket. Raises InvalidRequest."""
    routes = services.catalog.routes_of(request.model)
    if not routes or REALTIME_ENDPOINT in routes:
        return REALTIME_ENDPOINT
    if set(request.session) - {"type", "model"}:
        raise InvalidRequest(f"A client secret for a model of {routes[0]} binds only the model.")
    return routes[0]


def _check_bound(services: Services, principal: Principal, request: MintRequest) -> None:
    """Refuse settings the session would refuse when they are applied at connect: an input audio format the
    provider does not decode at the metered rate, or (a conversation session) an input transcription model
    that is not configured or that the key may not use (docs/billing.md). Raises a Refusal."""
    try:
        audio_formats.requested(request.session)
    except audio_formats.FormatRefused as exc:
        raise InvalidRequest(str(exc)) from exc
    if request.transcription:
        return
    for holder in (
        protocol.dig(request.session, "audio", "input", "transcription"),
        request.session.get("input_audio_transcription"),
    ):
        name = holder.get("model") if isinstance(holder, dict) else None
        if name is None:
            continue
        if not isinstance(name, str) or name not in services.catalog.transcribers:
            raise ModelNotFound(f"The transcription model `{name}` is not available here.")
        authorize(principal, name, now=datetime.now(UTC))


async def json_body(request: Request) -> Any:
    """The parsed JSON body, None when empty. Raises InvalidRequest."""
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest("The request body is not valid JSON.") from exc


async def create_endpoint(request: Request) -> Response:
    """POST /v1/realtime/client_secrets."""
    services: Services = request.app.state.services
    try:
        creds = credentials(request.headers, ())
        if creds is None:
            raise InvalidApiKey("You didn't provide an API key.")
        principal = await principal_of(services, creds.key)
        answer = mint(services, principal, await json_body(request))
    except Refusal as refusal:
        return JSONResponse(refusal.body(), status_code=refusal.status, headers=NO_STORE)
    return JSONResponse(answer, headers=NO_STORE)


def routes() -> list[BaseRoute]:
    """The minting endpoint."""
    return [Route("/v1/realtime/client_secrets", create_endpoint, methods=["POST"])]
