"""The Sentinel and Cluster rows reuse issue 18's own test fixtures (no second copy of their process management):
`tests/redis_ha.py` (`SentinelGroup`: a master, a replica, three sentinels) and `tests/redis_cluster.py`
(`RedisCluster`: three masters with a replica each), loaded when a row needs them. A fixture that is not there
(an older checkout) makes its rows "not run", with the reason.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from bench.chaos.stack import STREAM, backlog_of


class HaRedis:
    """A running Sentinel group or Cluster: the settings that point the sidecar and the consumer at it, its
    billing group's backlog, and its two faults (a failover, the master SIGKILLed)."""

    def __init__(self, kind: str, fixture: Any, env: dict[str, str]) -> None:
        self.kind = kind
        self.fixture = fixture
        self.env = env

    async def backlog(self) -> int | None:
        client = (await self.fixture.master()).client() if self.kind == "sentinel" else self.fixture.client()
        try:
            result: int | None = await backlog_of(client)
        finally:
            await client.aclose()
        return result

    async def fail_over(self) -> None:
        """SENTINEL FAILOVER, or CLUSTER FAILOVER of the usage stream's master; returns once it took effect."""
        if self.kind == "sentinel":
            await self.fixture.failover()
        else:
            await self.fixture.failover(STREAM)

    async def kill_master(self) -> None:
        """SIGKILL the master (the usage stream's, on a cluster); returns once a replica took over."""
        if self.kind == "sentinel":
            await self.fixture.kill_master()
        else:
            await self.fixture.kill_master(STREAM)

    async def stop(self) -> None:
        if self.kind == "sentinel":
            await self.fixture.stop()
        else:
            self.fixture.stop()


async def start_ha(kind: str, directory: Path) -> HaRedis | str:
    """Start a Sentinel group or a Cluster under `directory`; the reason instead when its fixture is missing."""
    module_name, class_name = (
        ("tests.redis_ha", "SentinelGroup") if kind == "sentinel" else ("tests.redis_cluster", "RedisCluster")
    )
    try:
        module = importlib.import_module(module_name)
        fixture = getattr(module, class_name)(directory)
    except (ImportError, AttributeError) as exc:
        return f"{module_name}.{class_name} is not available here ({type(exc).__name__})"
    await fixture.start()
    if kind == "sentinel":
        env = {"SIDECAR_REDIS_SENTINEL_NODES": fixture.sentinel_nodes, "SIDECAR_REDIS_SERVICE_NAME": module.SERVICE}
    else:
        env = {"SIDECAR_REDIS_CLUSTER_NODES": fixture.seeds}
    return HaRedis(kind, fixture, env)
