"""The real processes a chaos row or the soak runs against, and the levers that break them.

Processes go through `bench.procs.Procs` (own process group, stopped at the end whatever happens):
redis-server, `sidecar serve`, `sidecar consume` and the provider (`bench.chaos.provider`, in a network
namespace for the network faults). The billing database is PostgreSQL at 127.0.0.1:5432 in a database of
its own (`sidecar_chaos`, `sidecar_soak`), dropped and created at the start of a run, so tests never see it.
`TcpProxy` sits between a process and Redis or PostgreSQL: it can refuse connections, black-hole them, or
drop the first chunk carrying a given command (and call back: the consumer is killed between its commit and
its XACK). `Netns` puts the provider behind a veth pair whose link can be cut or throttled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
import psycopg
import redis.asyncio as aioredis
import yaml
from redis.exceptions import RedisError

from bench.procs import Proc, Procs, free_port
from sidecar.auth import hash_key
from sidecar.testing.fake_provider import DEFAULT_API_KEY

MODEL: Final = "gpt-realtime-whisper"
MASTER_KEY: Final = "sk-chaos-master-key"
PG_ADMIN_DSN: Final = os.environ.get("CHAOS_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
PG_HOST: Final = "127.0.0.1"
PG_PORT: Final = 5432
READY_S: Final = 30.0
PY: Final = sys.executable


async def poll(
    check: Callable[[], Awaitable[Any]], *, what: str, every_s: float = 0.1, deadline_s: float = READY_S
) -> Any:
    """Call `check()` until it returns something truthy (another process's state: nothing to await).

    Raises TimeoutError naming `what` after `deadline_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        await asyncio.sleep(every_s)


# ---- PostgreSQL -------------------------------------------------------------------------------------


def fresh_database(name: str) -> None:
    """Drop and create database `name` on the shared PostgreSQL (never `test` or a test's database)."""
    assert name.startswith("sidecar_chaos") or name.startswith("sidecar_soak"), name
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    from sidecar.billing import make_engine, upgrade

    engine = make_engine(database_url(name))
    upgrade(engine)
    engine.dispose()


def database_url(name: str, *, port: int = PG_PORT) -> str:
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return f"{base.rsplit(':', 1)[0]}:{port}/{name}"


@dataclass(frozen=True)
class BilledKey:
    """A key's billing rows: their audio bytes summed, how many, and their statuses."""

    audio_bytes: int
    rows: int
    statuses: tuple[str, ...]
    close_reasons: tuple[str, ...] = ()


def billed_by_key(name: str) -> dict[str, BilledKey]:
    """Every key hash's realtime_usage rows in database `name` (direct, never through a proxy)."""
    dsn = PG_ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    query = (
        "SELECT key_hash, sum(audio_bytes), count(*), string_agg(status, ',' ORDER BY status), "
        "string_agg(coalesce(close_reason, ''), ',' ORDER BY close_reason) FROM realtime_usage GROUP BY key_hash"
    )
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(query).fetchall()
    return {k: BilledKey(int(b), int(n), tuple(s.split(",")), tuple(c.split(","))) for k, b, n, s, c in rows}


STREAM: Final = "realtime:usage"


async def group_backlog(redis_url: str) -> int | None:
    """Entries of the billing group pending or not yet delivered (None when Redis or the group cannot be read)."""
    client = aioredis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=5)
    try:
        return await backlog_of(client)
    finally:
        await client.aclose()


async def backlog_of(client: Any, stream: str = STREAM, group: str = "billing") -> int | None:
    """`group_backlog` through any client (single, Sentinel master, cluster); the caller closes it."""
    try:
        groups = await client.xinfo_groups(stream)
    except (RedisError, OSError):
        return None
    for info in groups:
        name = info.get("name")
        if name in (group, group.encode()):
            return int(info.get("pending") or 0) + int(info.get("lag") or 0)
    return None


# ---- redis-server -----------------------------------------------------------------------------------


class RedisServer:
    """A throwaway redis-server on its own port with an append-only file (kill -9 keeps what it answered)."""

    def __init__(self, procs: Procs, directory: Path) -> None:
        self.procs = procs
        self.directory = directory
        self.port = free_port()
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, *, empty: bool = False) -> None:
        """Start it (on its data unless `empty`) and wait until it answers PING."""
        if empty:
            shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.directory)]
        args += ["--appendonly", "yes", "--logfile", "redis.log"]
        self.proc = await self.procs.start(f"redis-{self.port}", ["redis-server", *args])
        client = self.client()
        try:
            await poll(lambda: _pings(client), what=f"redis-server on port {self.port}")
        finally:
            await client.aclose()

    def client(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=5)

    async def kill(self) -> None:
        """SIGKILL (the AOF keeps every write it answered) and wait for the exit."""
        await _signal_and_wait(self.proc, signal.SIGKILL)

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)


async def _pings(client: aioredis.Redis) -> bool:
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False


async def _signal_and_wait(proc: Proc | None, signum: signal.Signals) -> None:
    if proc is None or not proc.running:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signum)
    async with asyncio.timeout(READY_S):
        await proc.process.wait()


# ---- the provider -----------------------------------------------------------------------------------


class ProviderProcess:
    """`bench.chaos.provider` (optionally inside a network namespace), driven through its stdin."""

    def __init__(self, procs: Procs, *, host: str = "127.0.0.1", netns: str | None = None) -> None:
        self.procs = procs
        self.host = host
        self.netns = netns
        self.url = ""
        self.proc: Proc | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        command = [PY, "-m", "bench.chaos.provider", "--host", self.host]
        if self.netns is not None:
            command = ["ip", "netns", "exec", self.netns, *command]
        log = self.procs.log_dir / "provider.log"
        with log.open("ab") as sink:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=sink,
                env=self.procs.env,
                cwd=self.procs.cwd,
                start_new_session=True,
            )
        self.proc = Proc("provider", process, log)
        self.procs.started.append(self.proc)
        assert process.stdout is not None
        async with asyncio.timeout(READY_S):
            line = await process.stdout.readline()
        if not line.startswith(b"ws://"):
            raise RuntimeError(f"the provider did not start: {line!r}\n{self.proc.tail()}")
        self.url = line.decode().strip()

    async def command(self, word: str) -> dict[str, Any]:
        """Send one command and read its JSON answer."""
        assert self.proc is not None
        process = self.proc.process
        assert process.stdin is not None and process.stdout is not None
        async with self._lock, asyncio.timeout(READY_S):
            process.stdin.write(word.encode() + b"\n")
            await process.stdin.drain()
            answer: dict[str, Any] = json.loads(await process.stdout.readline())
        return answer

    async def decoded(self) -> dict[str, int]:
        """Bytes decoded per client tag so far."""
        report = await self.command("report")
        return {str(k): int(v) for k, v in report["decoded"].items()}


# ---- sidecar serve / sidecar consume ----------------------------------------------------------------


def litellm_config(path: Path, provider_url: str) -> Path:
    """A LiteLLM config serving gpt-realtime-whisper from the fake provider, with the chaos master key."""
    entry = {
        "model_name": MODEL,
        "litellm_params": {"model": f"openai/{MODEL}", "api_base": provider_url, "api_key": DEFAULT_API_KEY},
        "model_info": {"mode": "audio_transcription"},
    }
    path.write_text(yaml.safe_dump({"model_list": [entry], "general_settings": {"master_key": MASTER_KEY}}))
    return path


class Sidecar:
    """`sidecar serve` on a fixed port (so a restarted one is dialled at the same address)."""

    def __init__(self, procs: Procs, env: Mapping[str, str]) -> None:
        self.procs = procs
        self.port = free_port()
        self.env = {**env, "SIDECAR_HOST": "127.0.0.1", "SIDECAR_PORT": str(self.port)}
        self.proc: Proc | None = None
        self.starts = 0

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Start it and wait until /readyz answers 200."""
        self.starts += 1
        self.proc = await self.procs.start(f"sidecar-{self.starts}", [PY, "-m", "sidecar.cli", "serve"], env=self.env)
        async with httpx.AsyncClient(base_url=self.http, timeout=2.0) as http:
            await poll(lambda: self._ready(http), what="sidecar /readyz")

    async def _ready(self, http: httpx.AsyncClient) -> bool:
        if self.proc is not None and not self.proc.running:
            raise RuntimeError(f"sidecar exited with {self.proc.process.returncode}:\n{self.proc.tail()}")
        try:
            return (await http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def kill(self) -> None:
        await _signal_and_wait(self.proc, signal.SIGKILL)

    async def metrics(self) -> str:
        async with httpx.AsyncClient(base_url=self.http, timeout=5.0) as http:
            return (await http.get("/metrics")).text


class Consumer:
    """`sidecar consume` (the billing group); each start is a new process, so a new consumer name."""

    def __init__(self, procs: Procs, env: Mapping[str, str]) -> None:
        self.procs = procs
        self.env = dict(env)
        self.proc: Proc | None = None
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        self.proc = await self.procs.start(
            f"consumer-{self.starts}", [PY, "-m", "sidecar.cli", "consume"], env=self.env
        )

    async def kill(self) -> None:
        await _signal_and_wait(self.proc, signal.SIGKILL)

    def kill_now(self) -> None:
        """SIGKILL without waiting (from a proxy callback)."""
        if self.proc is not None and self.proc.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


def key_hash(key: str) -> str:
    return hash_key(key)


# ---- a TCP proxy with faults ------------------------------------------------------------------------


class TcpProxy:
    """127.0.0.1:`port` -> `target`: forwards, refuses (nothing listens, live connections reset), or black-holes
    (connections accepted, nothing forwarded either way; on healing the held connections are reset).

    `intercept(chunk)` sees each chunk the client sends; when it returns True the chunk is dropped and the
    connection reset (used once: the consumer's first XACK, see run.py)."""

    def __init__(self, target_host: str, target_port: int, *, intercept: Callable[[bytes], bool] | None = None) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.intercept = intercept
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)

    async def refuse(self) -> None:
        """Stop listening and reset every live connection: the client sees connection refused."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self._reset_all()

    async def blackhole(self) -> None:
        """Accept, forward nothing: the client waits until its own timeout."""
        self._flowing.clear()

    async def heal(self) -> None:
        """Listen and forward again; connections held by a black hole are reset (their state is gone)."""
        if not self._flowing.is_set():
            self._reset_all()
            self._flowing.set()
        if self._server is None:
            await self.start()

    async def aclose(self) -> None:
        """Stop listening, reset every connection and wait for their handlers to end."""
        self._flowing.set()
        await self.refuse()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    def _reset_all(self) -> None:
        for writer in list(self._writers):
            transport = writer.transport
            if isinstance(transport, asyncio.Transport):
                transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            self._tasks.discard(task)
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, self.intercept, writer), self._pipe(up_reader, writer, None, up_writer)
            )
        finally:
            for w in (writer, up_writer):
                w.transport.abort()
                self._writers.discard(w)
            self._tasks.discard(task)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        intercept: Callable[[bytes], bool] | None,
        source: asyncio.StreamWriter,
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await reader.read(65536):
                await self._flowing.wait()
                if source not in self._writers:
                    return  # reset meanwhile
                if intercept is not None and intercept(chunk):
                    source.transport.abort()
                    writer.transport.abort()
                    return
                writer.write(chunk)
                await writer.drain()
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()


# ---- network namespace ------------------------------------------------------------------------------

NETNS: Final = "chaos-provider"
VETH_HOST: Final = "chaos-v0"
VETH_NS: Final = "chaos-v1"
HOST_IP: Final = "10.77.0.1"
NS_IP: Final = "10.77.0.2"


async def sh(*command: str) -> tuple[int, str]:
    """Run a command; (exit status, stderr+stdout)."""
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await process.communicate()
    return process.returncode or 0, out.decode(errors="replace").strip()


class Netns:
    """The provider's network namespace, joined to this one by a veth pair (10.77.0.1 <-> 10.77.0.2)."""

    async def create(self) -> str | None:
        """Create it; None when it works, else why not."""
        await self.delete()
        steps = [
            ("ip", "netns", "add", NETNS),
            ("ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS),
            ("ip", "link", "set", VETH_NS, "netns", NETNS),
            ("ip", "addr", "add", f"{HOST_IP}/30", "dev", VETH_HOST),
            ("ip", "link", "set", VETH_HOST, "up"),
            ("ip", "netns", "exec", NETNS, "ip", "addr", "add", f"{NS_IP}/30", "dev", VETH_NS),
            ("ip", "netns", "exec", NETNS, "ip", "link", "set", VETH_NS, "up"),
            ("ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up"),
        ]
        for step in steps:
            status, out = await sh(*step)
            if status != 0:
                await self.delete()
                return f"`{' '.join(step)}` failed: {out}"
        return None

    async def netem_missing(self) -> str | None:
        """None when `tc qdisc ... netem` works here, else the reason (tc's own words)."""
        status, out = await sh("tc", "qdisc", "add", "dev", VETH_HOST, "root", "netem", "delay", "1ms")
        if status == 0:
            await sh("tc", "qdisc", "del", "dev", VETH_HOST, "root")
            return None
        return f"tc qdisc netem: {out.splitlines()[0] if out else status} (kernel {os.uname().release} lacks sch_netem)"

    async def link(self, *, up: bool) -> None:
        """Cut (down) or restore (up) the link: packets either way are dropped while it is down."""
        status, out = await sh("ip", "link", "set", VETH_HOST, "up" if up else "down")
        if status != 0:
            raise RuntimeError(out)

    async def throttle(self, rate: str | None) -> None:
        """A token bucket (tc tbf) on the sidecar's side of the link, or none."""
        if rate is None:
            await sh("tc", "qdisc", "del", "dev", VETH_HOST, "root")
            return
        status, out = await sh(
            "tc", "qdisc", "replace", "dev", VETH_HOST, "root", "tbf", "rate", rate, "burst", "32kb", "latency", "2s"
        )
        if status != 0:
            raise RuntimeError(out)

    async def delete(self) -> None:
        await sh("ip", "link", "del", VETH_HOST)
        await sh("ip", "netns", "del", NETNS)


def base_env(work: Path) -> dict[str, str]:
    """The environment every process of a run starts from: no SIDECAR_* of the caller's, the local price map."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return env
