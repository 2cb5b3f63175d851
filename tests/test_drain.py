"""SIGTERM drains a real `sidecar serve` process: readiness fails, sessions get their grace, all are billed."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from sidecar.testing.fake_provider import FakeProvider
from tests.billing_support import serve_env
from tests.support import bound_socket

MASTER = "sk-drain-master"
URL = "/v1/realtime?model=gpt-realtime-whisper&intent=transcription"


def free_port() -> int:
    sock = bound_socket()
    port: int = sock.getsockname()[1]
    sock.close()
    return port


async def wait_for(predicate_url: str, status: int) -> None:
    """Bounded poll of another process's HTTP endpoint until it answers `status`."""
    async with httpx.AsyncClient(timeout=2) as http:
        for _ in range(300):
            try:
                if (await http.get(predicate_url)).status_code == status:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"{predicate_url} never answered {status}")


@pytest.fixture
async def provider() -> AsyncIterator[FakeProvider]:
    async with FakeProvider() as fake:
        yield fake


async def test_sigterm_drains_and_bills_every_session(tmp_path: Path, provider: FakeProvider) -> None:
    """On SIGTERM: /readyz 503, new sessions refused, a session closing in the grace ends normally, the rest get
    server_shutdown + 1001; the process exits 0 and every session has one final billing row."""
    port = free_port()
    db = tmp_path / "billing.db"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")},
        **serve_env(tmp_path, provider, master_key=MASTER, port=str(port), drain_grace_s="1.5"),
        "SIDECAR_DATABASE_URL": f"sqlite:///{db}",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar.cli", "serve", env=env, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_for(f"{base}/readyz", 200)
        headers = {"Authorization": f"Bearer {MASTER}"}

        async def session() -> ClientConnection:
            ws = await connect(f"ws://127.0.0.1:{port}{URL}", additional_headers=headers)
            assert orjson.loads(await ws.recv())["type"] == "session.created"
            await ws.send(orjson.dumps({"type": "input_audio_buffer.append", "audio": "AAAA" * 1200}).decode())
            return ws

        leaving, staying = await session(), await session()
        proc.send_signal(signal.SIGTERM)
        await wait_for(f"{base}/readyz", 503)
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"ws://127.0.0.1:{port}{URL}", additional_headers=headers)
        assert refused.value.response.status_code == 503
        await leaving.close()
        last: dict[str, object] = {}
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                last = orjson.loads(await staying.recv())
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert last["type"] == "error" and last["error"]["code"] == "server_shutdown"  # type: ignore[index]
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    rows = sqlite3.connect(db).execute("select status, close_reason, audio_seconds from realtime_usage").fetchall()
    assert sorted((r[0], r[1]) for r in rows) == [("final", "client_close"), ("final", "server_shutdown")]
    assert all(Decimal(str(r[2])) == Decimal("0.075") for r in rows)  # 3600 bytes each
