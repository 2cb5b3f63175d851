"""The one way to open Redis (docs/configuration.md, "Redis"): a single server, a Sentinel-managed master or a
Redis Cluster, from `SIDECAR_REDIS_*` settings named after LiteLLM's `REDIS_*` ones.

`target_from_env` reads and checks the settings (sidecar/config.py calls it, so a bad value stops the process
at start with one line); `connect_redis` turns a `RedisTarget` into a `redis.asyncio` client. Every command and
the consumers alike go through `connect_redis`, so they reach the same Redis the same way.

Failover: a Sentinel-managed client asks the sentinels for the master when it connects; a connection still
open to a demoted master gets READONLY, which redis-py turns into a ConnectionError after disconnecting it
(`SentinelManagedConnection.read_response`), so callers see the ordinary "Redis unavailable" error and the
next attempt dials the new master. A demoted master that still answers takes writes until Sentinel turns it
into a replica (and then drops them): usage publishing ends each batch with WAIT and, short of replicas, asks
`replication_shortfall` whether to resend (docs/operations.md, "Redis high availability"). The cluster client
re-reads the slot map on MOVED and connection errors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException, RedisError

#: Every `redis.asyncio` client this module makes is typed as the single-server client: the async cluster
#: client offers the same commands (AsyncRedisClusterCommands); its pipelines and pub/sub differ, and the
#: cluster-aware call sites check `is_cluster`.
RedisClient: TypeAlias = aioredis.Redis
#: What a Redis call raises when Redis fails: redis-py's errors, socket errors and the cluster client's own
#: (RedisClusterException is no RedisError: "cannot be connected" with every seed down, a slot not covered
#: while a master fails over). Catch this tuple wherever Redis failures are translated.
REDIS_ERRORS: Final = (RedisError, RedisClusterException, OSError)
RedisMode = Literal["single", "sentinel", "cluster"]
DEFAULT_SENTINEL_PORT: Final = 26379
DEFAULT_REDIS_PORT: Final = 6379
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"", "0", "false", "no", "off"})
#: Settings that only mean something for a Sentinel-managed master or a cluster (a single Redis takes its URL's).
_NODE_SETTINGS: Final = (
    "SIDECAR_REDIS_USERNAME",
    "SIDECAR_REDIS_PASSWORD",
    "SIDECAR_REDIS_SSL",
    "SIDECAR_REDIS_SSL_CA_CERTS",
)


class RedisSettingsError(ValueError):
    """A `SIDECAR_REDIS_*` setting is missing, malformed or contradicts another (the message names it)."""


@dataclass(frozen=True)
class RedisTarget:
    """Which Redis to dial and how; built by `target_from_env` (the URL is checked by sidecar/config.py)."""

    mode: RedisMode
    #: single: SIDECAR_REDIS_URL (redis://, rediss:// or unix://), which carries its own auth, TLS and database.
    url: str | None = field(default=None, repr=False)
    #: sentinel: the sentinels; cluster: the seed nodes.
    nodes: tuple[tuple[str, int], ...] = ()
    service_name: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    ssl: bool = False
    ssl_ca_certs: str | None = None
    db: int = 0
    #: Usage publishing counts a batch as published once this many replicas have it (WAIT); fewer: the batch is
    #: spooled and the client asks for the master again (a demoted master still answering). 0: no WAIT.
    wait_replicas: int = 0

    def describe(self) -> str:
        """Where this target points, never a password: for logs and the spool's sink name."""
        nodes = ",".join(f"{host}:{port}" for host, port in sorted(self.nodes))
        if self.mode == "sentinel":
            return f"redis-sentinel:{self.service_name}@{nodes}/{self.db}"
        if self.mode == "cluster":
            return f"redis-cluster:{nodes}"
        parts = urlsplit(self.url or "")
        if parts.scheme == "unix":
            return f"redis:{parts.path}"
        return f"redis:{(parts.hostname or '').lower()}:{parts.port or DEFAULT_REDIS_PORT}{parts.path or '/0'}"


def target_from_env(environ: Mapping[str, str], *, url: str | None) -> RedisTarget | None:
    """The Redis the settings name (None: none, embedded mode). `url` is SIDECAR_REDIS_URL, already checked.

    Raises RedisSettingsError when more than one kind of Redis is named, a node list is malformed, the
    Sentinel service name is missing (or given without sentinels), or a setting does not fit the mode.
    """
    sentinels = _optional(environ, "SIDECAR_REDIS_SENTINEL_NODES")
    cluster = _optional(environ, "SIDECAR_REDIS_CLUSTER_NODES")
    service = _optional(environ, "SIDECAR_REDIS_SERVICE_NAME")
    named = [
        name
        for name, value in (
            ("SIDECAR_REDIS_URL", url),
            ("SIDECAR_REDIS_SENTINEL_NODES", sentinels),
            ("SIDECAR_REDIS_CLUSTER_NODES", cluster),
        )
        if value is not None
    ]
    if len(named) > 1:
        raise RedisSettingsError(f"set only one of {' and '.join(named)}: they name different kinds of Redis")
    if service is not None and sentinels is None:
        raise RedisSettingsError("SIDECAR_REDIS_SERVICE_NAME is for Sentinel: set SIDECAR_REDIS_SENTINEL_NODES too")
    for name in ("SIDECAR_REDIS_SENTINEL_USERNAME", "SIDECAR_REDIS_SENTINEL_PASSWORD"):
        if sentinels is None and _optional(environ, name) is not None:
            raise RedisSettingsError(f"{name} is for Sentinel: set SIDECAR_REDIS_SENTINEL_NODES too")
    wait_replicas = _wait_replicas(environ, default=1 if sentinels is not None else 0)
    if sentinels is None and _optional(environ, "SIDECAR_REDIS_DB") is not None:
        raise RedisSettingsError("SIDECAR_REDIS_DB is for Sentinel (a single Redis takes it in its URL: redis://h/1)")
    if sentinels is None and cluster is None:
        for name in _NODE_SETTINGS:
            if _optional(environ, name) is not None:
                raise RedisSettingsError(
                    f"{name} is for Sentinel or Cluster: with SIDECAR_REDIS_URL put it in the URL"
                    " (rediss://user:password@host:6379/0)"
                )
        return None if url is None else RedisTarget(mode="single", url=url, wait_replicas=wait_replicas)
    common: dict[str, Any] = {
        "username": _optional(environ, "SIDECAR_REDIS_USERNAME"),
        "password": _optional(environ, "SIDECAR_REDIS_PASSWORD"),
        "ssl": _bool(environ, "SIDECAR_REDIS_SSL"),
        "ssl_ca_certs": _optional(environ, "SIDECAR_REDIS_SSL_CA_CERTS"),
    }
    if sentinels is not None:
        if service is None:
            raise RedisSettingsError(
                "SIDECAR_REDIS_SENTINEL_NODES needs SIDECAR_REDIS_SERVICE_NAME (the master's name, e.g. mymaster)"
            )
        return RedisTarget(
            mode="sentinel",
            nodes=parse_nodes(sentinels, "SIDECAR_REDIS_SENTINEL_NODES", default_port=DEFAULT_SENTINEL_PORT),
            service_name=service,
            sentinel_username=_optional(environ, "SIDECAR_REDIS_SENTINEL_USERNAME"),
            sentinel_password=_optional(environ, "SIDECAR_REDIS_SENTINEL_PASSWORD"),
            db=_db(environ),
            wait_replicas=wait_replicas,
            **common,
        )
    assert cluster is not None
    if wait_replicas:
        raise RedisSettingsError(
            "SIDECAR_REDIS_WAIT_REPLICAS is for a single Redis or Sentinel (a cluster's WAIT answers for one node)"
        )
    return RedisTarget(
        mode="cluster",
        nodes=parse_nodes(cluster, "SIDECAR_REDIS_CLUSTER_NODES", default_port=DEFAULT_REDIS_PORT),
        wait_replicas=wait_replicas,
        **common,
    )


def parse_nodes(raw: str, name: str, *, default_port: int) -> tuple[tuple[str, int], ...]:
    """`host:port,host:port` (a port may be left out), or LiteLLM's JSON: `[["host", 26379], ...]` (its
    REDIS_SENTINEL_NODES) or `[{"host": "h", "port": 7000}, ...]` (its REDIS_CLUSTER_NODES).

    Raises RedisSettingsError naming `name` for anything else, or an empty list.
    """
    text = raw.strip()
    is_json = text.startswith("{") or (text.startswith("[") and text[1:2] in ("[", "{", '"', "]", " ", ""))
    try:  # `[::1]:26379` is a bracketed IPv6 host, not JSON
        items = json.loads(text) if is_json else [part for part in text.split(",") if part.strip()]
    except json.JSONDecodeError as exc:
        raise RedisSettingsError(f"{name} is not valid JSON ({exc.msg}); or write host:port,host:port") from exc
    if not isinstance(items, list) or not items:
        raise RedisSettingsError(f"{name} must list at least one node: host:port,host:port")
    return tuple(_node(item, name, default_port) for item in items)


def _node(item: object, name: str, default_port: int) -> tuple[str, int]:
    host: object
    port: object
    if isinstance(item, str):
        host, _, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", default_port)
        host = str(host).strip("[]")  # [::1]:26379
    elif isinstance(item, list | tuple) and len(item) == 2:
        host, port = item
    elif isinstance(item, dict) and "host" in item:
        host, port = item["host"], item.get("port", default_port)
    else:
        raise RedisSettingsError(f"{name} has a node that is not host:port: {item!r}")
    if not isinstance(host, str) or not host or any(c.isspace() or c in "/@," for c in host):
        raise RedisSettingsError(f"{name} has a node with no usable host: {item!r}")
    try:
        number = int(cast(Any, port))
    except (TypeError, ValueError):
        raise RedisSettingsError(f"{name} has a node whose port is not a number: {item!r}") from None
    if not 0 < number < 65536:
        raise RedisSettingsError(f"{name} has a node whose port is out of range: {item!r}")
    return host, number


def connect_redis(
    target: RedisTarget,
    *,
    socket_timeout: float | None = 10.0,
    socket_connect_timeout: float = 5.0,
    socket_keepalive: bool = False,
) -> RedisClient:
    """A `redis.asyncio` client for `target` (no I/O yet: it dials on first use). Close it with `aclose()`."""
    timeouts: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout,
        "socket_keepalive": socket_keepalive,
    }
    if target.mode == "single":
        return aioredis.Redis.from_url(target.url or "", **timeouts)
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    tls: dict[str, Any] = {"ssl": True, "ssl_ca_certs": target.ssl_ca_certs} if target.ssl else {}
    if target.mode == "sentinel":
        from redis.asyncio.sentinel import Sentinel

        sentinel_auth: dict[str, Any] = {"username": target.sentinel_username, "password": target.sentinel_password}
        sentinel = Sentinel(  # type: ignore[no-untyped-call] # redis-py leaves Sentinel.__init__ unannotated
            list(target.nodes), sentinel_kwargs={**timeouts, **sentinel_auth, **tls}
        )
        master: RedisClient = sentinel.master_for(target.service_name or "", db=target.db, **timeouts, **auth, **tls)
        return master
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    cluster = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes], **timeouts, **auth, **tls
    )
    return cast(RedisClient, cluster)


Shortfall = Literal["demoted", "unreplicated", "alone"]


async def replication_shortfall(client: RedisClient) -> Shortfall:
    """Why fewer replicas than asked acknowledged a write (WAIT), asking the sentinels (one round trip each).

    `demoted`: the sentinels name another master, so this one was demoted and its writes will be dropped when
    it resynchronises (drop the pool's connections, send them again). `unreplicated`: it is the master and a
    healthy replica exists that did not acknowledge, e.g. one being promoted right now, or a client that is not
    Sentinel-managed (send them again later). `alone`: it is the master and the sentinels know no healthy replica,
    so no failover can drop the writes. Raises redis.exceptions.ConnectionError when no sentinel names a master.
    """
    from redis.asyncio.sentinel import SentinelConnectionPool

    pool = client.connection_pool
    if not isinstance(pool, SentinelConnectionPool):
        return "unreplicated"
    master = await pool.sentinel_manager.discover_master(pool.service_name)
    if pool.master_address is not None and tuple(master) != tuple(pool.master_address):
        return "demoted"
    replicas = await pool.sentinel_manager.discover_slaves(pool.service_name)
    return "unreplicated" if replicas else "alone"


def is_cluster(client: object) -> bool:
    """Whether `client` is a Redis Cluster client (its pipelines and pub/sub work per slot)."""
    from redis.asyncio.cluster import RedisCluster

    return isinstance(client, RedisCluster)


def _optional(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "").strip()
    return value or None


def _bool(environ: Mapping[str, str], name: str) -> bool:
    value = environ.get(name, "").strip().lower()
    if value not in _TRUE | _FALSE:
        raise RedisSettingsError(f"{name} must be 1/0, true/false, yes/no or on/off, got {environ[name]!r}")
    return value in _TRUE


def _wait_replicas(environ: Mapping[str, str], *, default: int) -> int:
    raw = _optional(environ, "SIDECAR_REDIS_WAIT_REPLICAS")
    if raw is None:
        return default
    if not raw.isdigit():
        raise RedisSettingsError(f"SIDECAR_REDIS_WAIT_REPLICAS must be a whole number (0: no WAIT), got {raw!r}")
    return int(raw)


def _db(environ: Mapping[str, str]) -> int:
    raw = _optional(environ, "SIDECAR_REDIS_DB") or "0"
    if not raw.isdigit():
        raise RedisSettingsError(f"SIDECAR_REDIS_DB must be a database number (0, 1, ...), got {raw!r}")
    return int(raw)
