"""`sidecar consume` with the LiteLLM sink as a real process, and `sidecar ledger status`: real Redis (a throwaway
server: the command uses the fixed stream name realtime:usage) and LiteLLM's real schema."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis.asyncio as aioredis

from sidecar import cli
from sidecar.billing import make_engine
from sidecar.billing.consumer import LITELLM_GROUP
from sidecar.config import Settings
from sidecar.ledger.writer import BATCH_MAX
from sidecar.testing.factories import usage_event
from tests.billing_support import DEADLINE_S, RedisServer, poll
from tests.test_ledger_consumer import assert_charged_once, principal_of, publish, session_events, spend_log_ids


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A throwaway redis-server: `sidecar consume` uses the fixed stream name realtime:usage."""
    server = RedisServer(tmp_path / "redis")
    await server.start()
    yield server
    await server.stop()


class ConsumeProcess:
    """`sidecar consume ARGS` as a subprocess (SIDECAR_* from `env` only), logging to a file."""

    def __init__(self, env: dict[str, str], *args: str, workdir: Path) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        self.env, self.args, self.log = {**base, **env}, args, workdir / f"consume-{len(list(workdir.iterdir()))}.log"
        self.workdir = workdir
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sidecar.cli", "consume", *self.args, env=self.env, cwd=self.workdir,
                stdout=fd, stderr=fd,
            )  # fmt: skip
        finally:
            os.close(fd)

    @property
    def name(self) -> str:
        """Its consumer name in the groups (`<hostname>-<pid>`)."""
        assert self.process is not None
        return f"{socket.gethostname()}-{self.process.pid}"

    async def signal(self, signum: int) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signum)
        async with asyncio.timeout(DEADLINE_S):
            return await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


@pytest.fixture
async def processes(tmp_path: Path) -> AsyncIterator[list[ConsumeProcess]]:
    """Started consumers, killed at the end if still running."""
    started: list[ConsumeProcess] = []
    yield started
    for process in started:
        await process.stop()


async def spawn(started: list[ConsumeProcess], env: dict[str, str], *args: str, workdir: Path) -> ConsumeProcess:
    await asyncio.to_thread(workdir.mkdir, exist_ok=True)
    process = ConsumeProcess(env, *args, workdir=workdir)
    await process.start()
    started.append(process)
    return process


async def test_sigkill_between_commit_and_ack_then_another_consumer_changes_no_total(
    redis_server: RedisServer, litellm_db: str, tmp_path: Path, processes: list[ConsumeProcess]
) -> None:
    """A real `sidecar consume --sink litellm` is SIGKILLed after some SpendLogs rows committed while every entry
    is still pending (a row lock held by the test stalls the batch's second transaction: the sink commits BATCH_MAX
    events a transaction, a's fill the first); the next consumer leaves every total exact."""
    a, b = principal_of(litellm_db, 1), principal_of(litellm_db, 2)
    first, second = session_events(a, "rs_a", seqs=BATCH_MAX), session_events(b, "rs_b")
    everything = len(first) + len(second)
    redis = aioredis.Redis.from_url(redis_server.url)
    env = {"SIDECAR_REDIS_URL": redis_server.url, "SIDECAR_LITELLM_DATABASE_URL": litellm_db,
           "SIDECAR_DB_TIMEOUT_S": "60"}  # fmt: skip
    try:
        await redis.xgroup_create("realtime:usage", LITELLM_GROUP, id="0", mkstream=True)
        with psycopg.connect(litellm_db) as holder:  # b's team row locked: b's events wait inside the batch
            holder.execute('SELECT 1 FROM "LiteLLM_TeamTable" WHERE team_id = %s FOR UPDATE', (b.team_id,))
            await publish(redis, "realtime:usage", first + second)
            doomed = await spawn(processes, env, "--sink", "litellm", workdir=tmp_path / "run")
            await poll(lambda: _rows(litellm_db, len(first)), what="a's SpendLogs rows committed")
            assert (await redis.xpending("realtime:usage", LITELLM_GROUP))["pending"] == everything  # none acked
            assert await doomed.signal(9) == -9
            assert (await redis.xpending("realtime:usage", LITELLM_GROUP))["pending"] == everything
            holder.rollback()
        ids = [entry_id for entry_id, _ in await redis.xrange("realtime:usage")]
        # As if the dead consumer's entries had waited past the claim time (30 s): the next one takes them at once.
        await redis.xclaim("realtime:usage", LITELLM_GROUP, doomed.name, 0, ids, idle=3_600_000)
        await spawn(processes, env, "--sink", "litellm", workdir=tmp_path / "run")
        await poll(lambda: _pending_zero(redis), what="the next consumer's ack of every entry")
    finally:
        await redis.aclose()
    assert_charged_once(litellm_db, a, [first[-1]])
    assert_charged_once(litellm_db, b, [second[-1]])
    assert len(spend_log_ids(litellm_db)) == everything


async def _rows(dsn: str, count: int) -> bool:
    return len(await asyncio.to_thread(spend_log_ids, dsn)) >= count


async def _pending_zero(redis: aioredis.Redis) -> bool:
    return int((await redis.xpending("realtime:usage", LITELLM_GROUP))["pending"]) == 0


async def test_consume_runs_both_groups_and_serves_metrics(
    redis_server: RedisServer, litellm_db: str, tmp_path: Path, processes: list[ConsumeProcess]
) -> None:
    """Without --sink and with LiteLLM's database set, one process runs billing and litellm; after each commit the
    proxy's cache invalidations are published (namespaced); /metrics shows the sink's counters; `sidecar ledger
    status --json` shows both groups caught up; SIGTERM exits 0."""
    p = principal_of(litellm_db)
    events = session_events(p, "rs_both")
    port = _free_port()
    env = {
        "SIDECAR_REDIS_URL": redis_server.url,
        "SIDECAR_LITELLM_DATABASE_URL": litellm_db,
        "SIDECAR_DATABASE_URL": f"sqlite:///{tmp_path / 'billing.db'}",
        "SIDECAR_CONSUME_METRICS_PORT": str(port),
        "SIDECAR_LITELLM_REDIS_URL": redis_server.url,  # the proxy's Redis (here the same server)
        "SIDECAR_LITELLM_REDIS_NAMESPACE": "proxy-ns",
    }
    redis = aioredis.Redis.from_url(redis_server.url)
    pubsub = redis.pubsub()
    await pubsub.subscribe("proxy-ns:litellm_proxy.auth_cache_invalidation")
    assert (await pubsub.get_message(timeout=DEADLINE_S))["type"] == "subscribe"
    try:
        process = await spawn(processes, env, workdir=tmp_path / "run")
        await publish(redis, "realtime:usage", events)
        await poll(lambda: _both_acked(redis), what="both groups acknowledging every entry")
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
        status = _cli("ledger", "status", "--json", env=env)
        assert await process.signal(15) == 0
        invalidated = await _messages(pubsub)
    finally:
        await pubsub.aclose()
        await redis.aclose()
    assert {"cache_key": p.key_hash} in invalidated
    assert 'sidecar_ledger_events_total{outcome="applied"} 3.0' in metrics
    assert "sidecar_ledger_schema_ready 1.0" in metrics
    assert "sidecar_ledger_apply_seconds_count 3.0" in metrics
    assert_charged_once(litellm_db, p, [events[-1]])
    report = json.loads(status.stdout)
    assert status.returncode == 0, status.stderr
    assert report["groups"]["billing"]["pending"] == report["groups"]["litellm"]["pending"] == 0
    assert report["litellm_ledger"]["sessions_applied"] == 1
    assert report["litellm_ledger"]["missing_required"] == []
    log = process.log.read_text()
    assert "billing consumer" in log and "litellm consumer" in log


async def _messages(pubsub: Any) -> list[Any]:
    """The messages already published to the subscription (their data as JSON)."""
    found = []
    while message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5):
        found.append(json.loads(message["data"]))
    return found


async def _both_acked(redis: aioredis.Redis) -> bool:
    groups = {g["name"]: g for g in await redis.xinfo_groups("realtime:usage")}
    return len(groups) == 2 and all(g["pending"] == 0 and g["lag"] == 0 for g in groups.values())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---- the command line ------------------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    return subprocess.run(
        [sys.executable, "-m", "sidecar.cli", *args], env={**base, **env}, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["consume", "--sink", "litellm"], {"SIDECAR_REDIS_URL": "redis://127.0.0.1:1/0"},
         "sidecar: sidecar consume --sink litellm needs SIDECAR_LITELLM_DATABASE_URL"),
        (["consume", "--sink", "ledger"], {}, "argument --sink: must be billing or litellm, got 'ledger'"),
        (["consume"], {"SIDECAR_REDIS_URL": "redis://127.0.0.1:1/0", "SIDECAR_LITELLM_DATABASE_URL": "mysql://db/x"},
         "SIDECAR_LITELLM_DATABASE_URL must start with postgresql:// or postgres://"),
        (["consume"], {"SIDECAR_REDIS_URL": "redis://127.0.0.1:1/0", "SIDECAR_LITELLM_REDIS_URL": "http://r"},
         "SIDECAR_LITELLM_REDIS_URL must start with redis://"),
        (["consume"], {"SIDECAR_REDIS_URL": "redis://127.0.0.1:1/0", "SIDECAR_CONSUME_METRICS_PORT": "70000"},
         "SIDECAR_CONSUME_METRICS_PORT must be a TCP port"),
        (["consume"], {"SIDECAR_REDIS_URL": "redis://127.0.0.1:1/0",
                       "SIDECAR_LITELLM_DATABASE_URL": "postgresql://u:s3cret@db/x?sslmod=require"},
         'SIDECAR_LITELLM_DATABASE_URL is not a PostgreSQL URL libpq takes: invalid URI query parameter: "sslmod"'),
        (["ledger", "status"], {}, "sidecar: sidecar ledger status needs SIDECAR_REDIS_URL"),
    ],
    ids=["litellm-without-url", "unknown-sink", "not-postgres", "proxy-redis-not-redis", "bad-port", "libpq-refuses",
         "status-no-redis"],
)  # fmt: skip
def test_misconfiguration_is_one_line_and_exit_2(args: list[str], env: dict[str, str], message: str) -> None:
    """Each misconfiguration of consume and ledger status: exit 2 and one line naming the problem, no traceback."""
    result = _cli(*args, env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "s3cret" not in result.stderr


async def test_ledger_status_shows_pending_dead_letters_and_the_schema(
    redis_server: RedisServer, litellm_db: str
) -> None:
    """Pending entries with their age and dead letters per group; from LiteLLM's DB a missing required table."""
    p = principal_of(litellm_db)
    redis = aioredis.Redis.from_url(redis_server.url)
    try:
        await redis.xgroup_create("realtime:usage", LITELLM_GROUP, id="0", mkstream=True)
        await publish(redis, "realtime:usage", session_events(p, "rs_s"))
        await redis.xreadgroup(LITELLM_GROUP, "reader", {"realtime:usage": ">"}, count=2)
        await redis.xadd("realtime:usage:dead", {"reason": "r", "original_id": "1-0", "group": "litellm"})
        await redis.xadd("realtime:usage:dead", {"reason": "r", "original_id": "2-0"})  # before groups were named
    finally:
        await redis.aclose()
    with psycopg.connect(litellm_db, autocommit=True) as admin:
        admin.execute('ALTER TABLE "LiteLLM_EndUserTable" RENAME TO "hidden_end_users"')
    env = {"SIDECAR_REDIS_URL": redis_server.url, "SIDECAR_LITELLM_DATABASE_URL": litellm_db}
    result = _cli("ledger", "status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    litellm, billing = report["groups"]["litellm"], report["groups"]["billing"]
    assert (litellm["exists"], litellm["pending"], litellm["lag"], litellm["dead_letters"]) == (True, 2, 1, 1)
    assert litellm["oldest_pending_age_s"] >= 0
    assert (billing["exists"], billing["dead_letters"]) == (False, 1)
    ledger = report["litellm_ledger"]
    assert ledger["missing_required"] == ["table LiteLLM_EndUserTable"]
    assert (ledger["sessions_applied"], ledger["last_applied_at"]) == (0, None)
    text = _cli("ledger", "status", env=env)
    assert text.returncode == 0, text.stderr
    assert "REFUSED, missing table LiteLLM_EndUserTable" in text.stdout
    assert "(no such group)" in text.stdout


def test_ledger_status_reports_an_unreachable_redis_with_exit_1() -> None:
    """Redis not answering: the groups cannot be read, said on stderr, exit 1."""
    result = _cli("ledger", "status", env={"SIDECAR_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.returncode == 1
    assert "sidecar: cannot read Redis" in result.stderr
    assert "Traceback" not in result.stderr


async def test_one_group_failing_leaves_the_other_running(
    redis_client: aioredis.Redis, redis_url: str, usage_stream: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The litellm group dies of a bug (here: a URL libpq refuses, which `consume` checks first in real use); the
    billing group goes on billing, and the process then exits 1."""
    settings = Settings(
        litellm_config=tmp_path / "unused.yaml",
        redis_url=redis_url,
        usage_stream=usage_stream,
        litellm_database_url="postgresql://127.0.0.1:1/x?bogus=1",
    )
    engine = make_engine(f"sqlite:///{tmp_path / 'billing.db'}")
    await publish(redis_client, usage_stream, [usage_event("rs_1", 1), usage_event("rs_1", 2, final=True)])
    with caplog.at_level(logging.ERROR, logger="sidecar.cli"):
        task = asyncio.create_task(cli._consume(settings, ("billing", "litellm"), engine, None))
        await poll(lambda: _billing_acked(redis_client, usage_stream), what="the billing group's acks")
        assert not task.done()
        os.kill(os.getpid(), signal.SIGTERM)  # `_consume` stops on SIGTERM, as `sidecar consume` does
        assert await task == 1
    engine.dispose()
    assert "a consumer group failed; the others go on" in caplog.text


async def _billing_acked(redis: aioredis.Redis, stream: str) -> bool:
    groups = {g["name"]: g for g in await redis.xinfo_groups(stream)} if await redis.exists(stream) else {}
    billing = groups.get(b"billing")
    return billing is not None and billing["pending"] == 0 and billing["lag"] == 0


async def test_consume_probes_litellms_schema_at_start(
    redis_server: RedisServer, litellm_db: str, tmp_path: Path, processes: list[ConsumeProcess]
) -> None:
    """With nothing to consume yet, `consume --sink litellm` already probes: a missing required table is a warning
    naming it and `sidecar_ledger_schema_ready` 0; SIGTERM still exits 0."""
    with psycopg.connect(litellm_db, autocommit=True) as admin:
        admin.execute('ALTER TABLE "LiteLLM_OrganizationTable" RENAME TO "hidden_orgs"')
    port = _free_port()
    env = {
        "SIDECAR_REDIS_URL": redis_server.url,
        "SIDECAR_LITELLM_DATABASE_URL": litellm_db,
        "SIDECAR_CONSUME_METRICS_PORT": str(port),
    }
    process = await spawn(processes, env, "--sink", "litellm", workdir=tmp_path / "run")
    await poll(lambda: _logged(process, "lacks table LiteLLM_OrganizationTable"), what="the start-up probe's warning")
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    assert await process.signal(15) == 0
    assert "sidecar_ledger_schema_ready 0.0" in metrics
    assert "billing consumer" not in process.log.read_text()


async def _logged(process: ConsumeProcess, needle: str) -> bool:
    return needle in await asyncio.to_thread(process.log.read_text)
