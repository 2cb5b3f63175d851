"""The LiteLLM sink's benchmark: events per second into LiteLLM's real schema, and the lag to SpendLogs.

    python -m bench.ledger [--sessions 2000] [--checkpoints 4] [--workers 1,2] [--batches 1,200] [--repeats 3]
                           [--pipeline off|on|both] [--no-consume] [--lag-sessions 100] [--lag-repeats 3]
                           [--no-throughput] [--no-lag]

Throughput: LiteLLM's schema is built once from the `litellm-proxy-extras` migrations
(sidecar.testing.litellm_schema) in a scratch database used as a template; each run gets a fresh clone,
the sink's tables (`ensure_sink_tables`) and a few seeded principals (a key, its user, team and
organization each). `sessions` sessions of `checkpoints` checkpoints and a final, cumulative figures,
interleaved as a stream holds them (every session's seq 1, then every seq 2, ...), are applied with
`sidecar.ledger.apply_many`, `--batches` events a transaction (1: one event per transaction; 200: the
sink's BATCH_MAX), from 1 and from 2 worker processes with a connection each (a session's events always
go to the same worker, in order, as they arrive seconds apart in production), optionally inside psycopg's
pipeline mode (`--pipeline`; the writer pipelines its writes itself). The time runs from the start barrier
to the last commit; afterwards every figure is checked (one SpendLogs row per event, per-session sums
equal to the finals, entity and daily totals, one request per session). The same sessions also go
through a real `sidecar consume --sink litellm` (`run_consume_throughput`: XREADGROUP of 500 entries, the
sink's connection writing them 200 a transaction, the budget settles and cache invalidations after each
commit, XACK), one process.

Lag: a real `sidecar consume --sink litellm` (SIDECAR_LITELLM_DATABASE_URL on a fresh clone, SIDECAR_REDIS_URL
on `--lag-redis-url`, a database without realtime:* keys since the stream name realtime:usage is fixed) reads
`lag-sessions` concurrent sessions that XADD their events as a sidecar publishes them (seq 1 at a random
start within one interval, a checkpoint every `lag-checkpoint-s`, then the final). A watcher reads
SpendLogs every `poll-ms`; a session's lag is from just before its final XADD to the first poll that sees
that final's row (`<session_id>:<seq>`), so it is at most `poll-ms` late. One warm-up session first (the
consumer connects and probes LiteLLM's schema on its first write), reported apart.

Prints a markdown table per part and one JSON line with every run. Scratch databases and streams have
fresh names and are dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import queue
import random
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any, Final

import psycopg
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from bench.procs import Proc, Procs
from sidecar.billing.consumer import LITELLM_GROUP
from sidecar.config import DEFAULT_USAGE_STREAM
from sidecar.ledger import LedgerSchema, ensure_sink_tables, probe
from sidecar.ledger.writer import BATCH_MAX, apply_many
from sidecar.testing.litellm_schema import Principal, apply_migrations, seed_principal
from sidecar.usage import UsageEvent

PG_ADMIN_DSN: Final = "postgresql://postgres@127.0.0.1:5432/test"
PRINCIPALS: Final = 4
DEADLINE_S: Final = 300.0
CONTROL_PREFIX: Final = "realtime"  # the sidecar's Redis prefix: the stream realtime:usage, budget counters
RESULTS: Final = Path(__file__).resolve().parent / "results"
CHECKPOINT_S: Final = 5
PRICE_PER_SECOND: Final = Decimal("0.000283333333333")  # gpt-realtime-whisper in LiteLLM's price map
Conn = psycopg.Connection[tuple[Any, ...]]


# ---- scratch databases ----------------------------------------------------------------------------------


def _dsn(admin_dsn: str, database: str) -> str:
    return f"{admin_dsn.rsplit('/', 1)[0]}/{database}"


@contextlib.contextmanager
def database(admin_dsn: str, *, template: str | None = None) -> Iterator[str]:
    """A fresh database (a clone of `template` when given), as a DSN; dropped afterwards."""
    name = f"sidecar_bench_ledger_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{clause}')
    try:
        yield _dsn(admin_dsn, name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def litellm_template(admin_dsn: str) -> Iterator[str]:
    """LiteLLM's schema built once from its migrations; yields the database's name (left idle for TEMPLATE)."""
    with database(admin_dsn) as dsn:
        apply_migrations(dsn)
        yield dsn.rsplit("/", 1)[1]


def seed(conn: Conn, count: int = PRINCIPALS) -> list[Principal]:
    """`count` principals, each a key with its own user, team and organization; the sink's tables."""
    ensure_sink_tables(conn)
    return [
        seed_principal(
            conn,
            key=f"sk-bench-{i}",
            key_alias=f"bench-key-{i}",
            user_id=f"bench-user-{i}",
            team_id=f"bench-team-{i}",
            organization_id=f"bench-org-{i}",
        )
        for i in range(count)
    ]


# ---- events -----------------------------------------------------------------------------------------------


def session_events(session_id: str, p: Principal, *, checkpoints: int, started: datetime) -> list[UsageEvent]:
    """One session: `checkpoints` checkpoints of 5 s of audio each, then the final (cumulative figures)."""
    events = []
    for seq in range(1, checkpoints + 2):
        final = seq == checkpoints + 1
        seconds = Decimal(CHECKPOINT_S * seq)
        events.append(
            UsageEvent(
                event_id=UsageEvent.new_id(), type="final" if final else "checkpoint", session_id=session_id,
                seq=seq, key_hash=p.key_hash, key_alias=p.key_alias, user_id=p.user_id, team_id=p.team_id,
                model="gpt-realtime-whisper", provider_model="openai/gpt-realtime-whisper",
                kind="realtime-transcription", unit="second", quantity=seconds, audio_seconds=seconds,
                audio_bytes=48_000 * CHECKPOINT_S * seq, input_tokens=0, output_tokens=0,
                cost_usd=(seconds * PRICE_PER_SECOND).quantize(Decimal("1e-10")), started_at=started,
                ended_at=started + timedelta(seconds=CHECKPOINT_S * seq) if final else None,
                close_reason="client_close" if final else "",
            )
        )  # fmt: skip
    return events


def sessions(count: int, principals: Sequence[Principal], *, checkpoints: int) -> list[list[UsageEvent]]:
    """`count` sessions spread round-robin over the principals."""
    started = datetime.now(UTC)
    return [
        session_events(f"rs_{uuid.uuid4().hex}", principals[i % len(principals)], checkpoints=checkpoints,
                       started=started)
        for i in range(count)
    ]  # fmt: skip


def interleaved(group: Sequence[list[UsageEvent]]) -> list[UsageEvent]:
    """The sessions' events as a stream holds concurrent sessions: every seq 1, then every seq 2, ..."""
    return [s[i] for i in range(max(map(len, group), default=0)) for s in group if i < len(s)]


# ---- throughput ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    """One throughput run."""

    workers: int
    pipeline: bool
    sessions: int
    events: int
    seconds: float
    events_per_s: float
    applied: int
    skipped: int
    verified: bool
    via: str = "apply"
    batch: int = 1


def _worker(
    dsn: str,
    schema: LedgerSchema,
    events: list[UsageEvent],
    start: Barrier,
    done: Queue[Any],
    *,
    pipeline: bool,
    batch: int,
) -> None:
    """One worker process: its own connection, its events in order, `batch` a transaction; reports (kinds, end time)."""
    kinds = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        start.wait()
        for at in range(0, len(events), batch):
            with conn.pipeline() if pipeline else contextlib.nullcontext():
                outcomes = apply_many(conn, schema, events[at : at + batch], now=datetime.now(UTC))
            kinds += [o.kind for o in outcomes]
        done.put((kinds, time.perf_counter()))  # CLOCK_MONOTONIC: comparable across processes


def run_throughput(
    dsn: str, *, workers: int, sessions_count: int, checkpoints: int, pipeline: bool, batch: int = BATCH_MAX
) -> Throughput:
    """Apply `sessions_count` sessions from `workers` processes (one connection each), `batch` events a transaction,
    into the database at `dsn`.

    Processes, not threads: the writer spends most of its time in Python (psycopg), so threads would
    measure the GIL; and a second `sidecar consume` is a second process. Forked, so the events are
    inherited, not pickled.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        principals = seed(conn)
        schema = probe(conn)
    group = sessions(sessions_count, principals, checkpoints=checkpoints)
    shares = [interleaved(group[w::workers]) for w in range(workers)]
    ctx = multiprocessing.get_context("fork")
    start, done = ctx.Barrier(workers + 1), ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker, args=(dsn, schema, share, start, done), kwargs={"pipeline": pipeline, "batch": batch}
        )
        for share in shares
    ]
    for p in procs:
        p.start()
    try:
        start.wait(timeout=DEADLINE_S)
        began = time.perf_counter()
        reports = [_report(done, procs) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=DEADLINE_S)
            if p.is_alive():
                p.kill()
    seconds = max(end for _, end in reports) - began
    kinds = [kind for k, _ in reports for kind in k]
    events = sum(map(len, shares))
    return Throughput(
        workers=workers,
        pipeline=pipeline,
        sessions=sessions_count,
        events=events,
        seconds=round(seconds, 3),
        events_per_s=round(len(kinds) / seconds, 1),
        applied=kinds.count("applied"),
        skipped=kinds.count("skipped"),
        verified=verify(dsn, group, principals) and len(kinds) == events,
        batch=batch,
    )


def _report(done: Queue[Any], procs: Sequence[multiprocessing.process.BaseProcess]) -> Any:
    """The next worker's report; raises as soon as a worker died without one (or at the deadline)."""
    deadline = time.perf_counter() + DEADLINE_S
    while time.perf_counter() < deadline:
        with contextlib.suppress(queue.Empty):
            return done.get(timeout=0.5)
        if any(p.exitcode for p in procs):
            raise RuntimeError(f"a worker failed: exit codes {[p.exitcode for p in procs]}")
    raise TimeoutError("the workers did not finish")


def verify(
    dsn: str, group: Sequence[list[UsageEvent]], principals: Sequence[Principal], *, others: bool = False
) -> bool:
    """Every event one SpendLogs row; each session's rows sum to its final cost; each principal's entity and
    daily totals (pass none when `others`: other sessions, e.g. a warm-up, also wrote rows)."""
    finals = {s[-1].session_id: s[-1] for s in group}
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            'SELECT session_id, count(*), sum(spend) FROM "LiteLLM_SpendLogs" GROUP BY session_id'
        ).fetchall()
        by_session = {r[0]: (int(r[1]), float(r[2])) for r in rows}
        found = set(by_session) & set(finals) if others else set(by_session)
        ok = found == set(finals) and all(
            count == finals[sid].seq and math.isclose(spend, float(finals[sid].cost_usd), rel_tol=1e-9)
            for sid, (count, spend) in by_session.items()
            if sid in finals
        )
        for p in principals:
            expected = sum(float(e.cost_usd) for e in finals.values() if e.key_hash == p.key_hash)
            requests = sum(1 for e in finals.values() if e.key_hash == p.key_hash)
            for table, column, value in (
                ("LiteLLM_VerificationToken", "token", p.key_hash),
                ("LiteLLM_TeamTable", "team_id", p.team_id),
                ("LiteLLM_UserTable", "user_id", p.user_id),
                ("LiteLLM_OrganizationTable", "organization_id", p.organization_id),
            ):
                row = conn.execute(f'SELECT spend FROM "{table}" WHERE {column} = %s', (value,)).fetchone()
                ok = ok and row is not None and math.isclose(row[0], expected, rel_tol=1e-9)
            row = conn.execute(
                'SELECT sum(api_requests), sum(spend) FROM "LiteLLM_DailyTeamSpend" WHERE team_id = %s', (p.team_id,)
            ).fetchone()
            ok = ok and row is not None and row[0] == requests and math.isclose(row[1], expected, rel_tol=1e-9)
    return ok


def measure_throughput(
    admin_dsn: str,
    *,
    template: str,
    workers: Sequence[int],
    pipelines: Sequence[bool],
    repeats: int,
    sessions_count: int,
    checkpoints: int,
    batches: Sequence[int] = (BATCH_MAX,),
) -> list[Throughput]:
    """`repeats` rounds of every (workers, batch, pipeline) case, interleaved, each run in a fresh clone of the
    template."""
    runs = []
    for _ in range(repeats):
        for w in workers:
            for batch in batches:
                for pipeline in pipelines:
                    with database(admin_dsn, template=template) as dsn:
                        run = run_throughput(
                            dsn, workers=w, sessions_count=sessions_count, checkpoints=checkpoints,
                            pipeline=pipeline, batch=batch,
                        )  # fmt: skip
                    print(f"  {asdict(run)}", file=sys.stderr)
                    runs.append(run)
    return runs


def throughput_table(runs: Sequence[Throughput]) -> str:
    """A markdown table: per case, events/s median, min and max over the runs."""
    lines = [
        "| path | connections | events a transaction | psycopg pipeline | runs | events per run | events/s median |"
        " min | max | verified |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for case in sorted({(r.via, r.workers, r.batch, r.pipeline) for r in runs}):
        mine = [r for r in runs if (r.via, r.workers, r.batch, r.pipeline) == case]
        rates = [r.events_per_s for r in mine]
        lines.append(
            f"| {case[0]} | {case[1]} | {case[2]} | {'yes' if case[3] else 'no'} | {len(mine)} | {mine[0].events} |"
            f" {statistics.median(rates):,.0f} | {min(rates):,.0f} | {max(rates):,.0f} |"
            f" {all(r.verified for r in mine)} |"
        )
    return "\n".join(lines)


# ---- lag ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lag:
    """One lag run: per session, the time from its final XADD to its SpendLogs row being visible."""

    sessions: int
    events: int
    lags_ms: list[float]
    warmup_ms: float
    poll_ms: float

    def quantile(self, q: float) -> float:
        """The `q` quantile (nearest rank) of the lags, in ms."""
        ordered = sorted(self.lags_ms)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def _redis_is_ours(redis: aioredis.Redis) -> None:
    """Refuse a Redis database that already holds the sidecar's keys: the stream name is fixed."""
    taken = [k async for k in redis.scan_iter(match=f"{CONTROL_PREFIX}:*", count=1000)]
    if taken:
        raise SystemExit(f"{len(taken)} {CONTROL_PREFIX}:* keys already in this Redis database; pick --lag-redis-url")


async def _clear(redis: aioredis.Redis) -> None:
    keys = [k async for k in redis.scan_iter(match=f"{CONTROL_PREFIX}:*", count=1000)]
    if keys:
        await redis.delete(*keys)


async def _until(check: Any, *, what: str, every_s: float, deadline_s: float = 60.0) -> Any:
    deadline = time.perf_counter() + deadline_s
    while not (result := await check()):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        await asyncio.sleep(every_s)
    return result


async def _group_exists(redis: aioredis.Redis) -> bool:
    with contextlib.suppress(ResponseError):  # no stream yet
        groups = await redis.xinfo_groups(DEFAULT_USAGE_STREAM)
        return any(g["name"] in (LITELLM_GROUP, LITELLM_GROUP.encode()) for g in groups)
    return False


class _Watcher:
    """Polls SpendLogs for the final rows awaited; records when each becomes visible (perf_counter)."""

    def __init__(self, conn: psycopg.AsyncConnection[tuple[Any, ...]], *, every_s: float) -> None:
        self.conn = conn
        self.every_s = every_s
        self.waiting: set[str] = set()
        self.seen: dict[str, float] = {}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set() or self.waiting:
            if self.waiting:
                cur = await self.conn.execute(
                    'SELECT request_id FROM "LiteLLM_SpendLogs" WHERE request_id = ANY(%s)', (list(self.waiting),)
                )
                now = time.perf_counter()
                for (request_id,) in await cur.fetchall():
                    self.waiting.discard(request_id)
                    self.seen[request_id] = now
            await asyncio.sleep(self.every_s)


async def _session(
    redis: aioredis.Redis,
    events: list[UsageEvent],
    watcher: _Watcher,
    finals: dict[str, float],
    *,
    offset_s: float,
    checkpoint_s: float,
) -> None:
    """Publish one session's events as a sidecar does: seq 1 at its start, a checkpoint each interval, the final."""
    await asyncio.sleep(offset_s)
    for event in events[:-1]:
        await redis.xadd(DEFAULT_USAGE_STREAM, event.to_fields())  # type: ignore[arg-type]
        await asyncio.sleep(checkpoint_s)
    final = events[-1]
    request_id = f"{final.session_id}:{final.seq}"
    watcher.waiting.add(request_id)
    finals[request_id] = time.perf_counter()
    await redis.xadd(DEFAULT_USAGE_STREAM, final.to_fields())  # type: ignore[arg-type]


@dataclass
class _Running:
    """A warmed-up `sidecar consume --sink litellm` and what the bench drives it with."""

    redis: aioredis.Redis
    consumer: Proc
    principals: list[Principal]
    watcher: _Watcher
    watch_conn: psycopg.AsyncConnection[tuple[Any, ...]]
    warmup_ms: float


@contextlib.asynccontextmanager
async def consuming(dsn: str, redis_url: str, *, log_dir: Path, poll_s: float) -> AsyncIterator[_Running]:
    """Seed the LiteLLM database at `dsn`, start `sidecar consume --sink litellm` on it, warm it up with one
    session (it connects, creates its tables and probes LiteLLM's schema on its first entry), and watch
    SpendLogs; everything stopped and the Redis keys deleted afterwards."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        principals = seed(conn)
    # Blocking: thousands of sessions publishing at once wait for one of a few connections instead of failing.
    redis = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=32))
    await _redis_is_ours(redis)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env |= {"SIDECAR_REDIS_URL": redis_url, "SIDECAR_LITELLM_DATABASE_URL": dsn}
    try:
        async with Procs(log_dir, env=env, cwd=Path.cwd()) as procs:
            consumer = await procs.start(
                "consume-litellm", [sys.executable, "-m", "sidecar.cli", "consume", "--sink", "litellm"]
            )
            await _until(lambda: _group_exists(redis), what="the litellm consumer group", every_s=0.05)
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as watch_conn:
                watcher = _Watcher(watch_conn, every_s=poll_s)
                stop = asyncio.Event()
                watching = asyncio.create_task(watcher.run(stop))
                warm: dict[str, float] = {}
                await _session(redis, sessions(1, principals, checkpoints=0)[0], watcher, warm, offset_s=0,
                               checkpoint_s=0)  # fmt: skip
                await _until(lambda: _done(watcher, warm, consumer.running), what="the warm-up row", every_s=0.01)
                ((warm_id, warm_t),) = warm.items()
                warmup_ms = round((watcher.seen[warm_id] - warm_t) * 1000, 2)
                try:
                    yield _Running(redis, consumer, principals, watcher, watch_conn, warmup_ms)
                finally:
                    stop.set()
                    await watching
    finally:
        await _clear(redis)
        await redis.aclose()


async def run_lag(
    dsn: str,
    redis_url: str,
    *,
    sessions_count: int,
    checkpoints: int,
    checkpoint_s: float,
    log_dir: Path,
    poll_s: float,
) -> Lag:
    """One `sidecar consume --sink litellm` on a fresh LiteLLM database; `sessions_count` concurrent sessions."""
    async with consuming(dsn, redis_url, log_dir=log_dir, poll_s=poll_s) as run:
        group = sessions(sessions_count, run.principals, checkpoints=checkpoints)
        finals: dict[str, float] = {}
        await asyncio.gather(
            *(
                _session(run.redis, events, run.watcher, finals, offset_s=random.uniform(0, checkpoint_s),
                         checkpoint_s=checkpoint_s)
                for events in group
            )
        )  # fmt: skip
        await _until(
            lambda: _done(run.watcher, finals, run.consumer.running),
            what="every final row",
            every_s=0.05,
            deadline_s=DEADLINE_S,
        )
    return Lag(
        sessions=sessions_count,
        events=sum(map(len, group)),
        lags_ms=[round((run.watcher.seen[r] - t) * 1000, 2) for r, t in finals.items()],
        warmup_ms=run.warmup_ms,
        poll_ms=poll_s * 1000,
    )


async def run_consume_throughput(
    dsn: str, redis_url: str, *, sessions_count: int, checkpoints: int, log_dir: Path
) -> Throughput:
    """Events/s through a real `sidecar consume --sink litellm` (XREADGROUP, apply, budget settle, XACK):
    the sessions' events XADDed at once (pipelined) into the stream it reads; timed from the first XADD
    to the poll (every 10 ms) that counts every SpendLogs row."""
    async with consuming(dsn, redis_url, log_dir=log_dir, poll_s=0.01) as run:
        group = sessions(sessions_count, run.principals, checkpoints=checkpoints)
        events = interleaved(group)
        expected = len(events) + 1  # and the warm-up's row
        began = time.perf_counter()
        for at in range(0, len(events), 1000):
            async with run.redis.pipeline(transaction=False) as pipe:
                for event in events[at : at + 1000]:
                    pipe.xadd(DEFAULT_USAGE_STREAM, event.to_fields())  # type: ignore[arg-type]
                await pipe.execute()

        async def all_rows() -> bool:
            if not run.consumer.running:
                raise RuntimeError("sidecar consume exited")
            cur = await run.watch_conn.execute('SELECT count(*) FROM "LiteLLM_SpendLogs"')
            row = await cur.fetchone()
            return row is not None and row[0] >= expected

        await _until(all_rows, what="every SpendLogs row", every_s=0.01, deadline_s=DEADLINE_S)
        seconds = time.perf_counter() - began
    return Throughput(
        workers=1,
        pipeline=False,
        sessions=sessions_count,
        events=len(events),
        seconds=round(seconds, 3),
        events_per_s=round(len(events) / seconds, 1),
        applied=len(events),
        skipped=0,
        verified=verify(dsn, group, [], others=True),
        via="sidecar consume",
        batch=BATCH_MAX,
    )


async def _done(watcher: _Watcher, finals: dict[str, float], running: bool) -> bool:
    if not running:
        raise RuntimeError("sidecar consume exited")
    return all(r in watcher.seen for r in finals)


def lag_table(runs: Sequence[Lag]) -> str:
    """A markdown table: one row per run, then all runs pooled."""
    lines = [
        "| run | sessions | events | lag p50 (ms) | p90 | p99 | max | first event after start (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    pooled = Lag(0, 0, [x for r in runs for x in r.lags_ms], 0.0, runs[0].poll_ms) if runs else None
    for name, r in [*((str(i + 1), r) for i, r in enumerate(runs)), ("all", pooled)]:
        if r is None:
            continue
        n, ev = (
            (r.sessions, r.events) if name != "all" else (sum(x.sessions for x in runs), sum(x.events for x in runs))
        )
        warm = f"{r.warmup_ms:,.0f}" if name != "all" else "-"
        lines.append(
            f"| {name} | {n} | {ev} | {r.quantile(0.5):,.1f} | {r.quantile(0.9):,.1f} | {r.quantile(0.99):,.1f} |"
            f" {max(r.lags_ms):,.1f} | {warm} |"
        )
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark; tables on stdout, then one JSON line."""
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(prog="python -m bench.ledger", description=doc.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=2000, help="sessions per throughput run")
    parser.add_argument("--checkpoints", type=int, default=4, help="checkpoints per session (then a final)")
    parser.add_argument("--workers", default="1,2", help="connection (process) counts, comma-separated")
    parser.add_argument("--batches", default=f"1,{BATCH_MAX}", help="events a transaction, comma-separated")
    parser.add_argument(
        "--pipeline", choices=("off", "on", "both"), default="off", help="apply inside conn.pipeline() (psycopg)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per throughput case")
    parser.add_argument(
        "--no-consume", dest="consume", action="store_false", help="no throughput run through sidecar consume"
    )
    parser.add_argument("--lag-sessions", type=int, default=100, help="concurrent sessions per lag run")
    parser.add_argument("--lag-checkpoints", type=int, default=3, help="checkpoints per lag session")
    parser.add_argument("--lag-checkpoint-s", type=float, default=1.0, help="seconds between a session's events")
    parser.add_argument("--lag-repeats", type=int, default=3, help="lag runs")
    parser.add_argument("--poll-ms", type=float, default=5.0, help="how often the lag watcher reads SpendLogs")
    parser.add_argument(
        "--lag-redis-url",
        default="redis://127.0.0.1:6379/13",
        help="a Redis database without realtime:* keys (the stream name is fixed); its realtime:* keys are deleted",
    )
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--no-lag", action="store_true")
    parser.add_argument("--pg-dsn", default=PG_ADMIN_DSN, help="an admin DSN; scratch databases are made beside it")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {}
    log_dir = RESULTS / f"ledger-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    log_dir.mkdir(parents=True, exist_ok=True)
    with litellm_template(args.pg_dsn) as template:
        if not args.no_throughput:
            runs = measure_throughput(
                args.pg_dsn,
                template=template,
                workers=[int(w) for w in args.workers.split(",") if w],
                batches=[int(b) for b in args.batches.split(",") if b],
                pipelines={"off": [False], "on": [True], "both": [False, True]}[args.pipeline],
                repeats=args.repeats,
                sessions_count=args.sessions,
                checkpoints=args.checkpoints,
            )
            for _ in range(args.repeats if args.consume else 0):
                with database(args.pg_dsn, template=template) as dsn:
                    run = asyncio.run(
                        run_consume_throughput(
                            dsn,
                            args.lag_redis_url,
                            sessions_count=args.sessions,
                            checkpoints=args.checkpoints,
                            log_dir=log_dir,
                        )
                    )
                print(f"  {asdict(run)}", file=sys.stderr)
                runs.append(run)
            result["throughput"] = [asdict(r) for r in runs]
            print("Throughput: events applied into LiteLLM's schema\n")
            print(throughput_table(runs) + "\n")
        if not args.no_lag:
            lags = []
            for _ in range(args.lag_repeats):
                with database(args.pg_dsn, template=template) as dsn:
                    lag = asyncio.run(
                        run_lag(
                            dsn,
                            args.lag_redis_url,
                            sessions_count=args.lag_sessions,
                            checkpoints=args.lag_checkpoints,
                            checkpoint_s=args.lag_checkpoint_s,
                            log_dir=log_dir,
                            poll_s=args.poll_ms / 1000,
                        )
                    )
                print(f"  lag run: p50 {lag.quantile(0.5)} ms, p99 {lag.quantile(0.99)} ms", file=sys.stderr)
                lags.append(lag)
            result["lag"] = [asdict(r) for r in lags]
            print(
                "Lag: a session's final XADD to its SpendLogs row visible, `sidecar consume --sink litellm`"
                f" (SpendLogs polled every {args.poll_ms:g} ms)\n"
            )
            print(lag_table(lags) + "\n")
    result["logs"] = str(log_dir)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
