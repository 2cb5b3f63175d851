"""Settings: the only module that reads the environment (docs/api.md, "Settings").

`Settings.from_env(environ)` reads every `SIDECAR_*` variable once and returns a frozen object;
everything else receives a `Settings` (or the few fields it needs) as an argument.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

from sidecar.errors import ConfigError
from sidecar.redis_conn import RedisSettingsError, RedisTarget, target_from_env

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8787
DEFAULT_DATABASE_URL = "sqlite:///sidecar-billing.db"
DEFAULT_CHECKPOINT_S = 5.0
DEFAULT_LOST_AFTER_S = 60.0
DEFAULT_KEY_RECHECK_S = 5.0
DEFAULT_IDLE_TIMEOUT_S = 300.0
DEFAULT_MAX_SESSION_S = 3600.0
DEFAULT_DRAIN_GRACE_S = 20.0
DEFAULT_MAX_SESSIONS_PER_KEY = 20
DEFAULT_MAX_SESSIONS = 2000
DEFAULT_MAX_FRAME_BYTES = 4 * 1024 * 1024
DEFAULT_KEY_CACHE_S = 5.0
#: Unknown key hashes are answered from memory this long (a flood of one bad key costs one /key/info a TTL).
DEFAULT_KEY_NEGATIVE_CACHE_S = 5.0
#: Concurrent admission lookups to LiteLLM (its connection pool), and distinct ones allowed to wait (then 503).
DEFAULT_KEY_LOOKUPS = 32
DEFAULT_KEY_LOOKUP_BACKLOG = 256
#: Concurrent live-session re-checks to LiteLLM, on a connection pool of their own.
DEFAULT_KEY_RECHECKS = 4
DEFAULT_CONNECT_TIMEOUT_S = 10.0
#: A client's time to send its whole request head (a WebSocket upgrade's included), from its connection or first byte.
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0
#: A walk-out's wait for the provider's `response.done` (docs/billing.md, "Walk-outs").
DEFAULT_WALKOUT_WAIT_S = 5.0
#: A WebRTC call's sideband that drops is re-attached within this long, else the call is hung up (sidecar/calls).
DEFAULT_SIDEBAND_REATTACH_S = 10.0
#: Open client connections (HTTP and WebSocket) per process; more are answered 503 and closed at once.
DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_TRANSCRIPTION_MODEL = "gpt-realtime-whisper"
DEFAULT_USAGE_STREAM = "realtime:usage"
DEFAULT_CONTROL_CHANNEL = "realtime:control"
DEFAULT_ROUNDING = "exact"
DEFAULT_CAPTIONS_PAGE = False
#: A realtime model with no price is refused at start unless this is set: billing $0 silently is a money leak.
DEFAULT_ALLOW_UNPRICED = False
#: How often `sidecar serve` re-reads config.yaml and LiteLLM's DB-stored models (with SIDECAR_LITELLM_DATABASE_URL).
DEFAULT_MODELS_REFRESH_S = 30.0
REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})
POSTGRES_SCHEMES = frozenset({"postgresql", "postgres"})
#: The largest HTTP request body any route accepts (client secrets, the admin API); larger ones get 413.
DEFAULT_MAX_BODY_BYTES = 64 * 1024
#: The longest a billing DB connect, statement or transaction may take before it is abandoned and retried.
DEFAULT_DB_TIMEOUT_S = 15.0
#: SIDECAR_CLIENT_SECRET_KEY signs client secrets; shorter keys are refused (HMAC-SHA256 wants >= 32 bytes).
MIN_CLIENT_SECRET_KEY_CHARS = 32
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def _float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {raw!r}")
    return value


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from exc
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {raw!r}")
    return value


def _optional_port(environ: Mapping[str, str], name: str) -> int | None:
    if _optional(environ, name) is None:
        return None
    port = _int(environ, name, 0)
    if port > 65535:
        raise ConfigError(f"{name} must be a TCP port (1-65535), got {port}")
    return port


def _bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value not in _TRUE | _FALSE:
        raise ConfigError(f"{name} must be 1/0, true/false, yes/no or on/off, got {raw!r}")
    return value in _TRUE


def _optional(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "").strip()
    return value or None


def _increment(environ: Mapping[str, str]) -> Decimal:
    raw = environ.get("SIDECAR_ROUNDING_INCREMENT", "") or "1"
    try:
        value = Decimal(raw)
    except ArithmeticError as exc:
        raise ConfigError(f"SIDECAR_ROUNDING_INCREMENT must be a number, got {raw!r}") from exc
    if not value.is_finite() or value <= 0:
        raise ConfigError(f"SIDECAR_ROUNDING_INCREMENT must be positive, got {raw!r}")
    return value


def _redis_url(environ: Mapping[str, str], name: str = "SIDECAR_REDIS_URL") -> str | None:
    """A Redis URL setting, checked for the form redis-py accepts (it is not dialled here)."""
    url = _optional(environ, name)
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise ConfigError(f"{name} is not a URL (a bad port?)") from exc
    if parts.scheme not in REDIS_SCHEMES:
        raise ConfigError(f"{name} must start with redis://, rediss:// or unix://")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"{name} names no host (redis://HOST:6379/0)")
    database = parts.path.strip("/")
    if parts.scheme != "unix" and database and not database.isdigit():
        raise ConfigError(f"{name}'s path must be a database number (redis://host:6379/0)")
    return url


def _litellm_database_url(environ: Mapping[str, str]) -> str | None:
    """SIDECAR_LITELLM_DATABASE_URL: LiteLLM's PostgreSQL, as a postgresql:// or postgres:// URL (not dialled)."""
    url = _optional(environ, "SIDECAR_LITELLM_DATABASE_URL")
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise ConfigError("SIDECAR_LITELLM_DATABASE_URL is not a URL (a bad port?)") from exc
    if parts.scheme not in POSTGRES_SCHEMES:
        raise ConfigError(
            "SIDECAR_LITELLM_DATABASE_URL must start with postgresql:// or postgres:// (LiteLLM's DATABASE_URL)"
        )
    return url


@dataclass(frozen=True)
class Settings:
    """Every knob of the sidecar. Defaults are the contract's."""

    litellm_config: Path
    litellm_url: str | None = None
    redis_url: str | None = None
    #: A Sentinel-managed master or a Redis Cluster (SIDECAR_REDIS_SENTINEL_NODES / _CLUSTER_NODES), or redis_url
    #: with SIDECAR_REDIS_WAIT_REPLICAS; None: redis_url as it is.
    redis_ha: RedisTarget | None = None
    database_url: str = DEFAULT_DATABASE_URL
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    workers: int = 1
    checkpoint_s: float = DEFAULT_CHECKPOINT_S
    lost_after_s: float = DEFAULT_LOST_AFTER_S
    key_recheck_s: float = DEFAULT_KEY_RECHECK_S
    key_cache_s: float = DEFAULT_KEY_CACHE_S
    key_negative_cache_s: float = DEFAULT_KEY_NEGATIVE_CACHE_S
    key_lookups: int = DEFAULT_KEY_LOOKUPS
    key_lookup_backlog: int = DEFAULT_KEY_LOOKUP_BACKLOG
    key_rechecks: int = DEFAULT_KEY_RECHECKS
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    max_session_s: float = DEFAULT_MAX_SESSION_S
    drain_grace_s: float = DEFAULT_DRAIN_GRACE_S
    max_sessions_per_key: int = DEFAULT_MAX_SESSIONS_PER_KEY
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S
    walkout_wait_s: float = DEFAULT_WALKOUT_WAIT_S
    sideband_reattach_s: float = DEFAULT_SIDEBAND_REATTACH_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    spool_dir: Path = field(default_factory=lambda: Path("spool"))
    default_transcription_model: str = DEFAULT_TRANSCRIPTION_MODEL
    usage_stream: str = DEFAULT_USAGE_STREAM
    control_channel: str = DEFAULT_CONTROL_CHANNEL
    control_prefix: str = "realtime"
    rounding: str = DEFAULT_ROUNDING
    rounding_increment: Decimal = Decimal("1")
    #: Signs client secrets (POST /v1/realtime/client_secrets); every replica needs the same value. Unset:
    #: embedded mode signs with a random per-process key, Redis mode (several replicas) refuses to mint.
    client_secret_key: str | None = field(default=None, repr=False)
    #: Serve the live-captions page and its token endpoint under /captions/ (docs/browser.md).
    captions_page: bool = DEFAULT_CAPTIONS_PAGE
    #: The LiteLLM key /captions/token mints client secrets with (required when the page is on).
    captions_key: str | None = field(default=None, repr=False)
    #: HTTP request bodies above this many bytes are refused with 413 (sidecar/bodies.py).
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: Billing DB timeout: connect, server-side statement timeout and the client-side transaction deadline.
    db_timeout_s: float = DEFAULT_DB_TIMEOUT_S
    #: Serve realtime models that have no price (billed $0). Off: `sidecar serve` refuses to start with one.
    allow_unpriced: bool = DEFAULT_ALLOW_UNPRICED
    #: LiteLLM's own database: `sidecar consume` runs the `litellm` group into it (the LiteLLM ledger sink).
    litellm_database_url: str | None = field(default=None, repr=False)
    #: `sidecar serve` rebuilds its catalog this often when SIDECAR_LITELLM_DATABASE_URL is set (UI-added models).
    models_refresh_s: float = DEFAULT_MODELS_REFRESH_S
    #: The proxy's Redis, where the LiteLLM sink publishes cache invalidations after each commit (unset: none).
    litellm_redis_url: str | None = field(default=None, repr=False)
    #: The proxy's Redis cache namespace (its `cache_params.namespace`), prefixing the invalidation channel.
    litellm_redis_namespace: str | None = None
    #: `sidecar consume` serves Prometheus metrics on this port (on SIDECAR_HOST) when set.
    consume_metrics_port: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, require_config: bool = True) -> Settings:
        """Read the `SIDECAR_*` variables. Raises ConfigError for a missing or malformed value.

        `require_config=False` is for the commands that never read the LiteLLM config (consume, db upgrade).
        """
        env = os.environ if environ is None else environ
        config = _optional(env, "SIDECAR_LITELLM_CONFIG")
        if config is None and require_config:
            raise ConfigError("SIDECAR_LITELLM_CONFIG must name the LiteLLM proxy's config.yaml")
        rounding = env.get("SIDECAR_ROUNDING", DEFAULT_ROUNDING) or DEFAULT_ROUNDING
        if rounding not in ("exact", "up", "nearest"):
            raise ConfigError(f"SIDECAR_ROUNDING must be exact, up or nearest, got {rounding!r}")
        increment = _increment(env)
        secret_key = _optional(env, "SIDECAR_CLIENT_SECRET_KEY")
        if secret_key is not None and len(secret_key) < MIN_CLIENT_SECRET_KEY_CHARS:
            raise ConfigError(f"SIDECAR_CLIENT_SECRET_KEY must be at least {MIN_CLIENT_SECRET_KEY_CHARS} characters")
        captions_page = _bool(env, "SIDECAR_CAPTIONS_PAGE", DEFAULT_CAPTIONS_PAGE)
        captions_key = _optional(env, "SIDECAR_CAPTIONS_KEY")
        redis_url = _redis_url(env)
        try:
            redis = target_from_env(env, url=redis_url)
        except RedisSettingsError as exc:
            raise ConfigError(str(exc)) from exc
        if captions_page and captions_key is None:
            raise ConfigError("SIDECAR_CAPTIONS_PAGE needs SIDECAR_CAPTIONS_KEY (the LiteLLM key captions bill to)")
        return cls(
            litellm_config=Path(config or ""),
            litellm_url=_optional(env, "SIDECAR_LITELLM_URL"),
            redis_url=redis_url,
            redis_ha=redis if redis is not None and (redis.mode != "single" or redis.wait_replicas) else None,
            database_url=_optional(env, "SIDECAR_DATABASE_URL") or DEFAULT_DATABASE_URL,
            host=_optional(env, "SIDECAR_HOST") or DEFAULT_HOST,
            port=_int(env, "SIDECAR_PORT", DEFAULT_PORT),
            workers=_int(env, "SIDECAR_WORKERS", 1),
            checkpoint_s=_float(env, "SIDECAR_CHECKPOINT_S", DEFAULT_CHECKPOINT_S),
            lost_after_s=_float(env, "SIDECAR_LOST_AFTER_S", DEFAULT_LOST_AFTER_S),
            key_recheck_s=_float(env, "SIDECAR_KEY_RECHECK_S", DEFAULT_KEY_RECHECK_S),
            key_cache_s=_float(env, "SIDECAR_KEY_CACHE_S", DEFAULT_KEY_CACHE_S),
            key_negative_cache_s=_float(env, "SIDECAR_KEY_NEGATIVE_CACHE_S", DEFAULT_KEY_NEGATIVE_CACHE_S),
            key_lookups=_int(env, "SIDECAR_KEY_LOOKUPS", DEFAULT_KEY_LOOKUPS),
            key_lookup_backlog=_int(env, "SIDECAR_KEY_LOOKUP_BACKLOG", DEFAULT_KEY_LOOKUP_BACKLOG),
            key_rechecks=_int(env, "SIDECAR_KEY_RECHECKS", DEFAULT_KEY_RECHECKS),
            idle_timeout_s=_float(env, "SIDECAR_IDLE_TIMEOUT_S", DEFAULT_IDLE_TIMEOUT_S),
            max_session_s=_float(env, "SIDECAR_MAX_SESSION_S", DEFAULT_MAX_SESSION_S),
            drain_grace_s=_float(env, "SIDECAR_DRAIN_GRACE_S", DEFAULT_DRAIN_GRACE_S),
            max_sessions_per_key=_int(env, "SIDECAR_MAX_SESSIONS_PER_KEY", DEFAULT_MAX_SESSIONS_PER_KEY),
            max_sessions=_int(env, "SIDECAR_MAX_SESSIONS", DEFAULT_MAX_SESSIONS),
            max_frame_bytes=_int(env, "SIDECAR_MAX_FRAME_BYTES", DEFAULT_MAX_FRAME_BYTES),
            connect_timeout_s=_float(env, "SIDECAR_CONNECT_TIMEOUT_S", DEFAULT_CONNECT_TIMEOUT_S),
            handshake_timeout_s=_float(env, "SIDECAR_HANDSHAKE_TIMEOUT_S", DEFAULT_HANDSHAKE_TIMEOUT_S),
            walkout_wait_s=_float(env, "SIDECAR_WALKOUT_WAIT_S", DEFAULT_WALKOUT_WAIT_S),
            sideband_reattach_s=_float(env, "SIDECAR_SIDEBAND_REATTACH_S", DEFAULT_SIDEBAND_REATTACH_S),
            max_connections=_int(env, "SIDECAR_MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS),
            spool_dir=Path(_optional(env, "SIDECAR_SPOOL_DIR") or "spool"),
            default_transcription_model=_optional(env, "SIDECAR_DEFAULT_TRANSCRIPTION_MODEL")
            or DEFAULT_TRANSCRIPTION_MODEL,
            rounding=rounding,
            rounding_increment=increment,
            client_secret_key=secret_key,
            captions_page=captions_page,
            captions_key=captions_key,
            max_body_bytes=_int(env, "SIDECAR_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES),
            db_timeout_s=_float(env, "SIDECAR_DB_TIMEOUT_S", DEFAULT_DB_TIMEOUT_S),
            allow_unpriced=_bool(env, "SIDECAR_ALLOW_UNPRICED", DEFAULT_ALLOW_UNPRICED),
            litellm_database_url=_litellm_database_url(env),
            models_refresh_s=_float(env, "SIDECAR_MODELS_REFRESH_S", DEFAULT_MODELS_REFRESH_S),
            litellm_redis_url=_redis_url(env, "SIDECAR_LITELLM_REDIS_URL"),
            litellm_redis_namespace=_optional(env, "SIDECAR_LITELLM_REDIS_NAMESPACE"),
            consume_metrics_port=_optional_port(env, "SIDECAR_CONSUME_METRICS_PORT"),
        )

    @property
    def redis_target(self) -> RedisTarget | None:
        """The Redis every command dials (sidecar/redis_conn.py); None: embedded mode, no Redis."""
        if self.redis_ha is not None:
            return self.redis_ha
        return RedisTarget(mode="single", url=self.redis_url) if self.redis_url else None

    @property
    def redis_enabled(self) -> bool:
        """Whether a Redis is configured (a single one, a Sentinel-managed master or a cluster)."""
        return self.redis_target is not None

    def replace(self, **changes: object) -> Settings:
        """A copy with some fields changed (tests and the CLI use it)."""
        return replace(self, **changes)  # type: ignore[arg-type]
