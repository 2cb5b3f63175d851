"""`make soak`: churning sessions through a real sidecar for a bounded time; its resources flat, its billing exact.

    .venv/bin/python -m bench.chaos.soak [--duration-s 600] [--concurrency 200] [--session-s 4:16]
                                         [--warmup-s D/4] [--sample-s 5] [--out bench/results] [--docs yes|no]

`make soak` takes the duration from SOAK_S (default 600). The stack is the chaos run's (bench/chaos/stack.py):
a throwaway redis-server, the fake provider process, `sidecar serve` (one process, Redis mode) and `sidecar
consume` into PostgreSQL (database `sidecar_soak`), and a fake LiteLLM with one key per session. The harness keeps
--concurrency openai SDK sessions open: each streams the test speech at real-time pace for a random length in
--session-s and closes; a new one replaces it at once. Every --sample-s it reads the sidecar's RSS and open file
descriptors (/proc, the process and its children) and its `sidecar_asyncio_tasks` and `sidecar_live_sessions`
(/metrics). After --duration-s no new session starts; once the last ends and billing settles, every session's
billed audio must equal what it sent (to the byte), and RSS, fds and tasks must be flat after the warm-up
(bench/chaos/flat.py). Exit status 1 when either fails, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from bench.chaos import flat
from bench.chaos.clients import ClientSession, run_session, speech_chunks
from bench.chaos.run import REPO, put_in_docs
from bench.chaos.stack import (
    MASTER_KEY,
    Consumer,
    ProviderProcess,
    RedisServer,
    Sidecar,
    base_env,
    billed_by_key,
    database_url,
    fresh_database,
    group_backlog,
    key_hash,
    litellm_config,
    poll,
)
from bench.procs import Procs, descendants, raise_fd_limit, usage
from sidecar.testing.fake_litellm import FakeLiteLLM, LiteLLMServer

DATABASE: Final = "sidecar_soak"
BEGIN: Final = "<!-- soak:begin (bench/chaos/soak.py writes this section) -->"
END: Final = "<!-- soak:end -->"
SETTLE_S: Final = 120.0
TOLERANCES: Final = {
    "rss_mib": flat.Tolerance(absolute=4.0, relative=0.10),
    "fds": flat.Tolerance(absolute=10.0, relative=0.10),
    "tasks": flat.Tolerance(absolute=10.0, relative=0.10),
}


@dataclass(frozen=True)
class Options:
    duration_s: float
    concurrency: int
    session_s: tuple[float, float]
    warmup_s: float
    chunk_ms: int
    keys: int
    sample_s: float
    out: Path
    docs: bool


@dataclass
class Samples:
    """The series, as (seconds since the load started, value)."""

    rss_mib: list[tuple[float, float]] = field(default_factory=list)
    fds: list[tuple[float, float]] = field(default_factory=list)
    tasks: list[tuple[float, float]] = field(default_factory=list)
    live: list[tuple[float, float]] = field(default_factory=list)
    full_gcs: list[tuple[float, float]] = field(default_factory=list)  # the sidecar's generation-2 collections


def parse_args(argv: Sequence[str] | None) -> Options:
    """The command line (exits 2 on a bad one)."""
    parser = argparse.ArgumentParser(prog="python -m bench.chaos.soak", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--duration-s", type=float, default=600.0, help="how long new sessions keep starting")
    parser.add_argument("--concurrency", type=int, default=200, help="sessions kept open at once")
    parser.add_argument("--session-s", default="4:16", help="MIN:MAX seconds of audio per session (uniform)")
    parser.add_argument(
        "--keys", type=int, default=0, help="0: a key per session (billing per session); N: a pool of N keys (per key)"
    )
    parser.add_argument("--chunk-ms", type=int, default=500, help="audio per append (real-time pace whatever it is)")
    parser.add_argument("--warmup-s", type=float, default=None, help="samples before this are not judged (D/4)")
    parser.add_argument("--sample-s", type=float, default=None, help="seconds between samples (D/120, 1 to 5)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--docs", choices=("yes", "no"), default="yes", help="put the result in docs/reliability.md")
    args = parser.parse_args(argv)
    try:
        low, high = (float(x) for x in args.session_s.split(":"))
    except ValueError:
        parser.error("--session-s is MIN:MAX, e.g. 4:16")
    if not 0 < low <= high:
        parser.error("--session-s needs 0 < MIN <= MAX")
    if args.duration_s <= 0 or args.concurrency < 1:
        parser.error("--duration-s must be positive and --concurrency at least 1")
    warmup = args.warmup_s if args.warmup_s is not None else args.duration_s / 4
    sample = args.sample_s if args.sample_s is not None else min(5.0, max(1.0, args.duration_s / 120))
    if not 0 <= warmup < args.duration_s:
        parser.error("--warmup-s must be below --duration-s")
    if not 0 < args.chunk_ms <= 1000 or args.chunk_ms % 100:
        parser.error("--chunk-ms must be 100, 200, ... 1000")
    return Options(
        args.duration_s,
        args.concurrency,
        (low, high),
        warmup,
        args.chunk_ms,
        max(0, args.keys),
        sample,
        args.out,
        args.docs == "yes",
    )


def metric(text: str, name: str, labels: str = "") -> float | None:
    """The value of sample `name` in Prometheus text: unlabelled, or with exactly `labels` (`a="b"`)."""
    heads = (f"{name}{{{labels}}} ",) if labels else (name + " ", name + "{} ")
    for line in text.splitlines():
        if line.startswith(heads):
            return float(line.split()[-1])
    return None


async def run(options: Options) -> tuple[str, bool]:
    """The soak; (the report, whether it passed)."""
    raise_fd_limit()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    work = options.out / f"soak-{stamp}"
    await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(fresh_database, DATABASE)
    litellm = FakeLiteLLM(master_key=MASTER_KEY)
    async with LiteLLMServer(litellm) as server, Procs(work, env=base_env(work), cwd=REPO) as procs:
        redis = RedisServer(procs, work / "redis")
        await redis.start()
        provider = ProviderProcess(procs)
        await provider.start()
        env = base_env(work) | {"SIDECAR_CHECKPOINT_S": "5"}
        sidecar = Sidecar(
            procs,
            env
            | {
                "SIDECAR_LITELLM_CONFIG": str(litellm_config(work / "litellm.yaml", provider.url)),
                "SIDECAR_LITELLM_URL": server.url,
                "SIDECAR_REDIS_URL": redis.url,
                "SIDECAR_SPOOL_DIR": str(work / "spool"),
                "SIDECAR_DATABASE_URL": database_url(DATABASE),
                "SIDECAR_MAX_SESSIONS_PER_KEY": "1000",
            },
        )
        consumer = Consumer(
            procs, env | {"SIDECAR_REDIS_URL": redis.url, "SIDECAR_DATABASE_URL": database_url(DATABASE)}
        )
        await sidecar.start()
        await consumer.start()
        idle = await _sample_once(sidecar)
        print(f"idle sidecar: RSS {idle[0]:.1f} MiB, {idle[1]:.0f} fds, {idle[2]:.0f} tasks", flush=True)
        sessions, samples = await _load(options, sidecar, litellm)
        exact, billing = await _billing(sessions, redis.url)
        after = await _sample_once(sidecar)  # once billing settled: the sidecar had time to release memory
    return _report(options, samples, idle, after, exact, billing, len(sessions))


async def _load(options: Options, sidecar: Sidecar, litellm: FakeLiteLLM) -> tuple[list[ClientSession], Samples]:
    chunks = speech_chunks(options.chunk_ms)
    rng = random.Random()
    sessions: list[ClientSession] = []
    samples = Samples()
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + options.duration_s
    running: set[asyncio.Task[None]] = set()
    counter = 0
    keyed: set[int] = set()

    def launch() -> None:
        nonlocal counter
        counter += 1
        slot = counter if options.keys == 0 else counter % options.keys
        key = f"sk-soak-{start:.0f}-{slot}"
        if slot not in keyed:
            keyed.add(slot)
            litellm.add_key(key, key_alias=f"soak-{slot}")
        session = ClientSession(tag=f"s{counter}", key=key)
        sessions.append(session)
        length = rng.uniform(*options.session_s)
        task = asyncio.create_task(run_session(sidecar.http, session, chunks, duration_s=length))
        running.add(task)
        task.add_done_callback(running.discard)

    sampler = asyncio.create_task(_sampler(sidecar, samples, start, options.sample_s))
    next_print = start
    # The first sessions are spread over one mean session length, so that their ends (and the new sessions
    # replacing them) spread too: the load is steady from the first minute instead of coming in waves.
    ramp_gap = sum(options.session_s) / 2 / options.concurrency
    try:
        while loop.time() < end:
            while len(running) < options.concurrency and loop.time() < end:
                launch()
                filling = counter <= options.concurrency
                await asyncio.sleep(ramp_gap if filling else 0.005)  # pacing of the connects
            if running:
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED, timeout=max(0.0, end - loop.time()))
            if loop.time() >= next_print:
                next_print += 30
                print(
                    f"  t={loop.time() - start:5.0f}s sessions started {counter}, live {len(running)}, "
                    f"last sample: {_last(samples)}",
                    flush=True,
                )
    finally:
        sampler.cancel()  # only the load is judged: samples stop when new sessions stop
        await asyncio.gather(sampler, return_exceptions=True)
    print(f"  load over at t={loop.time() - start:.0f}s; waiting for {len(running)} sessions to end", flush=True)
    if running:
        await asyncio.wait(running, timeout=options.session_s[1] + 30)
    return sessions, samples


def _last(samples: Samples) -> str:
    if not samples.rss_mib:
        return "-"
    return (
        f"RSS {samples.rss_mib[-1][1]:.1f} MiB, fds {samples.fds[-1][1]:.0f}, "
        f"tasks {samples.tasks[-1][1]:.0f}, live {samples.live[-1][1]:.0f}"
    )


async def _sample_once(sidecar: Sidecar) -> tuple[float, float, float, float, float]:
    """(RSS MiB, fds, asyncio tasks, live sessions, generation-2 collections so far) of the sidecar now."""
    assert sidecar.proc is not None
    now = usage(descendants(sidecar.proc.pid))
    text = await sidecar.metrics()
    return (
        now.rss_kb / 1024,
        now.fds,
        metric(text, "sidecar_asyncio_tasks") or 0.0,
        metric(text, "sidecar_live_sessions") or 0.0,
        metric(text, "python_gc_collections_total", 'generation="2"') or 0.0,
    )


async def _sampler(sidecar: Sidecar, samples: Samples, start: float, every_s: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        rss, fds, tasks, live, full_gcs = await _sample_once(sidecar)
        t = loop.time() - start
        samples.rss_mib.append((t, rss))
        samples.fds.append((t, fds))
        samples.tasks.append((t, tasks))
        samples.live.append((t, live))
        samples.full_gcs.append((t, full_gcs))
        await asyncio.sleep(every_s)  # the sampling period


async def _billing(sessions: Sequence[ClientSession], redis_url: str) -> tuple[bool, str]:
    """Wait for billing to settle; whether every session's billed bytes equal its sent bytes, and a summary."""
    by_key: dict[str, list[ClientSession]] = {}
    for s in sessions:
        if s.sent:
            by_key.setdefault(key_hash(s.key), []).append(s)
    wanted = by_key

    async def settled() -> bool:
        billed = await asyncio.to_thread(billed_by_key, DATABASE)
        if not all(k in billed and "open" not in billed[k].statuses for k in wanted):
            return False
        return await group_backlog(redis_url) == 0

    with contextlib.suppress(TimeoutError):  # judged below, whatever settled
        await poll(settled, what="billing to settle", every_s=1.0, deadline_s=SETTLE_S)
    billed = await asyncio.to_thread(billed_by_key, DATABASE)
    wrong = []
    for k, group in wanted.items():
        row = billed.get(k)
        sent_k = sum(s.sent for s in group)
        if row is None or row.audio_bytes != sent_k or row.rows != len(group) or set(row.statuses) != {"final"}:
            got_k = row.audio_bytes if row else 0
            rows_k = row.rows if row else 0
            statuses = ",".join(row.statuses) if row else "-"
            wrong.append(
                f"{group[0].tag}: sent {sent_k} B in {len(group)} sessions, "
                f"billed {got_k} B in {rows_k} rows ({statuses})"
            )
    sent = sum(s.sent for group in wanted.values() for s in group)
    got = sum(billed[k].audio_bytes for k in wanted if k in billed)
    refused = sum(1 for s in sessions if not s.opened)
    ends: dict[str, int] = {}
    for s in sessions:
        ends[s.ended] = ends.get(s.ended, 0) + 1
    how = ", ".join(f"{k} {v}" for k, v in sorted(ends.items()))
    unit = "sessions" if all(len(g) == 1 for g in wanted.values()) else "keys"
    summary = (
        f"{sum(len(g) for g in wanted.values())} sessions with audio ({refused} not opened; ends: {how}); "
        f"sent {sent / 48000:.3f} s, billed {got / 48000:.3f} s; "
        f"{len(wrong)} {unit} billed differently from what they sent"
    )
    if wrong:
        summary += ": " + "; ".join(wrong[:5])
    return not wrong and refused == 0, summary


def _report(
    options: Options,
    samples: Samples,
    idle: tuple[float, float, float, float, float],
    after: tuple[float, float, float, float, float],
    exact: bool,
    billing: str,
    started: int,
) -> tuple[str, bool]:
    verdicts = []
    for name, unit in (("rss_mib", " MiB"), ("fds", ""), ("tasks", "")):
        series = getattr(samples, name)
        try:
            judged = flat.verdict(
                name, series, warmup_s=options.warmup_s, tolerance=TOLERANCES[name], live=samples.live
            )
            verdicts.append((judged, unit))
        except ValueError as exc:
            return f"soak: {exc}", False
    flat_ok = all(v.flat for v, _ in verdicts)
    live = [v for _, v in flat.after_warmup(samples.live, options.warmup_s)]
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Run {when}: `--duration-s {options.duration_s:g} --concurrency {options.concurrency} "
        f"--session-s {options.session_s[0]:g}:{options.session_s[1]:g} --chunk-ms {options.chunk_ms} "
        f"--keys {options.keys} "
        f"--warmup-s {options.warmup_s:g} "
        f"--sample-s {options.sample_s:g}`; {started} sessions started; live sessions after warm-up "
        f"{min(live, default=0):.0f} to {max(live, default=0):.0f}.",
        "",
        f"- idle before the load: RSS {idle[0]:.1f} MiB, {idle[1]:.0f} fds, {idle[2]:.0f} tasks; "
        f"after the last session ended and billing settled: RSS {after[0]:.1f} MiB, {after[1]:.0f} fds, "
        f"{after[2]:.0f} tasks, {after[3]:.0f} live; the sidecar's full (generation-2) garbage collections: "
        f"{idle[4]:.0f} before the load, {after[4]:.0f} after it",
    ]
    lines += [f"- {v.line(unit)}" for v, unit in verdicts]
    lines.append(f"- billing {'exact' if exact else 'NOT EXACT'}: {billing}")
    ok = flat_ok and exact
    lines.append(f"- verdict: {'pass' if ok else 'FAIL'}")
    lines += ["", "Series (t s: RSS MiB / fds / tasks / live sessions / the sidecar's full GCs so far):", "", "```"]
    for (t, rss), (_, fds), (_, tasks), (_, live_n), (_, gcs) in zip(
        samples.rss_mib, samples.fds, samples.tasks, samples.live, samples.full_gcs, strict=True
    ):
        lines.append(f"{t:7.1f}  {rss:7.1f}  {fds:5.0f}  {tasks:5.0f}  {live_n:4.0f}  {gcs:3.0f}")
    lines.append("```")
    return "\n".join(lines), ok


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    started = time.monotonic()
    print(
        f"soak: {options.duration_s:g}s of churn at {options.concurrency} sessions, "
        f"samples every {options.sample_s:g}s, warm-up {options.warmup_s:g}s",
        flush=True,
    )
    text, ok = asyncio.run(run(options))
    print("\n" + text, flush=True)
    print(f"soak done in {(time.monotonic() - started) / 60:.1f} min", flush=True)
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "soak-latest.md").write_text(text + "\n")
    if options.docs:
        put_in_docs(text, BEGIN, END)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
