"""Realtime spend lands in LiteLLM's own ledger, end to end (issue 14, "How it is shown"; docs/billing.md).

Real processes and databases: LiteLLM's schema built from its migrations (`litellm_db`) with a key, team,
user and organization seeded as LiteLLM leaves them; a fake LiteLLM admin API on a real socket that knows
the key; a throwaway `redis-server` (the stream name `realtime:usage` is fixed, so no shared Redis);
`sidecar serve` publishing usage to it; `sidecar consume` running the billing group (into PostgreSQL) and
the litellm group (into LiteLLM's database). Sessions come from the official openai SDK: one streams the
whole file and closes, one streams in real time across checkpoints and vanishes (TCP abort), one streams
half the file and closes. Nothing is slept on: every wait is a bounded poll of a condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import sys
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Mapping
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
import pytest
from openai import AsyncOpenAI

from sidecar.billing import RealtimeUsage, make_engine
from sidecar.testing.fake_litellm import FakeLiteLLM, LiteLLMServer
from sidecar.testing.fake_provider import FakeProvider
from tests.billing_support import (
    DEADLINE_S,
    MODEL,
    PacedStreamer,
    RedisServer,
    SidecarProcess,
    next_event,
    poll,
    read_billing,
    serve_env,
    stream_speech,
)
from tests.litellm_schema import Principal, seed_principal
from tests.relay_stack import MASTER_KEY
from tests.support import TRANSCRIBE

LEDGER_KEY = "sk-ledger-e2e-key-0001"
SESSIONS = 3
CHECKPOINT_S = "0.3"  # several interval checkpoints in the paced session: several SpendLogs rows
PACED_CHUNKS = 12  # 1.2 s of audio streamed in real time before the abort
Conn = psycopg.Connection[tuple[Any, ...]]


class ConsumeProcess:
    """`sidecar consume` (both groups) as a subprocess, with the given SIDECAR_* settings only."""

    def __init__(self, env: Mapping[str, str], *, workdir: Path) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        self.env = {**base, **env}
        self.workdir = workdir
        self.log = workdir / "consume.log"
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start it (it creates its groups and waits for its databases itself)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sidecar.cli", "consume", env=self.env, cwd=self.workdir, stdout=log, stderr=log
            )
        finally:
            os.close(log)

    def check_running(self) -> None:
        """Raise (with the log's tail) if it exited: a poll on its work would otherwise wait for nothing."""
        if self._process is not None and self._process.returncode is not None:
            raise RuntimeError(
                f"sidecar consume exited with {self._process.returncode}:\n{self.log.read_text()[-2000:]}"
            )

    async def terminate(self) -> int | None:
        """SIGTERM it and wait until it exits; its exit code."""
        if self._process is None:
            return None
        if self._process.returncode is None:
            os.kill(self._process.pid, signal.SIGTERM)
        async with asyncio.timeout(DEADLINE_S):
            return await self._process.wait()

    async def kill(self) -> None:
        """SIGKILL it if it still runs (cleanup)."""
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A throwaway redis-server: `sidecar serve` and `consume` use the fixed stream name realtime:usage."""
    server = RedisServer(tmp_path / "redis")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def principal(litellm_db: str) -> Principal:
    """LEDGER_KEY with its user, team and organization in LiteLLM's database, spend 0 everywhere."""
    with psycopg.connect(litellm_db, autocommit=True) as conn:
        return seed_principal(conn, key=LEDGER_KEY)


@pytest.fixture
async def litellm_api(principal: Principal) -> AsyncIterator[LiteLLMServer]:
    """LiteLLM's admin API on a real socket, answering /key/info for LEDGER_KEY as the seeded rows say."""
    fake = FakeLiteLLM(master_key=MASTER_KEY)
    fake.add_key(LEDGER_KEY, key_alias=principal.key_alias, user_id=principal.user_id, team_id=principal.team_id)
    fake.teams[principal.team_id] = {"team_alias": principal.team_id, "organization_id": principal.organization_id}
    async with LiteLLMServer(fake) as server:
        yield server


@contextlib.asynccontextmanager
async def running_stack(
    tmp_path: Path, provider: FakeProvider, *, redis_url: str, litellm_url: str, billing_url: str, litellm_db: str
) -> AsyncIterator[tuple[SidecarProcess, ConsumeProcess]]:
    """`sidecar serve` on Redis and `sidecar consume` with both sinks; stopped (SIGTERM, then SIGKILL) after."""
    serve = SidecarProcess(
        serve_env(tmp_path, provider, redis_url=redis_url, litellm_url=litellm_url, checkpoint_s=CHECKPOINT_S),
        workdir=tmp_path / "serve",
    )
    consume = ConsumeProcess(
        {
            "SIDECAR_REDIS_URL": redis_url,
            "SIDECAR_DATABASE_URL": billing_url,
            "SIDECAR_LITELLM_DATABASE_URL": litellm_db,
        },
        workdir=tmp_path / "consume",
    )
    await consume.start()
    try:
        await serve.start()
        try:
            yield serve, consume
        finally:
            assert await serve.terminate() == 0
    finally:
        try:
            assert await consume.terminate() == 0
        finally:
            await consume.kill()
            await serve.kill()


async def whole_file_then_close(client: AsyncOpenAI, audio: bytes) -> None:
    """Stream `audio`, wait for its transcript, close: a client_close session."""
    async with client.realtime.connect(model=MODEL, extra_query=TRANSCRIBE) as conn:
        await stream_speech(conn, audio)


async def paced_then_abort(client: AsyncOpenAI, audio: bytes) -> None:
    """Stream in real time across a few checkpoints, then drop TCP without a close frame: client_abort."""
    conn = await client.realtime.connect(model=MODEL, extra_query=TRANSCRIBE).enter()
    await next_event(conn, "session.created")
    streamer = PacedStreamer(conn, audio)
    streaming = asyncio.create_task(streamer.run())
    try:
        await streamer.reach(PACED_CHUNKS)
    finally:
        streaming.cancel()
        await asyncio.gather(streaming, return_exceptions=True)
    # The SDK reconnects only with an on_reconnecting callback (none here): the session just ends.
    conn._connection.transport.abort()


def billed_rows(billing_url: str) -> list[RealtimeUsage]:
    """The sidecar's own billing records (realtime_usage)."""
    engine = make_engine(billing_url)
    try:
        return read_billing(engine).rows
    finally:
        engine.dispose()


def applied_seqs(litellm_db: str) -> dict[str, int]:
    """The LiteLLM sink's marker rows: session -> last applied seq."""
    with psycopg.connect(litellm_db) as conn:
        rows = conn.execute("SELECT session_id, last_seq FROM realtime_sidecar.litellm_sessions").fetchall()
    return {str(r[0]): int(r[1]) for r in rows}


async def settled(billing_url: str, litellm_db: str, consume: ConsumeProcess) -> list[RealtimeUsage] | None:
    """Every session billed final, and the litellm group has applied each one's final seq; else None."""
    consume.check_running()
    rows = await asyncio.to_thread(billed_rows, billing_url)
    if len(rows) < SESSIONS or any(r.status != "final" for r in rows):
        return None
    with contextlib.suppress(psycopg.errors.UndefinedTable):  # the sink creates its marker table on start
        applied = await asyncio.to_thread(applied_seqs, litellm_db)
        if all(applied.get(r.session_id) == r.last_seq for r in rows):
            return rows
    return None


def one(conn: Conn, query: str, *params: object) -> Any:
    """The single value `query` returns."""
    row = conn.execute(query, params).fetchone()
    assert row is not None, query
    return row[0]


def same_spend(got: float, expected: float) -> bool:
    """Equal to float precision (LiteLLM's spend columns are double precision; a few rows were summed)."""
    return math.isclose(got, expected, rel_tol=1e-12, abs_tol=1e-15)


async def test_sessions_land_in_litellms_ledger_once(
    tmp_path: Path,
    speech_pcm16: bytes,
    redis_server: RedisServer,
    litellm_api: LiteLLMServer,
    principal: Principal,
    litellm_db: str,
    pg_url: str,
) -> None:
    """Three real sessions (closed, aborted, closed): LiteLLM's SpendLogs, spend and daily rows match the bill."""
    async with FakeProvider() as provider:
        async with running_stack(
            tmp_path, provider, redis_url=redis_server.url, litellm_url=litellm_api.url, billing_url=pg_url,
            litellm_db=litellm_db,
        ) as (serve, consume):  # fmt: skip
            client = AsyncOpenAI(base_url=f"{serve.http}/v1", api_key=LEDGER_KEY, max_retries=0)
            await whole_file_then_close(client, speech_pcm16)
            await paced_then_abort(client, speech_pcm16)
            await whole_file_then_close(client, speech_pcm16[: len(speech_pcm16) // 2])
            rows = await poll(
                lambda: settled(pg_url, litellm_db, consume),
                what="three sessions billed and applied to LiteLLM's ledger",
                every_s=0.1,
            )

    assert Counter(r.close_reason for r in rows) == {"client_close": 2, "client_abort": 1}
    assert {r.key_hash for r in rows} == {principal.key_hash}
    billed = {r.session_id: float(r.cost_usd) for r in rows}
    total = sum(billed.values())
    assert all(cost > 0 for cost in billed.values())

    with psycopg.connect(litellm_db, autocommit=True) as conn:
        logs = conn.execute(
            'SELECT request_id, session_id, call_type, api_key, spend FROM "LiteLLM_SpendLogs"'
        ).fetchall()
        per_session: dict[str, float] = defaultdict(float)
        for request_id, session_id, call_type, api_key, spend in logs:
            assert (call_type, api_key) == ("_arealtime", principal.key_hash), request_id
            assert request_id.startswith(f"{session_id}:"), request_id
            per_session[session_id] += spend
        assert set(per_session) == set(billed)
        for session_id, cost in billed.items():
            assert same_spend(per_session[session_id], cost), session_id
        # Published in order and read by one consumer: every usage event of a session is one row, seq 1..last.
        expected_ids = {f"{r.session_id}:{seq}" for r in rows for seq in range(1, r.last_seq + 1)}
        assert {request_id for request_id, *_ in logs} == expected_ids

        for table, column, value in (
            ("LiteLLM_VerificationToken", "token", principal.key_hash),
            ("LiteLLM_TeamTable", "team_id", principal.team_id),
            ("LiteLLM_UserTable", "user_id", principal.user_id),
            ("LiteLLM_OrganizationTable", "organization_id", principal.organization_id),
            ("LiteLLM_TeamMembership", "team_id", principal.team_id),
            ("LiteLLM_OrganizationMembership", "organization_id", principal.organization_id),
        ):
            spend = one(conn, f'SELECT spend FROM "{table}" WHERE {column} = %s', value)
            assert same_spend(spend, total), (table, spend, total)
        key_total = one(
            conn, 'SELECT total_spend FROM "LiteLLM_VerificationToken" WHERE token = %s', principal.key_hash
        )
        assert same_spend(key_total, total)

        by_date: dict[date, list[str]] = defaultdict(list)
        for r in rows:
            by_date[r.started_at.date()].append(r.session_id)
        for table, column, value in (
            ("LiteLLM_DailyUserSpend", "user_id", principal.user_id),
            ("LiteLLM_DailyTeamSpend", "team_id", principal.team_id),
            ("LiteLLM_DailyOrganizationSpend", "organization_id", principal.organization_id),
        ):
            daily = conn.execute(
                f'SELECT date, spend, api_requests, successful_requests, api_key, model FROM "{table}"'
                f" WHERE {column} = %s",
                (value,),
            ).fetchall()
            assert {d for d, *_ in daily} == {d.isoformat() for d in by_date}, table
            for day, spend, requests, successful, api_key, model in daily:
                sessions = by_date[date.fromisoformat(day)]
                assert same_spend(spend, sum(billed[s] for s in sessions)), (table, day)
                assert (requests, successful, api_key, model) == (
                    len(sessions),
                    len(sessions),
                    principal.key_hash,
                    MODEL,
                )
