"""Subprocesses the benchmark starts, and what /proc says about them.

Every process is started in its own session (so its process group holds everything it forks: uvicorn
workers, LiteLLM's helpers) and stopped by signalling that group: SIGTERM, then SIGKILL after a grace.
`Procs` stops everything it started, in reverse order, whatever happened (use it in `async with`).

CPU time is utime+stime from /proc/<pid>/stat, RSS is VmRSS from /proc/<pid>/status, summed over a
process and its descendants (a worker supervisor's children count).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, Self

CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
STOP_GRACE_S: Final = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinned(command: Sequence[str], cpus: str | None) -> list[str]:
    """`command` under `taskset -c cpus` (which execs it: the pid stays the command's), or as is."""
    if cpus is None or shutil.which("taskset") is None:
        return list(command)
    return ["taskset", "-c", cpus, *command]


class Proc:
    """One started subprocess (its own process group); output goes to a log file unless piped."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.process = process
        self.log = log

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def tail(self, lines: int = 15) -> str:
        """The end of the log (for error reports)."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self, *, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the process group, SIGKILL it after `grace_s`; wait for the process. Idempotent."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
            try:
                await asyncio.wait_for(self.process.wait(), grace_s)
            except TimeoutError:
                continue
            if sig is signal.SIGTERM:
                # The leader is gone; make sure nothing it forked outlives it.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
            return


class Procs:
    """Starts subprocesses and stops them all on exit, newest first, even on error or cancellation."""

    def __init__(self, log_dir: Path, *, env: dict[str, str], cwd: Path) -> None:
        self.log_dir = log_dir
        self.env = env
        self.cwd = cwd
        self.started: list[Proc] = []

    async def start(
        self, name: str, command: Sequence[str], *, env: dict[str, str] | None = None, pipe_stdout: bool = False
    ) -> Proc:
        """Start `command`; stderr (and stdout unless piped) go to `<log_dir>/<name>.log`."""
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as sink:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if pipe_stdout else sink,
                stderr=sink,
                env={**self.env, **(env or {})},
                cwd=self.cwd,
                start_new_session=True,
            )
        proc = Proc(name, process, log)
        self.started.append(proc)
        return proc

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop_all()

    async def stop_all(self) -> None:
        """Stop every started process, newest first (shielded: runs to the end even when cancelled)."""
        while self.started:
            await asyncio.shield(self.started.pop().stop())


# ---- /proc ------------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (field 3, `state`, is index 0)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """`pid` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


@dataclass(frozen=True)
class Usage:
    """CPU seconds used so far and resident memory now, summed over some processes."""

    cpu_s: float
    rss_kb: int
    fds: int
    sys_s: float = 0.0  # the part of cpu_s spent in the kernel (stime)


def usage(pids: Sequence[int]) -> Usage:
    """utime+stime (and stime alone), VmRSS and open file descriptors of `pids` (processes that have gone count 0)."""
    cpu = kernel = 0.0
    rss = 0
    fds = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = _stat_fields(pid)
            cpu += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
            kernel += int(fields[12]) / CLOCK_TICKS
            rss += _vm_rss_kb(pid)
            fds += len(os.listdir(f"/proc/{pid}/fd"))
    return Usage(cpu, rss, fds, kernel)


def _vm_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_busy_s() -> dict[str, float]:
    """Busy CPU seconds so far per CPU ("cpu0", "cpu1", ...) and for all ("cpu"), from /proc/stat.

    Busy is everything but idle and iowait: user, nice, system, irq, softirq, steal.
    """
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            if not line.startswith("cpu"):
                break
            name, *values = line.split()
            ticks = [int(v) for v in values[:8]]
            out[name] = (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS
    return out


# /proc/net/tcp states a process still holds a socket in: ESTABLISHED, CLOSE_WAIT.
_HELD_STATES: Final = frozenset({"01", "08"})


def open_legs(relay_port: int, provider_port: int) -> int:
    """TCP connections a relay still holds for sessions: client legs (local port `relay_port`) and
    upstream legs (remote port `provider_port`), in a state only the owning process can end.

    The relay is the only process with either kind once the load generator has exited (the provider's
    own ends of upstream legs have `provider_port` as their local port, and are not counted).
    """
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                local, remote, state = parts[1], parts[2], parts[3]
                if state not in _HELD_STATES:
                    continue
                if int(local.rsplit(":", 1)[1], 16) == relay_port or int(remote.rsplit(":", 1)[1], 16) == provider_port:
                    count += 1
    return count


def ancestors(pid: int) -> list[int]:
    """The processes above `pid`, its parent first, up to (not including) pid 0."""
    found: list[int] = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        parent = int(_stat_fields(pid)[1])
        while parent > 0 and parent not in found:
            found.append(parent)
            parent = int(_stat_fields(parent)[1])
    return found


def foreign_benchmarks() -> list[int]:
    """Pids of benchmark processes (bench.run/loadgen/provider) that are not this run's: a concurrent
    benchmark on the same machine disturbs every figure of this one."""
    ours = set(descendants(os.getpid())) | set(ancestors(os.getpid()))  # e.g. a `timeout` wrapper
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in ours:
            line = cmdline(int(entry.name))
            if any(f"bench.{name}" in line for name in ("run", "loadgen", "provider")):
                found.append(int(entry.name))
    return found


def cmdline(pid: int) -> str:
    """The process's command line, space-separated ('' if it has gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def quiet_gc() -> None:
    """Collect garbage rarely, in the load generator and the fake provider (they share one core).

    Everything alive at startup is frozen out of collections, and the youngest generation is collected
    after 50,000 allocations instead of 700 (each frame allocates a few short-lived objects; cycles are
    rare). Memory stays bounded; the collection overhead goes. Never used in the relays under test.
    """
    import gc

    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def raise_fd_limit() -> int:
    """Raise the open-file soft limit to the hard limit (children inherit it); return it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Listening(Protocol):
    """A listening server (asyncio's, picows'): its sockets, and an `async with` that closes it."""

    @property
    def sockets(self) -> Sequence[socket.socket]: ...

    async def __aenter__(self) -> object: ...

    async def __aexit__(self, *exc: object) -> object: ...


async def serve_until_signal(server: Listening, host: str) -> None:
    """Print the server's `ws://host:port` (what the bench reads to find it), then serve until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"ws://{host}:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await stop.wait()


def provider_main(
    argv: list[str] | None,
    *,
    prog: str,
    description: str,
    serve: Callable[..., Coroutine[Any, Any, None]],
    default_api_key: str,
) -> None:
    """A bench provider's command line: `--host`, `--port`, `--api-key`; then `serve` on uvloop, like the relays
    under test."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default=default_api_key)
    args = parser.parse_args(argv)
    raise_fd_limit()
    quiet_gc()
    import uvloop

    uvloop.run(serve(host=args.host, port=args.port, api_key=args.api_key))
