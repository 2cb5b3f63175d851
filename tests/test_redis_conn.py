"""The one way to open Redis (sidecar/redis_conn.py): which settings name which kind of Redis, what each
refuses, and the client each builds (no server needed: the clients dial on first use)."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool

from sidecar.config import Settings
from sidecar.errors import ConfigError
from sidecar.publisher import redis_sink
from sidecar.redis_conn import RedisSettingsError, RedisTarget, connect_redis, is_cluster, parse_nodes, target_from_env

SENTINELS = "10.0.0.1:26379,10.0.0.2:26380,sentinel-3"


def env(**settings: str) -> dict[str, str]:
    return {"SIDECAR_LITELLM_CONFIG": "config.yaml"} | {f"SIDECAR_{k.upper()}": v for k, v in settings.items()}


def test_no_redis_setting_is_embedded_mode() -> None:
    """Without any Redis setting there is no target: embedded mode."""
    settings = Settings.from_env(env())
    assert (settings.redis_target, settings.redis_enabled) == (None, False)


def test_a_url_is_a_single_redis() -> None:
    """SIDECAR_REDIS_URL alone: a single Redis, dialled from the URL as before."""
    settings = Settings.from_env(env(redis_url="rediss://u:p@redis.internal:6380/2"))
    assert settings.redis_target == RedisTarget(mode="single", url="rediss://u:p@redis.internal:6380/2")
    assert settings.redis_enabled and settings.redis_ha is None


def test_sentinel_settings_name_a_sentinel_managed_master() -> None:
    """Sentinel nodes, service name, both auths, TLS and a database become one sentinel target."""
    settings = Settings.from_env(
        env(
            redis_sentinel_nodes=SENTINELS,
            redis_service_name="mymaster",
            redis_sentinel_password="s-secret",
            redis_password="m-secret",
            redis_username="sidecar",
            redis_ssl="true",
            redis_ssl_ca_certs="/etc/ca.pem",
            redis_db="3",
        )
    )
    target = settings.redis_target
    assert target == RedisTarget(
        mode="sentinel",
        nodes=(("10.0.0.1", 26379), ("10.0.0.2", 26380), ("sentinel-3", 26379)),
        service_name="mymaster",
        username="sidecar",
        password="m-secret",
        sentinel_password="s-secret",
        ssl=True,
        ssl_ca_certs="/etc/ca.pem",
        db=3,
        wait_replicas=1,
    )
    assert "secret" not in repr(target), "passwords stay out of reprs and logs"


def test_usage_waits_for_one_replica_by_default_with_sentinel_only() -> None:
    """SIDECAR_REDIS_WAIT_REPLICAS: 1 with Sentinel unless set, 0 otherwise; set with a URL it keeps the URL."""
    sentinel = {"redis_sentinel_nodes": SENTINELS, "redis_service_name": "m"}
    assert Settings.from_env(env(**sentinel)).redis_target.wait_replicas == 1  # type: ignore[union-attr]
    assert Settings.from_env(env(**sentinel, redis_wait_replicas="0")).redis_target.wait_replicas == 0  # type: ignore[union-attr]
    assert Settings.from_env(env(redis_url="redis://h:6379/0")).redis_target.wait_replicas == 0  # type: ignore[union-attr]
    single = Settings.from_env(env(redis_url="redis://h:6379/0", redis_wait_replicas="2")).redis_target
    assert single == RedisTarget(mode="single", url="redis://h:6379/0", wait_replicas=2)
    assert Settings.from_env(env(redis_cluster_nodes="h:7000")).redis_target.wait_replicas == 0  # type: ignore[union-attr]


def test_cluster_nodes_name_a_cluster() -> None:
    """SIDECAR_REDIS_CLUSTER_NODES: a Redis Cluster from its seed nodes (LiteLLM's JSON form too)."""
    json_form = '[{"host": "10.0.0.5", "port": 7000}, {"host": "10.0.0.6", "port": "7001"}]'
    target = Settings.from_env(env(redis_cluster_nodes=json_form)).redis_target
    assert target == RedisTarget(mode="cluster", nodes=(("10.0.0.5", 7000), ("10.0.0.6", 7001)))


def test_litellm_node_lists_are_taken_as_they_are() -> None:
    """LiteLLM's REDIS_SENTINEL_NODES JSON ([[host, port], ...]) and the host:port list name the same nodes."""
    json_form = parse_nodes('[["10.0.0.1", 26379], ["10.0.0.2", 26380]]', "X", default_port=26379)
    assert json_form == parse_nodes("10.0.0.1:26379, 10.0.0.2:26380", "X", default_port=26379)
    assert parse_nodes("[::1]:26379", "X", default_port=1) == (("::1", 26379),)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"redis_sentinel_nodes": SENTINELS, "redis_service_name": "m", "redis_cluster_nodes": "h:7000"},
            "set only one of SIDECAR_REDIS_SENTINEL_NODES and SIDECAR_REDIS_CLUSTER_NODES",
        ),
        (
            {"redis_url": "redis://h:6379/0", "redis_cluster_nodes": "h:7000"},
            "set only one of SIDECAR_REDIS_URL and SIDECAR_REDIS_CLUSTER_NODES",
        ),
        ({"redis_sentinel_nodes": SENTINELS}, "SIDECAR_REDIS_SENTINEL_NODES needs SIDECAR_REDIS_SERVICE_NAME"),
        ({"redis_service_name": "mymaster"}, "SIDECAR_REDIS_SERVICE_NAME is for Sentinel"),
        ({"redis_url": "redis://h:6379/0", "redis_sentinel_password": "x"}, "SIDECAR_REDIS_SENTINEL_PASSWORD is for"),
        ({"redis_url": "redis://h:6379/0", "redis_password": "x"}, "SIDECAR_REDIS_PASSWORD is for Sentinel or"),
        ({"redis_cluster_nodes": "h:7000", "redis_db": "1"}, "SIDECAR_REDIS_DB is for Sentinel"),
        ({"redis_cluster_nodes": "h:port"}, "SIDECAR_REDIS_CLUSTER_NODES has a node whose port is not a number"),
        ({"redis_cluster_nodes": "h:70000"}, "SIDECAR_REDIS_CLUSTER_NODES has a node whose port is out of range"),
        ({"redis_cluster_nodes": "[{"}, "SIDECAR_REDIS_CLUSTER_NODES is not valid JSON"),
        ({"redis_cluster_nodes": "[]"}, "SIDECAR_REDIS_CLUSTER_NODES must list at least one node"),
        ({"redis_cluster_nodes": '[{"port": 1}]'}, "SIDECAR_REDIS_CLUSTER_NODES has a node that is not host:port"),
        (
            {"redis_sentinel_nodes": "a b:1", "redis_service_name": "m"},
            "SIDECAR_REDIS_SENTINEL_NODES has a node with no",
        ),
        ({"redis_cluster_nodes": "h:7000", "redis_ssl": "maybe"}, "SIDECAR_REDIS_SSL must be 1/0"),
        ({"redis_sentinel_nodes": SENTINELS, "redis_service_name": "m", "redis_db": "x"}, "SIDECAR_REDIS_DB must be"),
        (
            {"redis_url": "redis://h:6379/0", "redis_wait_replicas": "one"},
            "SIDECAR_REDIS_WAIT_REPLICAS must be a whole",
        ),
        ({"redis_cluster_nodes": "h:7000", "redis_wait_replicas": "1"}, "SIDECAR_REDIS_WAIT_REPLICAS is for a single"),
    ],
)
def test_contradictory_or_malformed_redis_settings_are_refused(settings: dict[str, str], message: str) -> None:
    """Each misconfiguration is a ConfigError whose one line names the setting and the fix."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env(**settings))
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


def test_node_list_errors_are_redis_settings_errors() -> None:
    """parse_nodes raises RedisSettingsError (a ValueError) naming the setting it read."""
    with pytest.raises(RedisSettingsError, match=r"^SIDECAR_X has a node"):
        parse_nodes("h:0", "SIDECAR_X", default_port=1)
    assert target_from_env({}, url=None) is None


async def test_a_sentinel_target_builds_a_sentinel_managed_client() -> None:
    """connect_redis: the master_for client of the named service, with the master's auth and database."""
    target = RedisTarget(mode="sentinel", nodes=(("127.0.0.1", 26379),), service_name="mymaster", password="pw", db=2)
    client = connect_redis(target)
    try:
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool) and pool.is_master
        assert (pool.service_name, pool.connection_kwargs["password"], pool.connection_kwargs["db"]) == (
            "mymaster",
            "pw",
            2,
        )
        assert redis_sink(client, stream="realtime:usage") == "redis-sentinel:mymaster/2#realtime:usage"
        assert not is_cluster(client)
    finally:
        await client.aclose()


async def test_a_cluster_target_builds_a_cluster_client() -> None:
    """connect_redis: a RedisCluster seeded with the nodes; the spool names it by its sorted seeds."""
    client = connect_redis(RedisTarget(mode="cluster", nodes=(("127.0.0.1", 7001), ("127.0.0.1", 7000))))
    try:
        assert isinstance(client, RedisCluster) and is_cluster(client)
        assert redis_sink(client, stream="u") == "redis-cluster:127.0.0.1:7000,127.0.0.1:7001#u"
    finally:
        await client.aclose()


async def test_a_single_target_dials_its_url() -> None:
    """connect_redis: a plain client of the URL's server; the spool's sink name is unchanged."""
    client = connect_redis(RedisTarget(mode="single", url="redis://Redis.internal:6380/2"))
    try:
        assert isinstance(client, aioredis.Redis) and not is_cluster(client)
        assert redis_sink(client, stream="u") == "redis:redis.internal:6380/2#u"
    finally:
        await client.aclose()
