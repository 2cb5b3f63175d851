"""A throwaway Sentinel group on loopback for the failover tests: a master, a replica and three sentinels
(`redis-server --sentinel`), each a real process on a free port, with tight sentinel timeouts.

`SentinelGroup.start()` returns once the replica is in sync and every sentinel knows the replica and the
two other sentinels (so a failover can be agreed). `failover()` runs SENTINEL FAILOVER; `kill_master()`
SIGKILLs the master and lets the sentinels agree it is down. Both return once every sentinel names the
new master and it answers as master. Every wait is a bounded poll of the processes' own state (INFO,
SENTINEL commands), never a sleep. `stop()` kills whatever still runs and waits for each process to exit.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from tests.billing_support import DEADLINE_S, free_port, poll

SERVICE = "mymaster"
DOWN_AFTER_MS = 600  # the sentinels call an unanswering master down after this long
FAILOVER_TIMEOUT_MS = 3000


class RedisNode:
    """One `redis-server` process (a data node or, with `sentinel_config`, a sentinel) on 127.0.0.1:`port`."""

    def __init__(
        self,
        directory: Path,
        *,
        args: list[str],
        sentinel_config: str | None = None,
        password: str | None = None,
        tls: Path | None = None,
    ) -> None:
        self.directory = directory
        self.port = free_port()
        self.args = args
        self.sentinel_config = sentinel_config
        self.password = password  # its requirepass (the tests' clients authenticate with it)
        self.tls = tls  # a directory with ca.crt, server.crt and server.key: TLS only, replication included
        self.process: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def client(self, db: int = 0) -> aioredis.Redis:
        """A client of database `db` that fails at once while the node is down (one immediate retry, short timeouts)."""
        auth = f":{self.password}@" if self.password else ""
        scheme, tls = ("rediss", {"ssl_ca_certs": str(self.tls / "ca.crt")}) if self.tls else ("redis", {})
        url = f"{scheme}://{auth}127.0.0.1:{self.port}/{db}"
        return aioredis.Redis.from_url(
            url, retry=Retry(NoBackoff(), 1), socket_connect_timeout=2, socket_timeout=5, **tls
        )

    def _tls_options(self) -> list[str]:
        if self.tls is None:
            return [f"port {self.port}"]
        files = {"cert": "server.crt", "key": "server.key", "ca-cert": "ca.crt"}
        return [
            "port 0",
            f"tls-port {self.port}",
            *(f"tls-{name}-file {self.tls / file}" for name, file in files.items()),
            "tls-auth-clients no",
            "tls-replication yes",
        ]

    async def start(self) -> None:
        """Start the process and wait until it answers PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.sentinel_config is not None:
            config = self.directory / "sentinel.conf"  # a sentinel rewrites its own config file
            options = "\n".join(self._tls_options())
            config.write_text(f"{options}\nbind 127.0.0.1\ndir {self.directory}\n{self.sentinel_config}")
            argv = [str(config), "--sentinel", "--logfile", "sentinel.log"]
        else:
            argv = []
            for option in self._tls_options():
                argv += [f"--{option.split(' ', 1)[0]}", option.split(" ", 1)[1]]
            argv += ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            argv += ["--dir", str(self.directory), "--logfile", "redis.log", "--repl-diskless-sync-delay", "0"]
            argv += ["--requirepass", self.password, "--masterauth", self.password] if self.password else []
            argv += self.args
        self.process = await asyncio.create_subprocess_exec("redis-server", *argv, stdout=subprocess.DEVNULL)
        client = self.client()
        try:
            await poll(lambda: self._answers(client), what=f"redis-server on port {self.port} ({self.directory.name})")
        finally:
            await client.aclose()

    async def _answers(self, client: aioredis.Redis) -> bool:
        if self.process is not None and self.process.returncode is not None:
            raise RuntimeError(f"redis-server exited with {self.process.returncode}; see {self.directory}")
        try:
            return bool(await client.ping())
        except (RedisError, OSError):
            return False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def kill(self) -> None:
        """SIGKILL the process if it runs, and wait until it is gone."""
        if self.process is None:
            return
        if self.process.returncode is None:
            self.process.kill()
        async with asyncio.timeout(DEADLINE_S):
            await self.process.wait()


class SentinelGroup:
    """A master, one replica and three sentinels monitoring them as `mymaster` (quorum 2); with `password` the
    data nodes require it, with `sentinel_password` the sentinels require theirs (and use it with each other)."""

    def __init__(
        self,
        directory: Path,
        *,
        password: str | None = None,
        sentinel_password: str | None = None,
        tls: Path | None = None,
    ) -> None:
        first = RedisNode(directory / "node-a", args=[], password=password, tls=tls)
        replica = RedisNode(
            directory / "node-b", args=["--replicaof", "127.0.0.1", str(first.port)], password=password, tls=tls
        )
        self.nodes = [first, replica]
        monitor = (
            f"sentinel monitor {SERVICE} 127.0.0.1 {first.port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        if password:
            monitor += f"sentinel auth-pass {SERVICE} {password}\n"
        if sentinel_password:
            monitor += f"requirepass {sentinel_password}\nsentinel sentinel-pass {sentinel_password}\n"
        self.sentinels = [
            RedisNode(
                directory / f"sentinel-{i}", args=[], sentinel_config=monitor, password=sentinel_password, tls=tls
            )
            for i in range(3)
        ]

    @property
    def sentinel_nodes(self) -> str:
        """SIDECAR_REDIS_SENTINEL_NODES for this group."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def settings(self) -> dict[str, str]:
        """The `SIDECAR_*` settings that point a sidecar at this group (as serve_env's keyword arguments)."""
        return {"redis_sentinel_nodes": self.sentinel_nodes, "redis_service_name": SERVICE}

    async def start(self) -> None:
        """Start every process; return once the group can fail over (replica in sync, sentinels acquainted)."""
        try:
            for node in [*self.nodes, *self.sentinels]:
                await node.start()
            await self.until_replicated(self.nodes[0])
            await poll(self._acquainted, what="three sentinels that know each other and the replica")
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Kill every process still running (cleanup; nothing is left behind)."""
        for node in [*self.sentinels, *self.nodes]:
            await node.kill()

    def node_at(self, port: int) -> RedisNode:
        return next(node for node in self.nodes if node.port == port)

    async def master(self) -> RedisNode:
        """The node the first answering sentinel names master."""
        return self.node_at((await self._masters())[0])

    async def failover(self) -> RedisNode:
        """SENTINEL FAILOVER (the old master is demoted, not stopped): the new master once every sentinel names
        it and it answers as master, and the demoted one replicates from it."""
        old = await self.master()
        client = self.sentinels[0].client()
        try:
            await client.execute_command("SENTINEL", "FAILOVER", SERVICE)
        finally:
            await client.aclose()
        new = await self._until_moved_from(old)
        await self.until_replicated(new)
        return new

    async def kill_master(self) -> RedisNode:
        """SIGKILL the master: the new master once the sentinels agreed it is down and promoted the replica."""
        old = await self.master()
        await self.until_replicated(old)  # a replica too far behind is not promoted
        await old.kill()
        return await self._until_moved_from(old)

    async def restart(self, node: RedisNode) -> None:
        """Start a killed node again as the current master's replica; return once it is in sync."""
        master = await self.master()
        node.args = ["--replicaof", "127.0.0.1", str(master.port)]
        await node.start()
        await self.until_replicated(master)

    async def until_replicated(self, master: RedisNode) -> None:
        """Wait until every other running node is `master`'s replica with its link up."""
        replicas = [node for node in self.nodes if node is not master and node.running]

        async def check() -> bool:
            for node in replicas:
                client = node.client()
                try:
                    info = await client.info("replication")
                except (RedisError, OSError):
                    return False
                finally:
                    await client.aclose()
                if (info.get("role"), info.get("master_port"), info.get("master_link_status")) != (
                    "slave",
                    master.port,
                    "up",
                ):
                    return False
            return True

        await poll(check, what=f"the replicas of port {master.port} in sync")

    async def _until_moved_from(self, old: RedisNode) -> RedisNode:
        async def moved() -> int | None:
            ports = await self._masters()
            if len(ports) != len([s for s in self.sentinels if s.running]) or len(set(ports)) != 1:
                return None
            port = ports[0]
            if port == old.port or not await self._is_master(self.node_at(port)):
                return None
            return port

        return self.node_at(await poll(moved, what=f"a new master instead of port {old.port}", every_s=0.1))

    async def _masters(self) -> list[int]:
        """The master's port as each running sentinel names it."""
        ports = []
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            client = sentinel.client()
            try:
                host_port = await client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
            except (RedisError, OSError):
                continue
            finally:
                await client.aclose()
            if host_port:
                ports.append(int(host_port[1]))
        return ports

    async def _is_master(self, node: RedisNode) -> bool:
        client = node.client()
        try:
            role = await client.execute_command("ROLE")
        except (RedisError, OSError):
            return False
        finally:
            await client.aclose()
        return bool(role) and role[0] in (b"master", "master")

    async def _acquainted(self) -> bool:
        for sentinel in self.sentinels:
            client = sentinel.client()
            try:
                state = await client.execute_command("SENTINEL", "MASTER", SERVICE)
            except (RedisError, OSError):
                return False
            finally:
                await client.aclose()
            fields = dict(zip(state[::2], state[1::2], strict=True)) if isinstance(state, list) else state
            fields = {_text(k): _text(v) for k, v in fields.items()}
            if fields.get("num-other-sentinels") != "2" or fields.get("num-slaves") != "1":
                return False
        return True


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
