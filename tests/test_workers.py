"""`sidecar serve --workers 2`: two processes share the port, the Redis control plane and one /metrics view;
both drain, and a worker that dies is replaced."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from sidecar.server import Workers
from sidecar.testing.fake_provider import FakeProvider
from tests.billing_support import RedisServer, SidecarProcess, poll, serve_env

MASTER = "sk-workers-master"
HEADERS = {"Authorization": f"Bearer {MASTER}"}


@contextlib.asynccontextmanager
async def two_workers(tmp_path: Path) -> AsyncIterator[SidecarProcess]:
    """`sidecar serve` with SIDECAR_WORKERS=2 over a throwaway Redis and a fake provider, ready."""
    redis = RedisServer(tmp_path / "redis")
    await redis.start()
    try:
        async with FakeProvider() as provider:
            env = serve_env(
                tmp_path, provider, master_key=MASTER, redis_url=redis.url, workers="2", drain_grace_s="0.5"
            )
            sidecar = SidecarProcess(env, workdir=tmp_path / "run")
            await sidecar.start()
            try:
                yield sidecar
            finally:
                await sidecar.kill()
    finally:
        await redis.stop()


async def open_sessions(sidecar: SidecarProcess, count: int, *, pause: set[int]) -> list[ClientConnection]:
    """Open `count` sessions while the workers in `pause` are stopped (SIGSTOP), so another one accepts them.

    The workers share one listening socket and the kernel may hand every connection to the same one (it did,
    40 in a row): stopping the others is the only way to say which worker serves. They run again on return.
    """
    url = f"ws://127.0.0.1:{sidecar.port}/v1/realtime?intent=transcription"
    sessions: list[ClientConnection] = []
    for pid in pause:
        os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(count):
            ws = await connect(url, additional_headers=HEADERS)
            assert orjson.loads(await ws.recv())["type"] == "session.created"
            sessions.append(ws)
    finally:
        for pid in pause:
            os.kill(pid, signal.SIGCONT)
    return sessions


async def listed_replicas(sidecar: SidecarProcess, done: Callable[[list[str]], bool]) -> list[str]:
    """The replica of every session in /admin/sessions, once `done(replicas)` (a bounded poll)."""
    async with httpx.AsyncClient(base_url=sidecar.http, headers=HEADERS) as http:

        async def check() -> list[str] | None:
            replicas = [s["replica"] for s in (await http.get("/admin/sessions")).json()["data"]]
            return replicas if done(replicas) else None

        found: list[str] = await poll(check, what="the sessions' replicas in /admin/sessions")
        return found


async def sessions_on_both(sidecar: SidecarProcess) -> list[ClientConnection]:
    """Two sessions on each worker, listed in /admin/sessions under two replicas."""
    first, second = sorted(workers_of(sidecar.pid))
    sessions = await open_sessions(sidecar, 2, pause={first}) + await open_sessions(sidecar, 2, pause={second})
    await listed_replicas(sidecar, lambda replicas: len(replicas) == len(sessions) and len(set(replicas)) == 2)
    return sessions


def workers_of(pid: int) -> set[int]:
    """The child processes of `pid` (its workers)."""
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def series(text: str, name: str) -> list[float]:
    """Every value of the series `name` in an exposition text."""
    return [s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


async def test_two_workers_share_sessions_registry_and_drain(tmp_path: Path) -> None:
    """Sessions land on both workers (two replicas in /admin/sessions); SIGTERM drains both and exits 0."""
    async with two_workers(tmp_path) as sidecar:
        # `sidecar serve` re-executed itself (same pid) on the C allocator (sidecar/tuning.py).
        environ = (await asyncio.to_thread(Path(f"/proc/{sidecar.pid}/environ").read_bytes)).split(b"\0")
        assert b"PYTHONMALLOC=malloc" in environ
        sessions = await sessions_on_both(sidecar)
        code = await sidecar.terminate()
        for ws in sessions:
            try:
                while True:
                    await ws.recv()
            except ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 1001
        assert code == 0


async def test_one_scrape_sees_every_worker(tmp_path: Path) -> None:
    """One GET /metrics counts both workers' sessions (live, then ended); build and process figures appear once."""
    async with two_workers(tmp_path) as sidecar, httpx.AsyncClient(base_url=sidecar.http) as http:
        sessions = await sessions_on_both(sidecar)
        text = (await http.get("/metrics")).text
        assert series(text, "sidecar_live_sessions") == [len(sessions)]
        assert series(text, "sidecar_build_info") == [1.0]
        assert len(series(text, "process_resident_memory_bytes")) == 1
        assert len(series(text, "python_gc_collections_total")) == 3  # one per generation
        for ws in sessions:
            await ws.close()

        async def all_counted() -> str | None:
            text = (await http.get("/metrics")).text
            return text if sum(series(text, "sidecar_sessions_total")) == len(sessions) else None

        text = await poll(all_counted, what="every worker's ended sessions on one scrape")
        assert series(text, "sidecar_live_sessions") == [0.0]


async def test_a_killed_worker_is_replaced_and_serves(tmp_path: Path) -> None:
    """SIGKILL one worker: another takes its place and serves; its live sessions leave the shared live gauge."""
    async with two_workers(tmp_path) as sidecar, httpx.AsyncClient(base_url=sidecar.http, headers=HEADERS) as http:
        before = workers_of(sidecar.pid)
        assert len(before) == 2
        held = await sessions_on_both(sidecar)
        victim = min(before)
        listed = (await http.get("/admin/sessions")).json()["data"]
        surviving = sum(not s["replica"].endswith(f"-{victim}") for s in listed)
        assert 0 < surviving < len(held)
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> set[int] | None:
            now = workers_of(sidecar.pid)
            return now - before if len(now) == 2 and victim not in now else None

        (fresh,) = await poll(replaced, what="a worker in place of the killed one")
        assert f"worker {victim} killed by SIGKILL; started worker {fresh} in its place" in sidecar.log.read_text()

        async def forgotten() -> bool:
            return series((await http.get("/metrics")).text, "sidecar_live_sessions") == [surviving]

        await poll(forgotten, what="the killed worker's sessions out of sidecar_live_sessions")
        sessions = await open_sessions(sidecar, 1, pause=workers_of(sidecar.pid) - {fresh})
        await listed_replicas(sidecar, lambda replicas: any(r.endswith(f"-{fresh}") for r in replicas))
        for ws in held + sessions:
            await ws.close()
        assert await sidecar.terminate() == 0


async def test_workers_drain_and_exit_when_their_parent_is_killed(tmp_path: Path) -> None:
    """SIGKILL the parent: both workers get SIGTERM (PR_SET_PDEATHSIG), drain and exit; nothing is left serving."""
    async with two_workers(tmp_path) as sidecar:
        workers = workers_of(sidecar.pid)
        assert len(workers) == 2
        await sidecar.kill()

        async def gone() -> bool:
            alive = await asyncio.to_thread(lambda: [pid for pid in workers if Path(f"/proc/{pid}").exists()])
            return not alive

        await poll(gone, what="the workers of a killed parent to exit")
    assert "draining" in sidecar.log.read_text()


def test_a_crash_loop_stops_after_the_restart_budget(caplog: pytest.LogCaptureFixture) -> None:
    """Workers that keep dying are replaced max_restarts times within the window, then the parent exits 1."""
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    caplog.set_level(logging.WARNING, logger="sidecar.server")
    try:
        code = Workers(lambda: os._exit(3), 2, max_restarts=3, window_s=3600).run()
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
    assert code == 1
    replaced = [r for r in caplog.records if "in its place" in r.message]
    assert len(replaced) == 3 and all("exit status 3" in r.message for r in replaced)
    assert [r.levelno for r in caplog.records if "stopping the server" in r.message] == [logging.ERROR]
