"""A throwaway Redis Cluster for the tests: three masters with one replica each, on loopback ports.

`RedisCluster(directory)` starts six `redis-server --cluster-enabled yes` processes (node timeout 1 s, so a
killed master is replaced within a few seconds), joins them with `redis-cli --cluster create --cluster-replicas 1`
and waits until every node reports `cluster_state:ok`, every slot is served and every replica is in sync.
`stop()` kills every process it started and waits for each (the fixture calls it whatever happened); the
servers are plain `subprocess.Popen` children, so a fixture of any scope can start and stop them. Waiting for
the other processes is a bounded poll of their state (tests/billing_support.py `poll`), never a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis.crc import key_slot
from redis.exceptions import RedisError

from tests.billing_support import DEADLINE_S, poll, quick_redis

NODE_TIMEOUT_MS = 1000
BUS_OFFSET = 10_000  # Redis Cluster's bus port is the client port + 10000


def cluster_ports(count: int) -> list[int]:
    """`count` client ports on 127.0.0.1 whose bus ports (+10000) were free a moment ago too."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(20_000, 30_000)
        if port in ports or not all(_free(p) for p in (port, port + BUS_OFFSET)):
            continue
        ports.append(port)
    return ports


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def slot_of(key: str | bytes) -> int:
    """The hash slot of `key` (Redis's CRC16 with hash tags)."""
    return int(key_slot(key.encode() if isinstance(key, str) else key))


@dataclass
class Node:
    """One `redis-server` of the cluster."""

    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class RedisCluster:
    """Six `redis-server` processes in cluster mode (three masters, one replica each) under `directory`."""

    def __init__(self, directory: Path, *, masters: int = 3) -> None:
        self.directory = directory
        self.nodes = [Node(port) for port in cluster_ports(masters * 2)]
        self.masters = masters

    @property
    def seeds(self) -> str:
        """The seed nodes as `SIDECAR_REDIS_CLUSTER_NODES` takes them: `host:port,host:port,...`."""
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[: self.masters])

    def client(self, **kwargs: object) -> ClusterClient:
        """A cluster client dialling the seed nodes (the caller closes it)."""
        seeds = [ClusterNode("127.0.0.1", n.port) for n in self.nodes if n.running]
        options: dict[str, object] = {"socket_connect_timeout": 2, "socket_timeout": 5}
        options.update(kwargs)
        return ClusterClient(startup_nodes=seeds, **options)  # type: ignore[arg-type]

    def node(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    async def start(self) -> None:
        """Start the six servers, create the cluster and wait until it serves every slot with replicas in sync."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            await self._spawn(node)
        for node in self.nodes:
            await self._until_answers(node)
        create = await asyncio.create_subprocess_exec(
            "redis-cli",
            "--cluster",
            "create",
            *(f"127.0.0.1:{n.port}" for n in self.nodes),
            "--cluster-replicas",
            "1",
            "--cluster-yes",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        async with asyncio.timeout(DEADLINE_S):
            output, _ = await create.communicate()
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {output.decode(errors='replace')}")
        await poll(self.healthy, what="the Redis Cluster to be ok with every replica in sync", every_s=0.1)

    async def _spawn(self, node: Node) -> None:
        directory = self.directory / str(node.port)
        directory.mkdir(parents=True, exist_ok=True)
        args = ["--port", str(node.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(directory), "--logfile", "redis.log", "--cluster-enabled", "yes"]
        args += ["--cluster-config-file", "nodes.conf", "--cluster-node-timeout", str(NODE_TIMEOUT_MS)]
        # A replica takes over however long it was out of touch (the tests fail masters over on purpose).
        args += ["--cluster-replica-validity-factor", "0"]
        node.process = subprocess.Popen(  # noqa: ASYNC220 (returns at once; a Popen child outlives any loop)
            ["redis-server", *args], stdout=subprocess.DEVNULL
        )

    async def _until_answers(self, node: Node) -> None:
        client = quick_redis(node.url)
        try:

            async def answers() -> bool:
                if not node.running:
                    raise RuntimeError(f"redis-server on {node.port} exited; see {self.directory}/{node.port}")
                try:
                    return bool(await client.ping())
                except (RedisError, OSError):
                    return False

            await poll(answers, what=f"redis-server on port {node.port}")
        finally:
            await client.aclose()

    async def ask(self, node: Node, *command: str) -> object:
        """One command to one node (not routed by the cluster)."""
        client = quick_redis(node.url)
        try:
            return await client.execute_command(*command)
        finally:
            await client.aclose()

    async def healthy(self) -> bool:
        """Every running node says cluster_state:ok and agrees on masters; every master has a synced replica."""
        try:
            topology = await self.topology()
            for node in self.nodes:
                if node.running:
                    info = await self.ask(node, "CLUSTER", "INFO")
                    if b"cluster_state:ok" not in _bytes(info):
                        return False
            for master in topology:
                replication = await self.ask(self.node(master), "INFO", "replication")
                assert isinstance(replication, dict)
                if replication.get("slave0", {}).get("state") != "online":
                    return False
        except (RedisError, OSError):
            return False
        return len(topology) == self.masters

    async def topology(self) -> dict[int, list[int]]:
        """Master port -> its replicas' ports, as a running node sees them."""
        running = next(n for n in self.nodes if n.running)
        raw = _bytes(await self.ask(running, "CLUSTER", "NODES")).decode()
        ids: dict[str, int] = {}
        masters: dict[int, list[int]] = {}
        lines = [line.split() for line in raw.splitlines() if line.strip()]
        for fields in lines:
            ids[fields[0]] = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        for fields in lines:
            flags = fields[2].split(",")
            if "fail" in flags or "fail?" in flags:
                continue
            port = ids[fields[0]]
            if "master" in flags and len(fields) > 8:  # a master serving slots
                masters.setdefault(port, [])
        for fields in lines:
            flags = fields[2].split(",")
            if "slave" in flags and "fail" not in flags and ids.get(fields[3]) in masters:
                masters[ids[fields[3]]].append(ids[fields[0]])
        return masters

    async def master_of(self, key: str) -> int:
        """The port of the master serving `key`'s slot."""
        slot = slot_of(key)
        running = next(n for n in self.nodes if n.running)
        for start, end, master, *_ in await self.ask(running, "CLUSTER", "SLOTS"):  # type: ignore[misc, union-attr]
            if start <= slot <= end:
                return int(master[1])
        raise LookupError(f"no master serves slot {slot}")

    async def failover(self, key: str) -> tuple[int, int]:
        """CLUSTER FAILOVER on a replica of `key`'s master; wait until the replica serves the slot.
        Returns (old master, new master)."""
        old = await self.master_of(key)
        new = (await self.topology())[old][0]
        await self.ask(self.node(new), "CLUSTER", "FAILOVER")
        await poll(lambda: self._serves(key, new), what=f"port {new} to take over {key!r}", every_s=0.05)
        return old, new

    async def kill_master(self, key: str) -> tuple[int, int]:
        """SIGKILL the master serving `key`; wait until one of its replicas serves the slot and the cluster is ok.
        Returns (killed master, new master)."""
        old = await self.master_of(key)
        replicas = (await self.topology())[old]
        node = self.node(old)
        assert node.process is not None
        node.process.kill()
        node.process.wait(DEADLINE_S)

        async def promoted() -> int | None:
            try:
                new = await self.master_of(key)
            except (RedisError, OSError, LookupError):
                return None
            return new if new in replicas and await self._ok() else None

        new: int = await poll(promoted, what=f"a replica of {old} to take over {key!r}", every_s=0.05)
        return old, new

    async def restart(self, port: int) -> None:
        """Start a killed node again (it rejoins as a replica of the master that replaced it)."""
        node = self.node(port)
        await self._spawn(node)
        await self._until_answers(node)
        await poll(self.healthy, what=f"port {port} to rejoin the cluster", every_s=0.1)

    async def _serves(self, key: str, port: int) -> bool:
        try:
            return await self.master_of(key) == port and await self._ok()
        except (RedisError, OSError, LookupError):
            return False

    async def _ok(self) -> bool:
        for node in self.nodes:
            if node.running:
                try:
                    if b"cluster_state:ok" not in _bytes(await self.ask(node, "CLUSTER", "INFO")):
                        return False
                except (RedisError, OSError):
                    return False
        return True

    def stop(self) -> None:
        """Kill every server still running and wait for each (cleanup; never leaves a process behind)."""
        for node in self.nodes:
            if node.running:
                assert node.process is not None
                with contextlib.suppress(ProcessLookupError):
                    node.process.kill()
        for node in self.nodes:
            if node.process is not None:
                node.process.wait(DEADLINE_S)
                node.process = None


def _bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise TypeError(f"unexpected reply {value!r}")


async def slots_of(cluster: RedisCluster, keys: Sequence[str]) -> set[int]:
    """The slots a running node computes for `keys` (CLUSTER KEYSLOT), to check the client's CRC16 against."""
    node = next(n for n in cluster.nodes if n.running)
    return {int(await cluster.ask(node, "CLUSTER", "KEYSLOT", key)) for key in keys}  # type: ignore[call-overload]
