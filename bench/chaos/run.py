"""`make chaos`: the fault matrix against real processes, one fresh stack per fault, and the billing per session.

    .venv/bin/python -m bench.chaos.run [--faults all|name,name] [--sessions 6] [--checkpoint-s 1]
                                        [--out bench/results] [--docs yes|no] [--list]

Each row: a throwaway redis-server (append-only file; the Sentinel and Cluster rows use issue 18's fixtures,
bench/chaos/ha.py), the fake provider (`bench.chaos.provider`; in its own network namespace for the network
rows), `sidecar serve` (Redis mode, checkpoints every --checkpoint-s) and `sidecar consume` into PostgreSQL
(database `sidecar_chaos`, through TCP proxies this process controls), a fake LiteLLM admin API with one key per
client session. Wave A (--sessions clients, openai SDK, the test speech looped at real-time pace) runs across the
fault; wave B (half as many) starts just after it is injected. Once every client is done the row waits for
billing to settle (the sidecar's spool empty, every session's rows final or lost, nothing pending in the group),
then compares per session: sent by the client, decoded by the provider, billed in `realtime_usage`
(bench/chaos/tally.py).

Loopback only (the netns veth pair is local), bounded (each wait has a deadline), a few minutes. Exit status 1
when any row's invariant fails, 2 on bad arguments. The table is printed, written to --out, and (with
--docs yes, the default) put in docs/reliability.md between its chaos markers.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

from bench.chaos import tally
from bench.chaos.clients import ClientSession, run_session, speech_chunks
from bench.chaos.ha import HaRedis, start_ha
from bench.chaos.stack import (
    MASTER_KEY,
    NETNS,
    NS_IP,
    Consumer,
    Netns,
    ProviderProcess,
    RedisServer,
    Sidecar,
    TcpProxy,
    base_env,
    billed_by_key,
    database_url,
    fresh_database,
    group_backlog,
    key_hash,
    litellm_config,
    poll,
)
from bench.procs import Procs
from sidecar.testing.fake_litellm import FakeLiteLLM, LiteLLMServer

REPO: Final = Path(__file__).resolve().parents[2]
DOCS: Final = REPO / "docs" / "reliability.md"
BEGIN: Final = "<!-- chaos:begin (bench/chaos/run.py writes this section) -->"
END: Final = "<!-- chaos:end -->"
DATABASE: Final = "sidecar_chaos"
LEAD_S: Final = 3.0  # wave A streams this long before the fault
TAIL_S: Final = 4.0  # and this long after it heals
SETTLE_S: Final = 75.0  # a killed consumer's entries are reclaimed after 30 s idle (XAUTOCLAIM)
DB_TIMEOUT_S: Final = 3.0
LOST_AFTER_S: Final = 4.0
REDIS_PUBLISH_TIMEOUT_S: Final = 10.0  # sidecar/publisher.py DEFAULT_REDIS_TIMEOUT_S (serve's publisher)
CUT_ALLOWANCE: Final = Decimal("0.5")  # audio in flight when a connection is cut (5 appends at real-time pace)


@dataclass
class Ctx:
    """One row's stack, handed to its fault."""

    procs: Procs
    redis: RedisServer | None
    provider: ProviderProcess
    sidecar: Sidecar
    consumer: Consumer
    pg_proxy: TcpProxy
    redis_proxy: TcpProxy
    netns: Netns | None
    ha: HaRedis | None = None
    wave_a: list[ClientSession] = field(default_factory=list)
    xack: dict[str, bool] = field(default_factory=dict)
    fired: asyncio.Event = field(default_factory=asyncio.Event)


Inject = Callable[[Ctx], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class Fault:
    """A row of the matrix: what it does, how long it lasts, the loss it may cause per session and why."""

    name: str
    what: str
    inject: Inject
    span_s: float
    allowed: str  # "none", "kill", "cut"
    netns: bool = False
    wave_b_after: bool = False  # wave B starts once the fault is over (the sidecar is down meanwhile)
    redis: str = "single"  # or "sentinel", "cluster": the fixtures (bench/chaos/ha.py)


async def _pause(seconds: float) -> None:
    await asyncio.sleep(seconds)  # the fault's duration: time is the fault here, not a synchronisation


async def redis_kill_restart(ctx: Ctx) -> None:
    assert ctx.redis is not None
    await ctx.redis.kill()
    await _pause(3)
    await ctx.redis.start()


async def redis_restart_empty(ctx: Ctx) -> None:
    assert ctx.redis is not None
    await ctx.redis.kill()
    await _pause(3)
    await ctx.redis.start(empty=True)


async def redis_freeze(ctx: Ctx) -> None:
    assert ctx.redis is not None
    ctx.redis.freeze()
    try:
        await _pause(REDIS_PUBLISH_TIMEOUT_S + 2)
    finally:
        ctx.redis.thaw()


async def pg_refuse(ctx: Ctx) -> None:
    await ctx.pg_proxy.refuse()
    await _pause(6)
    await ctx.pg_proxy.heal()


async def pg_blackhole(ctx: Ctx) -> None:
    await ctx.pg_proxy.blackhole()
    await _pause(DB_TIMEOUT_S * 2 + 2)
    await ctx.pg_proxy.heal()


async def consumer_kill_before_ack(ctx: Ctx) -> None:
    ctx.xack["armed"] = True
    async with asyncio.timeout(30):
        await ctx.fired.wait()
    await ctx.consumer.kill()
    await ctx.consumer.start()


async def consumer_kill_random(ctx: Ctx) -> None:
    rng = random.Random()
    for _ in range(3):
        await _pause(rng.uniform(0.3, 2.0))
        await ctx.consumer.kill()
        await ctx.consumer.start()


async def sidecar_kill(ctx: Ctx) -> None:
    await ctx.sidecar.kill()
    await ctx.sidecar.start()


async def sidecar_kill_redis_down(ctx: Ctx) -> None:
    assert ctx.redis is not None
    await ctx.redis.kill()
    await _pause(2.5)  # the sidecar spools its checkpoints meanwhile
    await ctx.sidecar.kill()
    await ctx.redis.start()
    await ctx.sidecar.start()  # adopts the dead process's spool and publishes it


async def ha_failover(ctx: Ctx) -> None:
    assert ctx.ha is not None
    await ctx.ha.fail_over()


async def ha_kill_master(ctx: Ctx) -> None:
    assert ctx.ha is not None
    await ctx.ha.kill_master()


async def provider_drop(ctx: Ctx) -> None:
    await ctx.provider.command("drop")


async def client_abort(ctx: Ctx) -> None:
    for session in ctx.wave_a[: max(1, len(ctx.wave_a) // 2)]:
        session.abort.set()


async def partition(ctx: Ctx) -> None:
    assert ctx.netns is not None
    await ctx.netns.link(up=False)
    try:
        await _pause(5)
    finally:
        await ctx.netns.link(up=True)


async def slow_link(ctx: Ctx) -> None:
    assert ctx.netns is not None
    await ctx.netns.throttle("2mbit")
    try:
        await _pause(6)
    finally:
        await ctx.netns.throttle(None)


FAULTS: Final = (
    Fault("redis-kill", "Redis SIGKILLed, restarted 3 s later on its append-only file", redis_kill_restart, 4, "none"),
    Fault("redis-empty", "Redis SIGKILLed, restarted 3 s later empty (no data)", redis_restart_empty, 4, "none"),
    Fault(
        "redis-freeze",
        "Redis SIGSTOPped 12 s (past the publisher's 10 s timeout), then SIGCONT",
        redis_freeze,
        12,
        "none",
    ),
    Fault("pg-refuse", "PostgreSQL refusing connections 6 s (the consumer's proxy closed)", pg_refuse, 6, "none"),
    Fault(
        "pg-blackhole",
        "PostgreSQL black-holed 8 s (proxy accepts, forwards nothing; DB timeout 3 s)",
        pg_blackhole,
        8,
        "none",
    ),
    Fault(
        "consumer-kill-ack",
        "consumer SIGKILLed after its commit, before its XACK (its XACK dropped)",
        consumer_kill_before_ack,
        3,
        "none",
    ),
    Fault(
        "consumer-kill-random",
        "consumer SIGKILLed 3 times at random moments, restarted each time",
        consumer_kill_random,
        6,
        "none",
    ),
    Fault(
        "sidecar-kill",
        "sidecar serve SIGKILLed mid-stream (Redis up), started again",
        sidecar_kill,
        3,
        "kill",
        wave_b_after=True,
    ),
    Fault(
        "sidecar-kill-redis-down",
        "Redis SIGKILLed, then sidecar serve SIGKILLed; both started again",
        sidecar_kill_redis_down,
        5,
        "kill",
    ),
    Fault("provider-drop", "the provider aborts every upstream TCP connection", provider_drop, 1, "cut"),
    Fault("client-abort", "half the clients abort TCP mid-stream (no close frame)", client_abort, 1, "cut"),
    Fault("net-partition", "sidecar<->provider veth link down 5 s (netns), then up", partition, 5, "none", netns=True),
    Fault(
        "sentinel-failover",
        "SENTINEL FAILOVER mid-session (master, replica, three sentinels; tests/redis_ha.py)",
        ha_failover,
        4,
        "none",
        redis="sentinel",
    ),
    Fault(
        "sentinel-kill-master",
        "the Sentinel group's master SIGKILLed mid-session; the sentinels promote the replica",
        ha_kill_master,
        4,
        "none",
        redis="sentinel",
    ),
    Fault(
        "cluster-failover",
        "CLUSTER FAILOVER of the usage stream's master mid-session (3 masters + replicas; tests/redis_cluster.py)",
        ha_failover,
        4,
        "none",
        redis="cluster",
    ),
    Fault(
        "cluster-kill-master",
        "the usage stream's cluster master SIGKILLed mid-session; its replica takes over",
        ha_kill_master,
        4,
        "none",
        redis="cluster",
    ),
    Fault(
        "net-slow",
        "sidecar<->provider link throttled to 2 Mbit/s for 6 s (tc tbf, netns)",
        slow_link,
        6,
        "none",
        netns=True,
    ),
)
NOT_HERE: Final = (
    ("net-latency", "sidecar<->provider latency (tc netem delay)"),
    ("net-loss", "sidecar<->provider packet loss (tc netem loss)"),
)


@dataclass(frozen=True)
class Options:
    faults: tuple[str, ...]
    sessions: int
    checkpoint_s: Decimal
    out: Path
    docs: bool


def allowed_for(kind: str, checkpoint_s: Decimal) -> Decimal:
    """The loss per session a fault of `kind` may cause (tally.py says why)."""
    if kind == "kill":
        return tally.allowance_for_kill(checkpoint_s)
    if kind == "cut":
        return CUT_ALLOWANCE
    return Decimal(0)


async def run_fault(
    fault: Fault, options: Options, work: Path, litellm: FakeLiteLLM, litellm_url: str
) -> tally.FaultRow:
    """One row on a fresh stack."""
    await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
    netns: Netns | None = None
    if fault.netns:
        netns = Netns()
        if (reason := await netns.create()) is not None:
            return tally.skipped(fault.name, reason)
    try:
        async with Procs(work, env=base_env(work), cwd=REPO) as procs:
            return await _row(fault, options, work, procs, netns, litellm, litellm_url)
    finally:
        if netns is not None:
            await netns.delete()


async def _row(
    fault: Fault,
    options: Options,
    work: Path,
    procs: Procs,
    netns: Netns | None,
    litellm: FakeLiteLLM,
    litellm_url: str,
) -> tally.FaultRow:
    redis: RedisServer | None = None
    ha: HaRedis | None = None
    if fault.redis == "single":
        redis = RedisServer(procs, work / "redis")
        await redis.start()
    else:
        started = await start_ha(fault.redis, work / fault.redis)
        if isinstance(started, str):
            return tally.skipped(fault.name, started)
        ha = started
    try:
        return await _on_redis(fault, options, work, procs, netns, litellm, litellm_url, redis, ha)
    finally:
        if ha is not None:
            await ha.stop()


async def _on_redis(
    fault: Fault,
    options: Options,
    work: Path,
    procs: Procs,
    netns: Netns | None,
    litellm: FakeLiteLLM,
    litellm_url: str,
    redis: RedisServer | None,
    ha: HaRedis | None,
) -> tally.FaultRow:
    provider = ProviderProcess(procs, host=NS_IP if netns else "127.0.0.1", netns=NETNS if netns else None)
    await provider.start()
    pg_proxy = TcpProxy("127.0.0.1", 5432)
    await pg_proxy.start()
    ctx_box: list[Ctx] = []
    redis_port = redis.port if redis is not None else 0  # no proxy in front of a Sentinel group or a Cluster
    redis_proxy = TcpProxy("127.0.0.1", redis_port, intercept=lambda chunk: _intercept(ctx_box, chunk))
    if redis is not None:
        await redis_proxy.start()
    serve_redis = {"SIDECAR_REDIS_URL": redis.url} if redis is not None else dict(ha.env) if ha else {}
    consume_redis = {"SIDECAR_REDIS_URL": f"redis://127.0.0.1:{redis_proxy.port}/0"} if redis else serve_redis
    common = base_env(work) | {"SIDECAR_CHECKPOINT_S": str(options.checkpoint_s)}
    serve_env = common | {
        "SIDECAR_LITELLM_CONFIG": str(litellm_config(work / "litellm.yaml", provider.url)),
        "SIDECAR_LITELLM_URL": litellm_url,
        **serve_redis,
        "SIDECAR_SPOOL_DIR": str(work / "spool"),
        "SIDECAR_DATABASE_URL": database_url(DATABASE),
    }
    consume_env = common | {
        **consume_redis,
        "SIDECAR_DATABASE_URL": database_url(DATABASE, port=pg_proxy.port),
        "SIDECAR_DB_TIMEOUT_S": str(DB_TIMEOUT_S),
        "SIDECAR_LOST_AFTER_S": str(LOST_AFTER_S),
    }
    sidecar = Sidecar(procs, serve_env)
    consumer = Consumer(procs, consume_env)
    await sidecar.start()
    await consumer.start()
    ctx = Ctx(procs, redis, provider, sidecar, consumer, pg_proxy, redis_proxy, netns, ha)
    ctx_box.append(ctx)
    if redis is not None:
        url = redis.url
        backlog: Callable[[], Coroutine[Any, Any, int | None]] = lambda: group_backlog(url)  # noqa: E731
    else:
        assert ha is not None
        backlog = ha.backlog
    try:
        sessions = await _waves(ctx, fault, options, litellm)
        await _settle(sessions, backlog, sidecar)
        decoded = await provider.decoded()
        failures = _publish_failures(await sidecar.metrics())
    finally:
        await pg_proxy.aclose()
        await redis_proxy.aclose()
    retries = await asyncio.to_thread(_consumer_retries, work)
    evidence = f"publish failures: {failures}{' (last sidecar)' if fault.allowed == 'kill' else ''}; "
    evidence += f"consumer retries: {retries}; consumers started: {consumer.starts}"
    return _evaluate(fault, options, sessions, decoded, evidence=evidence)


def _consumer_retries(work: Path) -> int:
    """Warnings of the row's consumers that say they retry (a Redis or database failure they rode)."""
    return sum(
        line.count('"level":"warning"')
        for log in work.glob("consumer-*.log")
        for line in log.read_text().splitlines()
        if "retrying" in line
    )


def _publish_failures(metrics: str) -> int:
    """sidecar_usage_publish_failures_total of the (last) sidecar process."""
    return int(_sample(metrics, "sidecar_usage_publish_failures_total") or 0)


def _sample(metrics: str, name: str) -> float | None:
    """An unlabelled sample's value in Prometheus text."""
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def _intercept(box: list[Ctx], chunk: bytes) -> bool:
    """Drop the consumer's first XACK once armed, and kill it there: after its commit, before its ack."""
    if not box or not box[0].xack.get("armed") or b"XACK" not in chunk.upper():
        return False
    ctx = box[0]
    ctx.xack["armed"] = False
    ctx.consumer.kill_now()
    ctx.fired.set()
    return True


async def _waves(ctx: Ctx, fault: Fault, options: Options, litellm: FakeLiteLLM) -> list[ClientSession]:
    chunks = speech_chunks()
    stamp = f"{fault.name}-{int(time.time())}"

    def new(n: int, wave: str) -> list[ClientSession]:
        made = []
        for i in range(n):
            key = f"sk-chaos-{stamp}-{wave}{i}"
            litellm.add_key(key, key_alias=f"{fault.name}-{wave}{i}")
            made.append(ClientSession(tag=f"{fault.name}-{wave}{i}", key=key))
        return made

    wave_a = new(options.sessions, "a")
    ctx.wave_a = wave_a
    a_s = LEAD_S + fault.span_s + TAIL_S
    tasks = [asyncio.create_task(run_session(ctx.sidecar.http, s, chunks, duration_s=a_s)) for s in wave_a]
    await _pause(LEAD_S)
    injecting = asyncio.create_task(fault.inject(ctx))
    if fault.wave_b_after:
        await injecting
    else:
        await _pause(0.5)
    wave_b = new(max(1, options.sessions // 2), "b")
    b_s = fault.span_s / 2 + TAIL_S
    tasks += [asyncio.create_task(run_session(ctx.sidecar.http, s, chunks, duration_s=b_s)) for s in wave_b]
    await injecting
    await asyncio.gather(*tasks)
    return wave_a + wave_b


async def _settle(
    sessions: Sequence[ClientSession], backlog: Callable[[], Coroutine[Any, Any, int | None]], sidecar: Sidecar
) -> None:
    """Wait until the sidecar's spool is empty, every session that sent audio has billing rows, none of them
    still open, and the billing group has nothing pending or undelivered (a killed consumer's entries
    redelivered and acknowledged)."""
    wanted = {key_hash(s.key) for s in sessions if s.sent}

    async def settled() -> bool:
        if _sample(await sidecar.metrics(), "sidecar_usage_spool_depth") != 0:
            return False
        billed = await asyncio.to_thread(billed_by_key, DATABASE)
        if not all(k in billed and "open" not in billed[k].statuses for k in wanted):
            return False
        return await backlog() == 0

    try:
        await poll(settled, what="billing to settle", every_s=0.5, deadline_s=SETTLE_S)
    except TimeoutError:
        print("    billing did not settle within the deadline; evaluating what is there", flush=True)


def _evaluate(
    fault: Fault, options: Options, sessions: Sequence[ClientSession], decoded: dict[str, int], *, evidence: str
) -> tally.FaultRow:
    billed = billed_by_key(DATABASE)
    figures = []
    reasons: Counter[str] = Counter()
    for s in sessions:
        if not s.opened and not s.sent:
            continue  # refused before any audio (e.g. connecting while the sidecar was down)
        row = billed.get(key_hash(s.key))
        reasons.update(row.close_reasons if row else ("no row",))
        figures.append(
            tally.SessionFigures(
                tag=s.tag,
                sent=s.sent,
                decoded=decoded.get(s.tag, 0),
                billed=row.audio_bytes if row else 0,
                rows=row.rows if row else 0,
            )
        )
    ends = Counter(s.ended for s in sessions)
    note = f"clients: {_counts(ends)}; billed as: {_counts(reasons)}; {evidence}"
    allowed = allowed_for(fault.allowed, options.checkpoint_s)
    return tally.evaluate(fault.name, figures, allowed_lost_s=allowed, note=note)


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counter.items()))


async def run(options: Options) -> tally.Matrix:
    """Every selected fault in turn; progress on stdout."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    root = options.out / f"chaos-{stamp}"
    await asyncio.to_thread(fresh_database, DATABASE)
    matrix = tally.Matrix()
    litellm = FakeLiteLLM(master_key=MASTER_KEY)
    netem: str | None = None
    async with LiteLLMServer(litellm) as server:
        selected = [f for f in FAULTS if f.name in options.faults]
        for index, fault in enumerate(selected, 1):
            started = time.monotonic()
            print(f"[{index}/{len(selected)}] {fault.name}: {fault.what}", flush=True)
            try:
                row = await run_fault(fault, options, root / fault.name, litellm, server.url)
            except Exception as exc:  # a row that could not run is a failed row, and the run goes on
                row = tally.failed(fault.name, f"harness error: {exc!r}")
            matrix.rows.append(row)
            verdict = "skipped" if row.skipped else ("pass" if row.ok else "FAIL")
            print(
                f"    {verdict} in {time.monotonic() - started:.0f}s: sent {row.sent_s} s, billed {row.billed_s} s, "
                f"lost {row.lost_s} s, double {row.double_s} s ({row.note})",
                flush=True,
            )
            for failure in row.failures:
                print(f"    - {failure}", flush=True)
        if any(n in options.faults for n, _ in NOT_HERE):
            netem = await _netem_reason()
    for name, what in NOT_HERE:
        if name in options.faults:
            matrix.rows.append(tally.skipped(name, netem or f"{what}: not implemented"))
    return matrix


async def _netem_reason() -> str | None:
    netns = Netns()
    reason = await netns.create()
    if reason is None:
        reason = await netns.netem_missing()
    await netns.delete()
    return reason


ALL_NAMES: Final = tuple(f.name for f in FAULTS) + tuple(n for n, _ in NOT_HERE)


def parse_args(argv: Sequence[str] | None) -> Options:
    """The command line (exits 2 on a bad one, as argparse does)."""
    parser = argparse.ArgumentParser(prog="python -m bench.chaos.run", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--faults", default="all", help=f"comma-separated, or all: {', '.join(ALL_NAMES)}")
    parser.add_argument("--sessions", type=int, default=6, help="wave A's clients per row (wave B: half)")
    parser.add_argument("--checkpoint-s", type=Decimal, default=Decimal(1), help="the sidecar's SIDECAR_CHECKPOINT_S")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--docs", choices=("yes", "no"), default="yes", help="put the table in docs/reliability.md")
    parser.add_argument("--list", action="store_true", help="print the faults and exit")
    args = parser.parse_args(argv)
    if args.list:
        for f in FAULTS:
            print(f"{f.name:24} {f.what}")
        for name, what in NOT_HERE:
            print(f"{name:24} {what}")
        raise SystemExit(0)
    names = ALL_NAMES if args.faults == "all" else tuple(n.strip() for n in args.faults.split(",") if n.strip())
    unknown = sorted(set(names) - set(ALL_NAMES))
    if unknown:
        parser.error(f"unknown fault(s): {', '.join(unknown)}")
    if args.sessions < 1:
        parser.error("--sessions must be at least 1")
    if args.checkpoint_s <= 0:
        parser.error("--checkpoint-s must be positive")
    return Options(names, args.sessions, args.checkpoint_s, args.out, args.docs == "yes")


def put_in_docs(text: str, begin: str, end: str, path: Path = DOCS) -> None:
    """Replace what is between `begin` and `end` in `path` with `text` (markers kept)."""
    doc = path.read_text()
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def report(matrix: tally.Matrix, options: Options, elapsed_s: float) -> str:
    """The table with when and how it was made."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    faults = ",".join(options.faults) if set(options.faults) != set(ALL_NAMES) else "all"
    head = (
        f"Run {when}, {elapsed_s / 60:.1f} min, `--faults {faults} --sessions {options.sessions} "
        f"--checkpoint-s {options.checkpoint_s}`; exit status {matrix.exit_status()}."
    )
    return f"{head}\n\n{tally.table(matrix.rows)}"


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    started = time.monotonic()
    matrix = asyncio.run(run(options))
    text = report(matrix, options, time.monotonic() - started)
    print("\n" + text, flush=True)
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "chaos-latest.md").write_text(text + "\n")
    if options.docs:
        put_in_docs(text, BEGIN, END)
    return matrix.exit_status()


if __name__ == "__main__":
    sys.exit(main())
