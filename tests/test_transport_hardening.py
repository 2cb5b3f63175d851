"""The client-facing transport under bad and idle clients (issue 12, items 8, 9, 15; sidecar/wsserver.py).

Malformed WebSocket upgrades get 400 and a close and leave nothing behind, and the next SIGTERM still exits 0
after billing every session; request heads have a deadline; open connections are capped and the open-file
limit is raised; a data frame inside a fragmented message closes the session with 1002. Real sockets on
127.0.0.1: the sidecar in the test's loop (tests/relay_stack.py) or `sidecar serve` as a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import OP_TEXT, Frame

from sidecar import tuning
from sidecar.config import DEFAULT_USAGE_STREAM, Settings
from sidecar.errors import ConfigError
from sidecar.publisher import redis_sink
from sidecar.server import config_for
from sidecar.spool import Spool
from sidecar.testing import upgrades
from sidecar.testing.fake_provider import FakeProvider
from sidecar.wsserver import RelayWebSocketProtocol
from tests.billing_support import DEADLINE_S, MODEL, RedisServer, SidecarProcess, poll, quick_redis, serve_env
from tests.relay_stack import MASTER_KEY, stack
from tests.support import CHUNK_BYTES, Running, chunks, next_raw, serve

SESSION_URL = f"/v1/realtime?model={MODEL}&intent=transcription"


#: Every kind of malformed upgrade; the first three made uvicorn's protocol raise (the leak of item 8).
MALFORMED = upgrades.malformed(SESSION_URL.encode())
RAISED = list(MALFORMED.values())[:3]


async def exchange(port: int, data: bytes) -> bytes:
    """Send `data` on a new connection and return everything received until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(DEADLINE_S):
            return await reader.read()
    finally:
        writer.close()


def status_of(response: bytes) -> bytes:
    """The status line of an HTTP response, without the reason."""
    return response.split(b"\r\n", 1)[0][:12]


async def until_connections(running: Running, count: int) -> None:
    """Until the server holds `count` client connections (a bounded poll: closes complete on later loop turns)."""

    async def reached() -> bool:
        return len(running.server.server_state.connections) == count

    await poll(reached, what=f"{count} connections", every_s=0.01)


async def test_every_malformed_upgrade_is_answered_400_and_closed(tmp_path: Path) -> None:
    """Bad bytes in any header or the target, bad or missing key, version or subprotocol, a request websockets
    cannot parse: each gets 400 and the server closes the connection."""
    async with stack(tmp_path) as s:
        answers = {name: status_of(await exchange(s.sidecar.port, data)) for name, data in MALFORMED.items()}
        assert answers == dict.fromkeys(MALFORMED, b"HTTP/1.1 400")
        await until_connections(s.sidecar, 0)


async def test_malformed_upgrades_leave_nothing_behind(tmp_path: Path) -> None:
    """300 upgrades that used to raise inside the protocol leave no connection and no protocol object alive."""
    async with stack(tmp_path) as s:
        for i in range(300):
            assert status_of(await exchange(s.sidecar.port, RAISED[i % 3])) == b"HTTP/1.1 400"
        await until_connections(s.sidecar, 0)
        gc.collect()
        assert [o for o in gc.get_objects() if isinstance(o, RelayWebSocketProtocol)] == []


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A throwaway redis-server of this test's own (it is stalled with SIGSTOP)."""
    server = RedisServer(tmp_path / "redis")
    await server.start()
    yield server
    await server.stop()


async def test_sigterm_after_a_malformed_upgrade_exits_0_and_spools_what_redis_cannot_take(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """`sidecar serve` that refused a malformed upgrade, with Redis stalled, still shuts down cleanly on SIGTERM:
    exit 0, and the lifespan's flush puts the session's final usage event, with all its audio, in the spool."""
    redis = quick_redis(redis_server.url)
    try:
        redis_pid = int((await redis.info("server"))["process_id"])
    finally:
        await redis.aclose()
    async with FakeProvider() as provider:
        env = serve_env(tmp_path, provider, redis_url=redis_server.url, drain_grace_s="0.2")
        sidecar = SidecarProcess(env, workdir=tmp_path / "serve")
        await sidecar.start()
        try:
            headers = {"Authorization": f"Bearer {MASTER_KEY}"}
            async with connect(f"ws://127.0.0.1:{sidecar.port}{SESSION_URL}", additional_headers=headers) as ws:
                await next_raw(ws, "session.created")
                for audio in chunks(bytes(3 * CHUNK_BYTES)):
                    await ws.send(orjson.dumps({"type": "input_audio_buffer.append", "audio": audio}).decode())
                await ws.send(orjson.dumps({"type": "input_audio_buffer.commit"}).decode())
                await next_raw(ws, "input_audio_buffer.committed")  # every append has been metered
                await exchange(sidecar.port, RAISED[0])  # the upgrade that broke shutdown (answered 400 now)
                os.kill(redis_pid, signal.SIGSTOP)
                try:
                    assert await sidecar.terminate() == 0
                finally:
                    os.kill(redis_pid, signal.SIGCONT)
        finally:
            await sidecar.kill()
    sink = redis_sink(redis, stream=DEFAULT_USAGE_STREAM)  # the exited process's sink: its file is adopted
    with Spool(Path(env["SIDECAR_SPOOL_DIR"]), sink=sink) as spool:
        spooled = spool.pending()
    # (Redis may still run the XADD that timed out once it continues: a duplicate the consumer ignores.)
    assert [(e.close_reason, e.audio_seconds) for e in spooled if e.type == "final"] == [
        ("server_shutdown", Decimal("0.3"))  # 14,400 bytes of 24 kHz PCM16
    ]


async def healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


@contextlib.asynccontextmanager
async def guarded(**limits: Any) -> AsyncIterator[Running]:
    """A one-route app (GET /healthz) served with the sidecar's uvicorn settings and the given transport limits."""
    async with serve(
        Starlette(routes=[Route("/healthz", healthz)]), max_frame_bytes=1 << 20, grace_s=1.0, **limits
    ) as running:
        yield running


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def test_a_connection_that_never_sends_is_closed_at_the_handshake_timeout() -> None:
    """A client that connects and sends nothing is disconnected once the handshake timeout passes."""
    async with guarded(handshake_timeout_s=0.05) as running:
        assert await exchange(running.port, b"") == b""
        await until_connections(running, 0)


async def test_a_request_head_that_never_ends_is_closed_at_the_handshake_timeout() -> None:
    """Slowloris: a request head that starts and never ends is cut at the deadline (more bytes do not extend it),
    on a new connection and on a kept-alive one after its first request was answered."""
    async with guarded(handshake_timeout_s=0.05) as running:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        async with asyncio.timeout(DEADLINE_S):
            while not reader.at_eof() and reader.exception() is None:  # until the server hangs up (FIN or RST)
                writer.write(b"a")  # a byte every 10 ms (pacing)
                await asyncio.sleep(0.01)
        writer.close()
        answered = await exchange(running.port, HEALTHZ + b"GET /healthz HTTP/1.1\r\nHost: 1")
        assert status_of(answered) == b"HTTP/1.1 200" and answered.endswith(b"ok")
        await until_connections(running, 0)


async def test_connections_past_the_cap_get_503_and_are_closed() -> None:
    """With the cap reached a new connection is answered 503 and closed at once; once one closes, the next is
    served again."""
    async with guarded(max_connections=2) as running:
        streams = [await asyncio.open_connection("127.0.0.1", running.port) for _ in range(2)]
        for reader, writer in streams:  # an answered request: the server holds both connections
            writer.write(HEALTHZ)
            assert status_of(await reader.readuntil(b"ok")) == b"HTTP/1.1 200"
        refused = await exchange(running.port, b"")
        assert status_of(refused) == b"HTTP/1.1 503"
        streams[0][1].close()
        await until_connections(running, 1)
        assert status_of(
            await exchange(running.port, HEALTHZ.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        ) == (b"HTTP/1.1 200")
        streams[1][1].close()


def test_transport_limits_must_be_positive() -> None:
    """A non-positive handshake timeout or connection cap is a one-line ConfigError, from the environment or not."""
    base = {"SIDECAR_LITELLM_CONFIG": "config.yaml"}
    for name in ("SIDECAR_HANDSHAKE_TIMEOUT_S", "SIDECAR_MAX_CONNECTIONS"):
        with pytest.raises(ConfigError, match=f"^{name} must be positive, got '0'$"):
            Settings.from_env(base | {name: "0"})
    app = Starlette()
    with pytest.raises(ConfigError, match="handshake timeout must be positive"):
        config_for(app, host="127.0.0.1", port=0, max_frame_bytes=1, handshake_timeout_s=0.0)
    with pytest.raises(ConfigError, match="connection cap must be positive"):
        config_for(app, host="127.0.0.1", port=0, max_frame_bytes=1, max_connections=-1)


def test_the_connection_cap_fits_the_open_file_limit() -> None:
    """Each connection may need a second descriptor (its upstream) and some are kept for the rest."""
    assert tuning.connection_cap(4096, open_files=None) == 4096
    assert tuning.connection_cap(4096, open_files=1 << 20) == 4096
    assert tuning.connection_cap(4096, open_files=1024) == (1024 - tuning.RESERVED_FDS) // 2
    assert tuning.connection_cap(4096, open_files=10) == 1


def test_the_soft_file_limit_is_raised_to_the_hard_limit() -> None:
    """raise_file_limit lifts a soft limit of 1024 to the hard limit (in a child process, which workers inherit)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    code = (
        "import resource; from sidecar.tuning import raise_file_limit;"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]));"
        "print(raise_file_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    wanted = tuning.UNLIMITED_FDS if hard == resource.RLIM_INFINITY else hard
    assert out == [str(wanted)] * 2


@contextlib.contextmanager
def soft_file_limit(limit: int) -> Iterator[None]:
    """Lower this process's soft open-file limit (inherited by the processes it starts meanwhile)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_1100_idle_connections_do_not_take_sidecar_serve_down(tmp_path: Path) -> None:
    """Started under the usual soft limit of 1024 open files, `sidecar serve` still answers /readyz with 1,100
    idle connections open (it raised its limit), closes them at SIDECAR_HANDSHAKE_TIMEOUT_S, and exits 0."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.fail(f"this test needs a hard open-file limit of at least 4096 (it is {hard})")
    async with FakeProvider() as provider:
        env = serve_env(tmp_path, provider, handshake_timeout_s="0.5")
        sidecar = SidecarProcess(env, workdir=tmp_path / "serve")
        with soft_file_limit(1024):
            await sidecar.start()
        idle = [socket.create_connection(("127.0.0.1", sidecar.port)) for _ in range(1100)]
        try:
            async with httpx.AsyncClient(timeout=DEADLINE_S) as http:
                assert (await http.get(f"{sidecar.http}/readyz")).status_code == 200
            for sock in idle:
                sock.settimeout(DEADLINE_S)
                assert sock.recv(1) == b""  # closed by the server at the handshake timeout
        finally:
            for sock in idle:
                sock.close()
            assert await sidecar.terminate() == 0


async def test_a_data_frame_inside_a_fragmented_message_closes_the_session_1002(tmp_path: Path) -> None:
    """RFC 6455 5.4: a final text frame between the fragments of a message closes the session with 1002 (not
    relayed as a message), and the session is billed."""
    async with stack(tmp_path) as s:
        headers = {"Authorization": f"Bearer {MASTER_KEY}"}
        async with connect(f"{s.sidecar.ws}{SESSION_URL}", additional_headers=headers) as ws:
            assert orjson.loads(await ws.recv())["type"] == "session.created"
            opening = Frame(OP_TEXT, b'{"type": "input_audio_', fin=False).serialize(mask=True)
            intruder = Frame(OP_TEXT, b'{"type": "input_audio_buffer.clear"}').serialize(mask=True)
            ws.transport.write(opening + intruder)  # raw: websockets' client would refuse to send this
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(DEADLINE_S):
                    while True:
                        assert orjson.loads(await ws.recv())["type"] != "input_audio_buffer.cleared"
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1002
        assert (await s.final_row()).status == "final"
