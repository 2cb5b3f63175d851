"""`make bench`: the relay under load, against the floor (direct) and LiteLLM's own relay, in one run.

    .venv/bin/python -m bench.run [--levels 1,100,500,1000,1500] [--duration 20]
                                  [--targets sidecar,direct,litellm,sidecar-2w,consumer]
                                  [--surfaces live,translation] [--surface-level 1000] [--surface-rounds 3]

Loopback only, bounded, stops by itself. For each target and level a fresh stack is started: the fake
provider (bench.provider), the relay under test (none for `direct`), then the load generator
(bench.loadgen) with `level` sessions; the relay's CPU, RSS and fds are sampled from /proc before, during
and after; every subprocess is stopped at the end of the level, even on error.

Targets:
  sidecar     `sidecar serve` (one uvicorn worker) in Redis mode on the local Redis (checkpoints published)
  direct      the load generator straight to the fake provider: the floor
  nginx       nginx (one worker) as a pure WebSocket proxy to the provider: what relaying alone costs
  litellm     LiteLLM proxy 1.109.1's own /v1/realtime relay (installed by bench/litellm_env.sh into
              bench/.litellm-venv; when that fails the run goes on and says so)
  sidecar-2w  `sidecar serve --workers 2` (for revisions without it: `uvicorn --factory
              bench.sidecar_app:app --workers 2`), at --workers2-level
  consumer    bench.consumer_bench: N usage events through UsageConsumer into a fresh PostgreSQL database

Surfaces: after the levels above, the sidecar at --surface-level (default 1000) on each of its three
routes, /v1/realtime, GPT-Live (/v1/live/sessions, model gpt-live-1) and realtime translation
(/v1/realtime/translations, model gpt-realtime-translate), with the same load (chunk size, pace, connect
rate, window), --surface-rounds times (default 3) with the order rotated each round, a fresh stack each
time. The report gives each surface's median and spread, and its ratio to /v1/realtime's median in the same
run: CPU per chunk+reply and KB per session, each passing when within 10 % (report.SURFACE_TOLERANCE).

WebRTC calls (issue 17): --calls-levels N,M (or --calls-only, `make bench-calls`: 500,1000 and nothing else) runs
the sidecar at each level on /v1/realtime (chunk+reply), /v1/realtime relaying server events the provider pushes
(bench.callprovider) and WebRTC calls (bench.callgen creates them, bench.callprovider pushes the same events on
their sidebands), --calls-rounds times with the order rotated, --calls-rate creates/connects a second, nothing
streamed before the window. The report's calls table: the opening's CPU per session, CPU per event, KB per session,
each call figure's ratio to the pushed-events sessions' (report.calls).

Placement on a 2-core machine (taskset): the relay alone on the first CPU, the load generator and the
fake provider on the second (so `direct` puts exactly the same work on the second CPU as the relayed
targets do). `sidecar-2w` pins nothing. See docs/performance.md for why and what it skews.

Outputs in --out (default bench/results): <timestamp>.json and .md, latest.json and latest.md, the
profile (profile-<timestamp>.svg and .txt, when py-spy is installed and --profile-level is one of the
levels), and the processes' logs under logs-<timestamp>/. With the default --out the generated section
of docs/performance.md is rewritten too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import httpx

from bench import report
from bench.launch import TREE_VARIABLE
from bench.procs import (
    Proc,
    Procs,
    Usage,
    cmdline,
    cpu_busy_s,
    descendants,
    foreign_benchmarks,
    free_port,
    open_legs,
    pinned,
    raise_fd_limit,
    usage,
)

REPO: Final = Path(__file__).resolve().parents[1]
BENCH: Final = REPO / "bench"
DEFAULT_OUT: Final = BENCH / "results"
DOCS: Final = REPO / "docs" / "performance.md"
CONFIG: Final = BENCH / "litellm_config.yaml"
LITELLM_VENV: Final = BENCH / ".litellm-venv"
MODEL: Final = "gpt-realtime-whisper"
# Each surface's route (path and query, as the client sends it) and the bench config's model for it.
SURFACE_ROUTES: Final = {
    "realtime": f"/v1/realtime?model={MODEL}&intent=transcription",
    "live": "/v1/live/sessions",
    "translation": "/v1/realtime/translations?model=gpt-realtime-translate",
}
SURFACE_MODELS: Final = {"realtime": MODEL, "live": "gpt-live-1", "translation": "gpt-realtime-translate"}
NEW_SURFACES: Final = ("live", "translation")
# WebRTC calls (issue 17): a conversation model, created over HTTP, watched through a sideband (bench/callgen.py,
# bench/callprovider.py); "push" is /v1/realtime relaying the same server events the sidebands carry.
CALLS_MODEL: Final = "gpt-realtime"
SURFACE_ROUTES["calls"] = f"/v1/realtime/calls?model={CALLS_MODEL}"
SURFACE_ROUTES["push"] = f"/v1/realtime?model={CALLS_MODEL}"
SURFACE_MODELS["calls"] = SURFACE_MODELS["push"] = CALLS_MODEL
CALLS_SURFACES: Final = ("realtime", "push", "calls")  # the order of a calls round's first rotation
PUSH_EVERY_S: Final = 0.1  # one pushed server event per 100 ms per call or session, as one reply per chunk
PROVIDER_KEY: Final = "sk-bench-provider-key-0000"
LAUNCH: Final = (sys.executable, "-m", "bench.launch")  # runs a module, `sidecar` from --rev's tree if any
RELAY_TARGETS: Final = ("sidecar", "direct", "nginx", "litellm", "sidecar-2w")
ALL_TARGETS: Final = (*RELAY_TARGETS, "consumer")

READY_TIMEOUT_S: Final = 30.0
LITELLM_READY_TIMEOUT_S: Final = 120.0
LITELLM_INSTALL_TIMEOUT_S: Final = 900.0
CONSUMER_TIMEOUT_S: Final = 600.0
LOADGEN_START_S: Final = 1.5  # the load generator's import time, before its first connect
SETTLE_S: Final = 2.0  # after the last connect, before the window opens
DRAIN_S: Final = 2.0  # after the window, for outstanding replies
IDLE_WAIT_S: Final = 15.0  # for the relay to let go of every session after the level
SAMPLE_EVERY_S: Final = 0.25
REPEAT_WINDOW_S: Final = 5.0  # the window of each extra burst (--bursts): memory is what is read there


@dataclass(frozen=True)
class Options:
    """The command line."""

    levels: tuple[int, ...]
    duration_s: float
    targets: tuple[str, ...]
    out: Path
    rate: float
    loadgen_procs: int
    workers2_level: int
    profile_level: int
    consumer_events: int
    bursts: int
    bursts_level: int
    redis_url: str
    pin: bool
    update_docs: bool
    rev: str | None = None
    tree: Path | None = None  # where --rev was extracted (set by run)
    surfaces: tuple[str, ...] = NEW_SURFACES  # compared with /v1/realtime at surface_level
    surface_level: int = 1000
    surface_rounds: int = 3
    calls_levels: tuple[int, ...] = ()  # WebRTC calls vs /v1/realtime at each of these (issue 17)
    calls_rounds: int = 3
    calls_rate: float = 100.0  # creates (and WebSocket connects) per second in the calls comparison
    calls_only: bool = False  # only the calls rounds (make bench-calls)


@dataclass(frozen=True)
class Placement:
    """`taskset -c` CPU lists for each role (None: taskset is missing, nothing is pinned)."""

    relay: str | None
    load: str | None
    provider: str | None

    def describe(self) -> dict[str, str]:
        return {k: v if v not in (None, _ALL) else "any" for k, v in self.__dict__.items()}


# The CPUs this run may use, read once: the orchestrator later pins itself to the load generator's CPU,
# and its children inherit that, so even "not pinned" is an explicit `taskset -c <all of them>`.
_CPUS: Final = sorted(os.sched_getaffinity(0))
_ALL: Final = ",".join(map(str, _CPUS))


def placement(*, pin: bool) -> Placement:
    """Relay on the first allowed CPU, load generator and provider on the second (if two and taskset)."""
    if shutil.which("taskset") is None:
        return Placement(None, None, None)
    if not pin or len(_CPUS) < 2:
        return unpinned()
    return Placement(str(_CPUS[0]), str(_CPUS[1]), str(_CPUS[1]))


def unpinned() -> Placement:
    """Every role on every CPU the run may use."""
    every = _ALL if shutil.which("taskset") is not None else None
    return Placement(every, every, every)


# ---- one stack ------------------------------------------------------------------------------------


@dataclass
class Stack:
    """What one level talks to: the URL and headers for the load generator, and the processes to watch."""

    url: str
    headers: dict[str, str]
    relay: Proc | None
    provider: Proc
    relay_pids: Callable[[], list[int]] = field(default=lambda: [])
    relay_port: int = 0
    provider_port: int = 0
    key_hash: str = ""  # of the relay's master key: tags the usage events this level published
    command: str = ""  # how the relay was started (for the report)
    surface: str = "realtime"  # the protocol the load generator speaks (SURFACE_ROUTES)
    provider_url: str = ""
    hold: bool = False  # sessions stream only from the window's start (the open cost measured alone)


class StackError(Exception):
    """A process of the stack did not start; the message says which and shows its log's end."""


async def _start_provider(procs: Procs, where: Placement, *, module: str = "bench.provider") -> tuple[Proc, str]:
    command = pinned([*LAUNCH, module, "--api-key", PROVIDER_KEY], where.provider)
    proc = await procs.start("provider", command, pipe_stdout=True)
    assert proc.process.stdout is not None
    try:
        line = await asyncio.wait_for(proc.process.stdout.readline(), READY_TIMEOUT_S)
    except TimeoutError:
        line = b""
    if not line.startswith(b"ws://"):
        raise StackError(f"the fake provider did not start:\n{proc.tail()}")
    return proc, line.decode().strip()


async def _wait_ready(proc: Proc, url: str, *, timeout_s: float) -> None:
    """Poll `url` until it answers 200, the process exits, or the deadline passes (a bounded poll)."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if not proc.running:
                raise StackError(f"{proc.name} exited with {proc.process.returncode}:\n{proc.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise StackError(f"{proc.name} was not ready within {timeout_s:.0f}s:\n{proc.tail()}")


def _relay_env(provider_url: str, master_key: str, port: int, work: Path, redis_url: str) -> dict[str, str]:
    return {
        "BENCH_PROVIDER_URL": provider_url,
        "BENCH_PROVIDER_KEY": PROVIDER_KEY,
        "BENCH_MASTER_KEY": master_key,
        "SIDECAR_LITELLM_CONFIG": str(CONFIG),
        "SIDECAR_REDIS_URL": redis_url,
        "SIDECAR_SPOOL_DIR": str(work / "spool"),
        "SIDECAR_DATABASE_URL": f"sqlite:///{work / 'billing.db'}",
        "SIDECAR_HOST": "127.0.0.1",
        "SIDECAR_PORT": str(port),
        "SIDECAR_MAX_SESSIONS_PER_KEY": "1000000",
        "SIDECAR_MAX_SESSIONS": "1000000",
    }


async def start_stack(
    target: str, procs: Procs, where: Placement, opts: Options, *, surface: str = "realtime"
) -> Stack:
    """Start the fake provider and the relay for `target`; return once both answer."""
    stack = await _start_stack(target, procs, where, opts, route=SURFACE_ROUTES[surface], surface=surface)
    stack.surface = surface
    return stack


async def _start_stack(
    target: str, procs: Procs, where: Placement, opts: Options, *, route: str, surface: str = "realtime"
) -> Stack:
    module = "bench.callprovider" if surface in ("calls", "push") else "bench.provider"
    provider, provider_url = await _start_provider(procs, where, module=module)
    provider_port = int(provider_url.rsplit(":", 1)[1])
    if target == "direct":
        return Stack(f"{provider_url}{route}", {"Authorization": f"Bearer {PROVIDER_KEY}"}, None, provider)
    master_key = "sk-bench-master-" + secrets.token_hex(8)
    key_hash = hashlib.sha256(master_key.encode()).hexdigest()
    port = free_port()
    env = _relay_env(provider_url, master_key, port, procs.cwd, opts.redis_url)
    headers = {"Authorization": f"Bearer {master_key}"}
    url = f"{'http' if surface == 'calls' else 'ws'}://127.0.0.1:{port}{route}"
    if target == "sidecar":
        command = [*LAUNCH, "sidecar.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        relay = await procs.start("sidecar", pinned(command, where.relay), env=env)
        await _wait_ready(relay, f"http://127.0.0.1:{port}/readyz", timeout_s=READY_TIMEOUT_S)
        stack = Stack(url, headers, relay, provider, lambda: descendants(relay.pid), port, provider_port, key_hash)
        stack.provider_url = provider_url
        return stack
    if target == "sidecar-2w":
        command = _two_workers(port, env={**procs.env, **env}, cwd=procs.cwd)
        relay = await procs.start("sidecar-2w", pinned(command, where.relay), env=env)
        await _wait_ready(relay, f"http://127.0.0.1:{port}/readyz", timeout_s=READY_TIMEOUT_S)
        await _wait_workers(relay, 2)
        shown = (
            "sidecar serve --workers 2"
            if "sidecar.cli" in command
            else "uvicorn --factory bench.sidecar_app:app --workers 2"
        )
        return Stack(url, headers, relay, provider, lambda: _workers(relay.pid), port, provider_port, key_hash, shown)
    if target == "nginx":
        conf = procs.cwd / "nginx.conf"
        conf.write_text(nginx_conf(port=port, provider_port=provider_port, work=procs.cwd))
        command = [nginx_binary() or "nginx", "-p", str(procs.cwd), "-c", str(conf), "-g", "daemon off;"]
        relay = await procs.start("nginx", pinned(command, where.relay))
        await _wait_ready(relay, f"http://127.0.0.1:{port}/readyz", timeout_s=READY_TIMEOUT_S)
        provider_headers = {"Authorization": f"Bearer {PROVIDER_KEY}"}
        return Stack(url, provider_headers, relay, provider, lambda: descendants(relay.pid), port, provider_port)
    if target == "litellm":
        command = [str(LITELLM_VENV / "bin" / "litellm"), "--config", str(CONFIG), "--host", "127.0.0.1"]
        command += ["--port", str(port), "--num_workers", "1"]
        env |= {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
        relay = await procs.start("litellm", pinned(command, where.relay), env=env)
        await _wait_ready(relay, f"http://127.0.0.1:{port}/health/liveliness", timeout_s=LITELLM_READY_TIMEOUT_S)
        return Stack(url, headers, relay, provider, lambda: descendants(relay.pid), port, provider_port)
    raise ValueError(f"unknown target {target!r}")


def nginx_binary() -> str | None:
    """Debian's nginx (scripts/ensure-nginx.sh installs it), or one on PATH; None when there is none."""
    for candidate in ("/usr/sbin/nginx", shutil.which("nginx")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def nginx_conf(*, port: int, provider_port: int, work: Path) -> str:
    """nginx as a pure WebSocket proxy (one worker, no buffering, no logs per request), everything in `work`."""
    temp = " ".join(f"{kind}_temp_path {work / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""
worker_processes 1;
worker_rlimit_nofile 65536;
pid {work / "nginx.pid"};
error_log {work / "nginx-error.log"} warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    {temp}
    map $http_upgrade $connection_upgrade {{ default upgrade; "" close; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /readyz {{ return 200 "ok"; }}
        location / {{
            proxy_pass http://127.0.0.1:{provider_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""


def _two_workers(port: int, *, env: dict[str, str], cwd: Path) -> list[str]:
    """`sidecar serve --workers 2` when the measured code has it, else uvicorn's own --workers on the
    bench factory (older revisions: `sidecar serve` ran one worker)."""
    serve = [*LAUNCH, "sidecar.cli", "serve"]
    done = subprocess.run([*serve, "--help"], capture_output=True, text=True, env=env, cwd=cwd, timeout=60, check=False)
    if "--workers" in done.stdout:
        return [*serve, "--workers", "2", "--host", "127.0.0.1", "--port", str(port)]
    return _uvicorn_workers(port, 2)


def _uvicorn_workers(port: int, workers: int) -> list[str]:
    """uvicorn with the sidecar's own serve options, N workers, on the bench factory."""
    return [
        *(sys.executable, "-m", "uvicorn", "bench.sidecar_app:app", "--factory", "--workers", str(workers)),
        *("--host", "127.0.0.1", "--port", str(port), "--ws", "websockets-sansio"),
        *("--ws-max-size", str(4 * 1024 * 1024), "--ws-per-message-deflate", "false", "--lifespan", "on"),
        *("--no-access-log", "--log-level", "warning"),
    ]


def _workers(root: int) -> list[int]:
    """The uvicorn worker processes under a supervisor (not the supervisor, not multiprocessing helpers)."""
    return [pid for pid in descendants(root) if pid != root and "resource_tracker" not in cmdline(pid)]


async def _wait_workers(proc: Proc, count: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while len(_workers(proc.pid)) < count:
        if time.monotonic() > deadline:
            raise StackError(f"{proc.name}: fewer than {count} workers:\n{proc.tail()}")
        await asyncio.sleep(0.2)


# ---- one level ------------------------------------------------------------------------------------


@dataclass
class Timeline:
    """A level's moments, in monotonic seconds shared by every process."""

    connect_at: float
    window: tuple[float, float]
    deadline: float

    @classmethod
    def plan(cls, sessions: int, *, rate: float, duration_s: float) -> Timeline:
        connect_at = time.monotonic() + LOADGEN_START_S
        w0 = connect_at + sessions / rate + SETTLE_S
        w1 = w0 + duration_s
        return cls(connect_at, (w0, w1), w1 + DRAIN_S + 10.0)


@dataclass
class Samples:
    """The watched processes' /proc readings over a level: the relay's every SAMPLE_EVERY_S, and every
    role's (relay, provider, loadgen) exactly at the window's edges."""

    relay: list[tuple[float, Usage]] = field(default_factory=list)
    at_connect: Usage | None = None  # the relay's, when the first session connects
    at_w0: dict[str, Usage] | None = None
    at_w1: dict[str, Usage] | None = None
    busy_w0: dict[str, float] = field(default_factory=dict)
    busy_w1: dict[str, float] = field(default_factory=dict)

    def window_busy_s(self) -> dict[str, float]:
        """Busy CPU seconds inside the window, per CPU and for all ("cpu"), whoever used them."""
        return {cpu: self.busy_w1[cpu] - start for cpu, start in self.busy_w0.items() if cpu in self.busy_w1}

    def window_cpu_s(self, role: str) -> float | None:
        """CPU seconds `role` used inside the window (None when an edge was not sampled)."""
        if self.at_w0 is None or self.at_w1 is None:
            return None
        return self.at_w1[role].cpu_s - self.at_w0[role].cpu_s

    def open_cpu_s(self) -> float | None:
        """The relay's CPU seconds from the first connect to the window's start: opening every session (and
        holding them through the settling time)."""
        if self.at_connect is None or self.at_w0 is None:
            return None
        return self.at_w0["relay"].cpu_s - self.at_connect.cpu_s

    def window_sys_s(self, role: str) -> float | None:
        """The kernel's part of `window_cpu_s`."""
        if self.at_w0 is None or self.at_w1 is None:
            return None
        return self.at_w1[role].sys_s - self.at_w0[role].sys_s


async def _sample(
    stack: Stack, roles: dict[str, Callable[[], list[int]]], timeline: Timeline, samples: Samples
) -> None:
    """Sample until cancelled: the relay every SAMPLE_EVERY_S, every role at the window's edges."""
    edges = list(timeline.window)
    await asyncio.sleep(max(0.0, timeline.connect_at - time.monotonic()))
    samples.at_connect = usage(stack.relay_pids())
    while True:
        now = time.monotonic()
        if edges and now >= edges[0]:
            reading = {role: usage(pids()) for role, pids in roles.items()}
            if samples.at_w0 is None:
                samples.at_w0, samples.busy_w0 = reading, cpu_busy_s()
            else:
                samples.at_w1, samples.busy_w1 = reading, cpu_busy_s()
            edges.pop(0)
        samples.relay.append((now, usage(stack.relay_pids())))
        wake = now + SAMPLE_EVERY_S
        if edges:
            wake = min(wake, edges[0])
        await asyncio.sleep(max(0.0, wake - time.monotonic()))


async def _run_loadgen(
    procs: Procs, stack: Stack, sessions: int, timeline: Timeline, opts: Options, where: Placement, work: Path
) -> tuple[list[Proc], list[Path]]:
    shards = max(1, min(opts.loadgen_procs, sessions))
    started: list[Proc] = []
    rtt_files: list[Path] = []
    for shard in range(shards):
        rtt = work / f"rtt-{shard}.bin"
        module = "bench.callgen" if stack.surface == "calls" else "bench.loadgen"
        command = [
            *(sys.executable, "-m", module, "--url", stack.url, "--sessions", str(sessions)),
            *("--shard", str(shard), "--shards", str(shards), "--connect-at", repr(timeline.connect_at)),
            *("--rate", str(opts.rate), "--window", repr(timeline.window[0]), repr(timeline.window[1])),
            *("--deadline", repr(timeline.deadline), "--rtt-out", str(rtt)),
        ]
        if stack.surface != "calls":
            command += ["--drain", str(DRAIN_S), "--surface", stack.surface, "--model", SURFACE_MODELS[stack.surface]]
        if stack.hold and stack.surface != "calls":
            command += ["--stream-at", repr(timeline.window[0])]
        env = {"BENCH_HEADERS": json.dumps(stack.headers)}
        started.append(await procs.start(f"loadgen-{shard}", pinned(command, where.load), env=env, pipe_stdout=True))
        rtt_files.append(rtt)
    return started, rtt_files


async def _collect(loadgens: Sequence[Proc], timeline: Timeline) -> list[dict[str, Any] | None]:
    """Each load generator's JSON report (None when it failed), killing any that overruns its deadline."""

    async def one(proc: Proc) -> dict[str, Any] | None:
        assert proc.process.stdout is not None
        try:
            out = await asyncio.wait_for(proc.process.stdout.read(), timeline.deadline - time.monotonic() + 10.0)
            await proc.process.wait()
        except TimeoutError:
            await proc.stop()
            return None
        with contextlib.suppress(ValueError):
            parsed: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
            return parsed
        return None

    return list(await asyncio.gather(*(one(p) for p in loadgens)))


async def _wait_released(stack: Stack) -> bool:
    """Wait (bounded) until the relay holds no session's socket, client's or upstream's (see open_legs); for
    calls, no client leg and no sideband open at the provider."""
    deadline = time.monotonic() + IDLE_WAIT_S
    while time.monotonic() < deadline:
        if stack.surface == "calls":
            # The sidecar keeps its pooled HTTP connections to the provider (creates, hangups): a call is let go
            # once its sideband is closed, which the provider sees; client legs are counted as for sessions.
            if open_legs(stack.relay_port, 0) == 0 and (await provider_call(stack, "stats", {}))["open_sidebands"] == 0:
                return True
        elif open_legs(stack.relay_port, stack.provider_port) == 0:
            return True
        await asyncio.sleep(0.2)
    return False


@dataclass
class LevelOutcome:
    """Raw material for one result row."""

    target: str
    sessions: int
    reports: list[dict[str, Any] | None]
    rtt_s: array[float]
    samples: Samples
    idle: Usage | None
    after: Usage | None
    released: bool
    usage_events: int | None
    profile: dict[str, Any] | None = None
    command: str = ""
    #: RSS after each burst of the same sessions on the same relay (the first is `after`), when repeated.
    after_bursts: list[Usage] = field(default_factory=list)
    burst_errors: int = 0  # failed sessions in the extra bursts
    surface: str = "realtime"
    provider_stats: dict[str, Any] | None = None  # bench/callprovider.py's counters (calls and push rounds)


async def run_level(
    target: str,
    sessions: int,
    opts: Options,
    where: Placement,
    *,
    log_dir: Path,
    profile_to: Path | None = None,
    bursts: int = 1,
    surface: str = "realtime",
    hold: bool = False,
) -> LevelOutcome:
    """One target at one level, on a fresh stack that is torn down at the end whatever happens.

    With `bursts` > 1 the same load runs again (windows of REPEAT_WINDOW_S) on the same relay once it has
    let go of the previous burst, and RSS is read after each: what a later burst adds is what sessions keep.
    """
    with tempfile.TemporaryDirectory(prefix=f"bench-{target}-{sessions}-") as tmp:
        work = Path(tmp)
        name = f"{target}-{sessions}" if surface == "realtime" else f"{target}-{surface}-{sessions}"
        level_logs = log_dir / f"{name}{'-profiled' if profile_to else ''}"
        level_logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        if opts.tree is not None:
            env[TREE_VARIABLE] = str(opts.tree)
        async with Procs(level_logs, env=env, cwd=work) as procs:
            stack = await start_stack(target, procs, where, opts, surface=surface)
            stack.hold = hold
            await asyncio.sleep(1.0)
            idle = usage(stack.relay_pids()) if stack.relay else None
            timeline = Timeline.plan(sessions, rate=opts.rate, duration_s=opts.duration_s)
            if surface in ("calls", "push"):
                await provider_call(stack, "schedule", {"from": timeline.window[0], "until": timeline.window[1]})
            loadgens, rtt_files = await _run_loadgen(procs, stack, sessions, timeline, opts, where, work)

            roles = {
                "relay": stack.relay_pids,
                "provider": lambda: [stack.provider.pid],
                "loadgen": lambda: [p.pid for p in loadgens],
            }
            samples = Samples()
            sampler = asyncio.create_task(_sample(stack, roles, timeline, samples))
            profiler = (
                asyncio.create_task(_profile(stack, timeline, profile_to, where))
                if profile_to and stack.relay
                else None
            )
            try:
                reports = await _collect(loadgens, timeline)
            finally:
                sampler.cancel()
                (crash,) = await asyncio.gather(sampler, return_exceptions=True)
                if crash is not None and not isinstance(crash, asyncio.CancelledError):
                    raise crash
            profile = await profiler if profiler else None
            stats = await provider_call(stack, "stats", {}) if surface in ("calls", "push") else None
            released = await _wait_released(stack) if stack.relay else True
            await asyncio.sleep(1.0)
            after = usage(stack.relay_pids()) if stack.relay else None
            events = await take_usage_events(opts.redis_url, stack.key_hash) if stack.key_hash else None
            command = stack.command
            outcome = LevelOutcome(
                target,
                sessions,
                reports,
                _read_rtts(rtt_files),
                samples,
                idle,
                after,
                released,
                events,
                profile,
                command,
                surface=surface,
                provider_stats=stats,
            )
            if after is not None and bursts > 1:
                outcome.after_bursts = [after]
                for burst in range(2, bursts + 1):
                    burst_errors, released_again, after_again = await _burst(
                        procs, stack, sessions, opts, where, work, burst
                    )
                    outcome.burst_errors += burst_errors
                    outcome.released = outcome.released and released_again
                    outcome.after_bursts.append(after_again)
        return outcome


async def _burst(
    procs: Procs, stack: Stack, sessions: int, opts: Options, where: Placement, work: Path, burst: int
) -> tuple[int, bool, Usage]:
    """One more burst of `sessions` on the same relay: its failed sessions, whether all were released, RSS."""
    print(f"bench:   burst {burst} of {sessions} sessions on the same relay ...", file=sys.stderr, flush=True)
    timeline = Timeline.plan(sessions, rate=opts.rate, duration_s=min(opts.duration_s, REPEAT_WINDOW_S))
    burst_dir = work / f"burst-{burst}"
    burst_dir.mkdir()
    loadgens, _ = await _run_loadgen(procs, stack, sessions, timeline, opts, where, burst_dir)
    reports = await _collect(loadgens, timeline)
    got = [r for r in reports if r is not None]
    errors = report.error_detail(got, len(reports) - len(got), sessions, len(reports))
    released = await _wait_released(stack)
    await asyncio.sleep(1.0)
    return sum(errors.values()), released, usage(stack.relay_pids())


async def provider_call(stack: Stack, what: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST bench/callprovider.py's /bench/<what> (schedule, stats); its JSON answer ({} when none)."""
    base = stack.provider_url.replace("ws://", "http://", 1)
    async with httpx.AsyncClient(timeout=10.0) as client:
        response = await client.post(f"{base}/bench/{what}", json=body)
    response.raise_for_status()
    answer: dict[str, Any] = response.json() if response.content else {}
    return answer


def _read_rtts(files: Sequence[Path]) -> array[float]:
    out = array("d")
    for path in files:
        with contextlib.suppress(OSError):
            out.frombytes(path.read_bytes())
    return out


# ---- Redis (the sidecar's usage stream) ----------------------------------------------------------------


USAGE_STREAM: Final = "realtime:usage"


async def take_usage_events(redis_url: str, key_hash: str) -> int | None:
    """Count the usage events this level's sidecar published (its master key's hash is fresh per level)
    and delete them; other entries (a concurrent run's) are left alone. None if Redis failed."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    ours: list[bytes] = []
    tag = key_hash.encode()
    try:
        cursor = "-"
        while True:
            entries: list[tuple[bytes, dict[bytes, bytes]]] = await client.xrange(  # type: ignore[assignment]
                USAGE_STREAM, min=cursor, max="+", count=5000
            )
            ours += [entry_id for entry_id, fields in entries if fields.get(b"key_hash") == tag]
            if len(entries) < 5000:
                break
            cursor = "(" + entries[-1][0].decode()
        for start in range(0, len(ours), 1000):
            await client.xdel(USAGE_STREAM, *ours[start : start + 1000])
        return len(ours)
    except Exception:  # a report detail only: never fail the level over it
        return None
    finally:
        await client.aclose()


# ---- profile -------------------------------------------------------------------------------------------


async def _profile(stack: Stack, timeline: Timeline, svg: Path, where: Placement) -> dict[str, Any]:
    """py-spy on the relay inside the window: a flame graph (SVG) and, at once, raw stacks for a top list."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    assert stack.relay is not None
    seconds = max(1, min(10, int(timeline.window[1] - timeline.window[0]) - 1))
    await asyncio.sleep(max(0.0, timeline.window[0] + 0.5 - time.monotonic()))
    pid = str(stack.relay.pid)
    raw = svg.with_suffix(".raw")
    common = ["--pid", pid, "--duration", str(seconds), "--rate", "100"]
    commands = [
        pinned([py_spy, "record", "-o", str(svg), "--nonblocking", *common], where.load),
        pinned([py_spy, "record", "-o", str(raw), "--format", "raw", "--native", "--function", *common], where.load),
    ]
    runs = [
        await asyncio.create_subprocess_exec(*c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in commands
    ]
    outs = await asyncio.gather(*(asyncio.wait_for(r.communicate(), seconds + 30) for r in runs))
    errors = [err.decode(errors="replace")[-300:] for (_, err), r in zip(outs, runs, strict=True) if r.returncode]
    return {"svg": _shown(svg), "raw": _shown(raw), "seconds": seconds, "errors": errors, **report.top_functions(raw)}


def _shown(path: Path) -> str:
    """`path` relative to the repository when it is inside it."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


# ---- LiteLLM ------------------------------------------------------------------------------------------


def install_litellm(log: Path) -> str | None:
    """Run bench/litellm_env.sh (bounded); None when LiteLLM is ready, else why not."""
    try:
        with log.open("wb") as sink:
            done = subprocess.run(
                ["bash", str(BENCH / "litellm_env.sh")],
                stdout=sink,
                stderr=subprocess.STDOUT,
                timeout=LITELLM_INSTALL_TIMEOUT_S,
                check=False,
            )
    except subprocess.TimeoutExpired:
        return f"bench/litellm_env.sh did not finish within {LITELLM_INSTALL_TIMEOUT_S:.0f}s"
    if done.returncode != 0:
        tail = " | ".join(log.read_text(errors="replace").splitlines()[-3:])
        return f"bench/litellm_env.sh failed ({done.returncode}): {tail}"
    return None


# ---- consumer ------------------------------------------------------------------------------------------


def run_consumer_bench(events: int, redis_url: str, log: Path) -> dict[str, Any]:
    """bench.consumer_bench in its own process; its JSON, or {"error": ...}."""
    command = [sys.executable, "-m", "bench.consumer_bench", "--events", str(events), "--redis-url", redis_url]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        with log.open("wb") as sink:
            done = subprocess.run(
                command, stdout=subprocess.PIPE, stderr=sink, timeout=CONSUMER_TIMEOUT_S, check=False, env=env
            )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CONSUMER_TIMEOUT_S:.0f}s"}
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: " + " | ".join(log.read_text().splitlines()[-3:])}
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


# ---- the run --------------------------------------------------------------------------------------------


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
    return done.stdout if done.returncode == 0 else ""


def _code(rev: str | None, tree: Path) -> dict[str, Any]:
    """Which sidecar code is measured: the working tree (HEAD + its uncommitted changes under sidecar/),
    or REV's sidecar/ extracted into `tree` (read-only git commands only)."""
    head = _git("rev-parse", "HEAD").strip()
    if rev is None:
        dirty = [line[3:] for line in _git("status", "--porcelain", "--", "sidecar").splitlines()]
        return {"measured": "working tree", "head": head, "uncommitted_under_sidecar": dirty}
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}").strip()
    if not commit:
        raise SystemExit(f"bench: --rev {rev!r} is not a commit of {REPO}")
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", commit, "sidecar"], capture_output=True, check=True
    )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(tree, filter="data")
    return {"measured": f"git archive {rev}", "commit": commit, "head": head}


def machine(where: Placement) -> dict[str, Any]:
    """nproc, CPU model, memory, Python, and where each process was pinned."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model or platform.processor(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "placement": where.describe(),
    }


async def measure(opts: Options, stamp: str, log_dir: Path, notes: list[str]) -> list[dict[str, Any]]:
    """Every relay target at every level (then the two-worker level); one result row each. The surface
    rounds (`measure_surfaces`) follow, their rows marked with `surface` and `round`."""
    where = placement(pin=opts.pin)
    rows: list[dict[str, Any]] = []
    targets = [t for t in opts.targets if t in ("sidecar", "direct", "nginx", "litellm")]
    if "nginx" in targets and nginx_binary() is None:
        notes.append("nginx not measured: no nginx binary (scripts/ensure-nginx.sh installs Debian's).")
        targets.remove("nginx")
    if "litellm" in targets:
        reason = await asyncio.to_thread(install_litellm, log_dir / "litellm-install.log")
        if reason is not None:
            notes.append(f"LiteLLM not measured: {reason}")
            targets.remove("litellm")
    for sessions in opts.levels:
        for target in targets:
            row = await _measured_row(target, sessions, opts, where, log_dir)
            rows.append(row)
            if target == "sidecar" and sessions == opts.profile_level:
                row["profile"] = await _profiled(sessions, opts, where, stamp, log_dir, notes)
    if "sidecar-2w" in opts.targets and opts.workers2_level > 0:
        rows.append(await _measured_row("sidecar-2w", opts.workers2_level, opts, unpinned(), log_dir))
    return rows + await measure_surfaces(opts, where, log_dir)


def calls_order(rounds: int) -> list[list[str]]:
    """A calls comparison's rounds: /v1/realtime (chunk+reply), /v1/realtime relaying pushed events, WebRTC
    calls, the order rotated each round (surface_order's rule)."""
    return [list(CALLS_SURFACES[n % 3 :] + CALLS_SURFACES[: n % 3]) for n in range(rounds)]


async def measure_calls(opts: Options, where: Placement, log_dir: Path) -> list[dict[str, Any]]:
    """The sidecar at each --calls-levels N: WebRTC calls vs /v1/realtime sessions, --calls-rounds rounds
    interleaved, a fresh stack each; a row each, marked `calls_surface`, `round` and `sessions`. Every session
    streams (or is pushed to) only from the window's start, so the CPU up to it is the opening's alone."""
    rows: list[dict[str, Any]] = []
    for sessions in opts.calls_levels:
        for number, order in enumerate(calls_order(opts.calls_rounds), start=1):
            for surface in order:
                logs = log_dir / f"calls-{sessions}-round-{number}"
                paced = dataclasses.replace(opts, rate=opts.calls_rate)
                row = await _measured_row("sidecar", sessions, paced, where, logs, surface=surface, hold=True)
                rows.append(row | {"calls_surface": surface, "round": number})
    return rows


def surface_order(surfaces: Sequence[str], rounds: int) -> list[list[str]]:
    """/v1/realtime and `surfaces`, once per round, the order rotated each round (so that no surface always
    runs first, or right after another): [[r, l, t], [l, t, r], [t, r, l], ...]."""
    every = ["realtime", *(s for s in surfaces if s != "realtime")]
    return [every[n % len(every) :] + every[: n % len(every)] for n in range(rounds)]


async def measure_surfaces(opts: Options, where: Placement, log_dir: Path) -> list[dict[str, Any]]:
    """The sidecar at --surface-level on each surface, --surface-rounds times interleaved; a row each."""
    if "sidecar" not in opts.targets or not opts.surfaces or opts.surface_level < 1:
        return []
    rows: list[dict[str, Any]] = []
    for number, order in enumerate(surface_order(opts.surfaces, opts.surface_rounds), start=1):
        for surface in order:
            logs = log_dir / f"surfaces-round-{number}"  # each round's processes' logs apart
            row = await _measured_row("sidecar", opts.surface_level, opts, where, logs, surface=surface)
            rows.append(row | {"surface": surface, "round": number})
    return rows


async def _measured_row(
    target: str,
    sessions: int,
    opts: Options,
    where: Placement,
    log_dir: Path,
    *,
    surface: str | None = None,
    hold: bool = False,
) -> dict[str, Any]:
    """One level's row. With `surface` (a surface round), on that route and never repeated in bursts."""
    shown = f"{target} ({surface})" if surface else target
    print(f"bench: {shown} x {sessions} sessions ...", file=sys.stderr, flush=True)
    others = foreign_benchmarks()
    bursts = opts.bursts if target == "sidecar" and sessions == opts.bursts_level and surface is None else 1
    try:
        outcome = await run_level(
            target, sessions, opts, where, log_dir=log_dir, bursts=bursts, surface=surface or "realtime", hold=hold
        )
    except StackError as exc:
        return report.failed_row(target, sessions, str(exc))
    row = report.row(outcome, duration_s=opts.duration_s)
    if others := sorted(set(others) | set(foreign_benchmarks())):
        row["disturbed_by"] = f"another benchmark was running (pids {others[:5]})"
        print(f"bench:   WARNING: {row['disturbed_by']}", file=sys.stderr, flush=True)
    print(f"bench:   {report.one_line(row)}", file=sys.stderr, flush=True)
    return row


async def _profiled(
    sessions: int, opts: Options, where: Placement, stamp: str, log_dir: Path, notes: list[str]
) -> dict[str, Any] | None:
    """The sidecar at `sessions` once more, under py-spy (a separate run: profiling costs CPU)."""
    if shutil.which("py-spy") is None and not (Path(sys.executable).parent / "py-spy").exists():
        notes.append("No profile: py-spy is not installed (.venv/bin/pip install py-spy).")
        return None
    print(f"bench: sidecar x {sessions} sessions, profiled ...", file=sys.stderr, flush=True)
    svg = opts.out / f"profile-{stamp}.svg"
    try:
        outcome = await run_level("sidecar", sessions, opts, where, log_dir=log_dir, profile_to=svg)
    except StackError as exc:
        notes.append(f"No profile: {exc}")
        return None
    profile = outcome.profile or {}
    (opts.out / f"profile-{stamp}.txt").write_text(report.profile_text(profile))
    return profile


async def run(opts: Options) -> dict[str, Any]:
    """The whole benchmark; writes the outputs and returns the result document."""
    raise_fd_limit()
    # SIGTERM cancels the run like Ctrl-C does, so every subprocess is still stopped on the way out.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    where = placement(pin=opts.pin)
    if where.load not in (None, _ALL):  # the orchestrator's own sampling stays off the relay's CPU
        os.sched_setaffinity(0, {int(cpu) for cpu in str(where.load).split(",")})
    opts.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    log_dir = opts.out / f"logs-{stamp}"
    log_dir.mkdir()
    started = time.monotonic()
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-rev-") as tree:
        code = _code(opts.rev, Path(tree))
        if opts.rev is not None:
            opts = dataclasses.replace(opts, tree=Path(tree))
        rows = [] if opts.calls_only else await measure(opts, stamp, log_dir, notes)
        if opts.calls_levels:
            rows += await measure_calls(opts, placement(pin=opts.pin), log_dir)
    consumer = None
    if "consumer" in opts.targets and opts.consumer_events > 0 and not opts.calls_only:
        print(f"bench: consumer, {opts.consumer_events} events ...", file=sys.stderr, flush=True)
        consumer = await asyncio.to_thread(
            run_consumer_bench, opts.consumer_events, opts.redis_url, log_dir / "consumer.log"
        )
    document = {
        "schema": "realtime-sidecar.bench.v1",
        "timestamp": stamp,
        "elapsed_s": round(time.monotonic() - started, 1),
        "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
        "options": {
            "levels": list(opts.levels),
            "duration_s": opts.duration_s,
            "targets": list(opts.targets),
            "connect_rate": opts.rate,
            "loadgen_procs": opts.loadgen_procs,
            "workers2_level": opts.workers2_level,
            "profile_level": opts.profile_level,
            "bursts": opts.bursts,
            "bursts_level": opts.bursts_level,
            "surfaces": list(opts.surfaces),
            "surface_level": opts.surface_level,
            "surface_rounds": opts.surface_rounds,
            "calls_levels": list(opts.calls_levels),
            "calls_rounds": opts.calls_rounds,
            "calls_only": opts.calls_only,
        },
        "machine": machine(placement(pin=opts.pin)),
        "code": code,
        "results": [r for r in rows if "surface" not in r and "calls_surface" not in r],
        "surfaces": report.surfaces(
            [r for r in rows if "surface" in r and "calls_surface" not in r],
            level=opts.surface_level,
            rounds=opts.surface_rounds,
        ),
        "calls": report.calls([r for r in rows if "calls_surface" in r], rounds=opts.calls_rounds),
        "consumer": consumer,
        "notes": notes,
    }
    document["goals"] = report.goals(document)
    report.write(document, opts.out, stamp)
    if opts.update_docs:
        report.update_docs(document, DOCS)
    return document


def _levels(text: str) -> tuple[int, ...]:
    levels = tuple(int(part) for part in text.split(",") if part.strip())
    if not levels or any(n < 1 for n in levels):
        raise argparse.ArgumentTypeError("levels are positive whole numbers, comma-separated")
    return levels


def _calls_levels(text: str) -> tuple[int, ...]:
    return () if text.strip() in ("", "none") else _levels(text)


def _targets(text: str) -> tuple[str, ...]:
    targets = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown or not targets:
        raise argparse.ArgumentTypeError(f"targets are some of {','.join(ALL_TARGETS)}; unknown: {unknown}")
    return targets


def _surfaces(text: str) -> tuple[str, ...]:
    if text.strip() == "none":
        return ()
    surfaces = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [s for s in surfaces if s not in NEW_SURFACES]
    if unknown:
        raise argparse.ArgumentTypeError(f"surfaces are some of {','.join(NEW_SURFACES)} (or none); unknown: {unknown}")
    return surfaces


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """The command line as Options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--levels", type=_levels, default=(1, 100, 500, 1000, 1500), help="sessions per level")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per level (default 20)")
    parser.add_argument("--targets", type=_targets, default=ALL_TARGETS, help=",".join(ALL_TARGETS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default bench/results)")
    parser.add_argument("--rate", type=float, default=200.0, help="sessions connected per second (default 200)")
    parser.add_argument("--loadgen-procs", type=int, default=1, help="load generator processes (default 1)")
    parser.add_argument("--workers2-level", type=int, default=1000, help="sessions for sidecar-2w (0: skip)")
    parser.add_argument(
        "--profile-level", type=int, default=500, help="profile the sidecar at this level if it is one (0: never)"
    )
    parser.add_argument(
        "--bursts", type=int, default=3, help="run the sidecar's --bursts-level this many times on one process"
    )
    parser.add_argument("--bursts-level", type=int, default=1000, help="the level repeated by --bursts (0: never)")
    parser.add_argument(
        "--surfaces",
        type=_surfaces,
        default=NEW_SURFACES,
        help="surfaces compared with /v1/realtime (default live,translation; 'none': skip)",
    )
    parser.add_argument("--surface-level", type=int, default=1000, help="sessions of each surface level (0: skip)")
    parser.add_argument("--surface-rounds", type=int, default=3, help="rounds of the surface levels (default 3)")
    parser.add_argument(
        "--calls-levels",
        type=_calls_levels,
        default=(),
        help="WebRTC calls vs /v1/realtime at these session counts (e.g. 500,1000; default: none)",
    )
    parser.add_argument("--calls-rounds", type=int, default=3, help="rounds of the calls levels (default 3)")
    parser.add_argument(
        "--calls-rate", type=float, default=100.0, help="calls created (sessions connected) per second (default 100)"
    )
    parser.add_argument(
        "--calls-only", action="store_true", help="only the calls levels (no other level, surface or consumer)"
    )
    parser.add_argument("--consumer-events", type=int, default=20_000, help="events for the consumer benchmark")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="the sidecar's Redis (a spare db)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--rev", help="measure this git revision's sidecar/ (git archive) instead of the working tree")
    parser.add_argument(
        "--docs",
        choices=("auto", "yes", "no"),
        default="auto",
        help="rewrite docs/performance.md (auto: default --out)",
    )
    args = parser.parse_args(argv)
    out = args.out.resolve()
    return Options(
        levels=args.levels,
        duration_s=args.duration,
        targets=args.targets,
        out=out,
        rate=args.rate,
        loadgen_procs=args.loadgen_procs,
        workers2_level=args.workers2_level,
        profile_level=args.profile_level,
        consumer_events=args.consumer_events,
        bursts=max(1, args.bursts),
        bursts_level=args.bursts_level,
        redis_url=args.redis_url,
        pin=not args.no_pin,
        rev=args.rev,
        update_docs=args.docs == "yes"
        or (args.docs == "auto" and out == DEFAULT_OUT.resolve() and not args.calls_only),
        surfaces=args.surfaces,
        surface_level=args.surface_level,
        surface_rounds=max(1, args.surface_rounds),
        calls_levels=args.calls_levels or ((500, 1000) if args.calls_only else ()),
        calls_rounds=max(1, args.calls_rounds),
        calls_rate=args.calls_rate,
        calls_only=args.calls_only,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark; print the markdown table; exit 0 (the numbers are the outcome, not a verdict)."""
    opts = parse_args(argv)
    try:
        document = asyncio.run(run(opts))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; every subprocess it started has been stopped", file=sys.stderr)
        raise SystemExit(130) from None
    print(report.markdown(document))
    latest = opts.out / "latest.json"
    print(f"\nwritten: {latest} (and .md){'; docs/performance.md updated' if opts.update_docs else ''}")


if __name__ == "__main__":
    main()
