"""The uvicorn server with a graceful drain (docs/api.md: close 1001 `server_shutdown`).

The first SIGTERM (or SIGINT) does not stop the server at once: readiness fails and new sessions are
refused, live sessions get `drain_grace_s` to finish, then the rest are ended with 1001 and billed, and
only then does uvicorn shut down. A second signal shuts down at once (sessions are still billed: each
relay submits its final usage event on its way out, and the lifespan flushes the publisher).

Clients reach the app through `sidecar.wsserver`'s protocols: a cap on open connections (lowered to what the
open-file limit holds, which `serve_workers` first raises to the hard limit) and a deadline for each request
head, the WebSocket upgrade's included (docs/operations.md, "Connections and file limits").
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any, Final

import uvicorn
from starlette.applications import Starlette

from sidecar import tuning
from sidecar.config import DEFAULT_HANDSHAKE_TIMEOUT_S, DEFAULT_MAX_CONNECTIONS
from sidecar.errors import ConfigError
from sidecar.wsserver import GuardedHttpProtocol, RelayWebSocketProtocol

log = logging.getLogger("sidecar.server")

try:  # uvloop (a uvicorn[standard] dependency) measured faster: see docs/performance.md
    import uvloop

    def run_loop(main: Coroutine[Any, Any, None]) -> None:
        """Run `main` on uvloop."""
        uvloop.run(main)

except ImportError:  # pragma: no cover - uvloop is a dependency; this keeps other platforms working

    def run_loop(main: Coroutine[Any, Any, None]) -> None:
        """Run `main` on asyncio's default loop."""
        asyncio.run(main)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains the sidecar's sessions first."""

    def __init__(self, config: uvicorn.Config, *, app: Starlette, grace_s: float, tune: bool = False) -> None:
        super().__init__(config)
        self._tune = tune
        self._app = app
        self._grace_s = grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self._tune:
            tuning.pool_mask_randomness()
            tuning.settle_gc()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_task is None and not self.should_exit and self._loop is not None:
            self._loop.call_soon_threadsafe(self.begin_drain)
            return
        super().handle_exit(sig, frame)

    def begin_drain(self) -> None:
        """Start draining (idempotent); the server exits when the drain is over."""
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self.drain())

    async def drain(self) -> None:
        """Drain the app's sessions, then let uvicorn shut down."""
        services = getattr(self._app.state, "services", None)
        try:
            if services is not None:
                live = len(services.supervisor.live)
                log.info("draining: new sessions refused; waiting up to %gs for %d live sessions", self._grace_s, live)
                await services.supervisor.drain(self._grace_s)
                log.info("drained: every session ended and billed; flushing usage and stopping")
        finally:
            self.should_exit = True


def config_for(
    app: Starlette,
    *,
    host: str,
    port: int,
    max_frame_bytes: int,
    handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    **options: object,
) -> uvicorn.Config:
    """The uvicorn settings the sidecar runs with (measured choices: see docs/performance.md).

    Raises ConfigError for a non-positive handshake timeout or connection cap. The cap is lowered (with a
    warning) to what the process's open-file limit can hold.
    """
    if not handshake_timeout_s > 0:
        raise ConfigError(f"the handshake timeout must be positive, got {handshake_timeout_s!r}")
    if max_connections <= 0:
        raise ConfigError(f"the connection cap must be positive, got {max_connections!r}")
    cap = tuning.connection_cap(max_connections, open_files=tuning.open_file_limit())
    if cap < max_connections:
        log.warning("connection cap lowered from %d to %d to fit the open-file limit", max_connections, cap)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=GuardedHttpProtocol.limited(handshake_timeout_s=handshake_timeout_s, max_connections=cap),
        ws=RelayWebSocketProtocol,
        ws_max_size=max_frame_bytes,
        ws_per_message_deflate=False,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
        **options,  # type: ignore[arg-type]
    )


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before any worker starts (workers share it). Raises ConfigError when the
    address cannot be listened on (e.g. the port is in use)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except (OSError, OverflowError) as exc:  # a port in use or out of range, an address not of this host
        sock.close()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot listen on {host}:{port}: {reason}") from exc
    sock.set_inheritable(True)
    return sock


def _serve_one(build: Callable[[], tuple[Starlette, uvicorn.Config, float]], sock: socket.socket) -> None:
    app, config, grace_s = build()
    run_loop(DrainingServer(config, app=app, grace_s=grace_s, tune=True).serve(sockets=[sock]))


def serve_workers(
    build: Callable[[], tuple[Starlette, uvicorn.Config, float]],
    *,
    host: str,
    port: int,
    workers: int,
    sock: socket.socket | None = None,
) -> int:
    """Serve with `workers` processes sharing one listening socket; returns the exit code.

    `build` runs in each worker (after the fork) and returns the app, its uvicorn config and the drain
    grace. SIGTERM/SIGINT to this process are passed to every worker, each of which drains its own
    sessions; this process exits when they all have. A worker that dies otherwise is replaced (`Workers`),
    and the workers share their metrics through prometheus_client's multiprocess mode (sidecar/metrics.py).
    """
    tuning.raise_file_limit()
    sock = bind(host, port) if sock is None else sock  # `sock`: bound by the caller (`bind`), to check it first
    if workers <= 1:
        _serve_one(build, sock)
        return 0
    parent = os.getpid()
    with _metrics_dir() as directory:
        code = Workers(lambda: _worker(build, sock, parent), workers, metrics_dir=directory).run()
    sock.close()
    return code


# prometheus_client's multiprocess switch (sidecar.metrics.MULTIPROC_ENV). Not imported from there: importing
# prometheus_client in this process before the variable is set would fix its value class for every worker.
_MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
MAX_RESTARTS: Final = 5  # worker restarts within RESTART_WINDOW_S; one more and the server stops (exit 1)
RESTART_WINDOW_S: Final = 60.0


@contextlib.contextmanager
def _metrics_dir() -> Iterator[str]:
    """A fresh directory for the workers' metrics, named in the environment before any worker forks."""
    directory = tempfile.mkdtemp(prefix="sidecar-metrics-")
    if "prometheus_client" in sys.modules:  # too late for the mode: each worker would report only itself
        log.warning("prometheus_client was imported before the workers started; /metrics shows one worker each")
    os.environ[_MULTIPROC_ENV] = directory
    try:
        yield directory
    finally:
        os.environ.pop(_MULTIPROC_ENV, None)
        shutil.rmtree(directory, ignore_errors=True)


def _worker(build: Callable[[], tuple[Starlette, uvicorn.Config, float]], sock: socket.socket, parent: int) -> None:
    """One worker: the parent's signal handlers are not its own (uvicorn installs its own once it serves), and
    it drains when its parent dies."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _die_with(parent)
    _serve_one(build, sock)


PR_SET_PDEATHSIG: Final = 1  # linux/prctl.h


def _die_with(parent: int) -> None:
    """Have Linux send this worker SIGTERM when `parent` dies: a parent killed with SIGKILL would otherwise
    leave its workers serving (and holding the port) with no one to stop them. SIGTERM drains and bills, as
    on any stop. A parent already gone by now gets the same SIGTERM at once. Elsewhere, nothing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def _describe(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit status {exitcode}"


class Workers:
    """The parent of `serve_workers`: starts the workers, passes SIGTERM/SIGINT on, and replaces a worker
    that dies while no signal asked them to stop, at most `max_restarts` times within `window_s` (beyond,
    a crash loop: the others are stopped and the server exits 1, for its supervisor to restart)."""

    def __init__(
        self,
        target: Callable[[], None],
        count: int,
        *,
        metrics_dir: str | None = None,
        max_restarts: int = MAX_RESTARTS,
        window_s: float = RESTART_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._context = multiprocessing.get_context("fork")
        self._target = target
        self._count = count
        self._metrics_dir = metrics_dir
        self._max_restarts = max_restarts
        self._window_s = window_s
        self._clock = clock
        self._restarts: deque[float] = deque()
        self.children: list[BaseProcess] = []
        self.stopping = False
        self.gave_up = False

    def run(self) -> int:
        """Run until every worker has exited after a signal; returns the exit code."""
        signal.signal(signal.SIGTERM, self.forward)
        signal.signal(signal.SIGINT, self.forward)
        for _ in range(self._count):
            self._start()
        codes: list[int] = []
        while self.children:
            ready = set(multiprocessing.connection.wait([c.sentinel for c in self.children]))
            for child in [c for c in self.children if c.sentinel in ready]:
                child.join()
                self.children.remove(child)
                self._forget(child)
                if self.stopping:
                    codes.append(child.exitcode or 0)
                else:
                    self._replace(child)
        return 1 if self.gave_up else max(codes, default=0)

    def forward(self, sig: int, frame: FrameType | None) -> None:
        """Pass a signal to every live worker; from now on no worker is replaced."""
        self.stopping = True
        for child in self.children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, sig)

    def _start(self) -> None:
        child = self._context.Process(target=self._target, daemon=False)
        child.start()
        self.children.append(child)
        if self.stopping and child.pid is not None:  # a signal came while it forked
            os.kill(child.pid, signal.SIGTERM)

    def _replace(self, child: BaseProcess) -> None:
        now = self._clock()
        while self._restarts and now - self._restarts[0] > self._window_s:
            self._restarts.popleft()
        if len(self._restarts) >= self._max_restarts:
            log.error(
                "worker %s %s: %d restarts within %gs already; stopping the server",
                child.pid,
                _describe(child.exitcode),
                len(self._restarts),
                self._window_s,
            )
            self.gave_up = True
            self.forward(signal.SIGTERM, None)
            return
        self._restarts.append(now)
        self._start()
        log.warning(
            "worker %s %s; started worker %s in its place", child.pid, _describe(child.exitcode), self.children[-1].pid
        )

    def _forget(self, child: BaseProcess) -> None:
        """Drop a dead worker's live gauges from the shared metrics (its counters stay: they only add up)."""
        if self._metrics_dir is not None and child.pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(child.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
