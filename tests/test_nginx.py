"""deploy/nginx/realtime.conf under a real nginx (Debian's package), in front of a real sidecar.

The test's nginx.conf `include`s the shipped site file itself, with only its `listen` port and the two
upstream addresses changed, so what is tested is what ships. scripts/ensure-nginx.sh installs nginx.
The LiteLLM side is a tiny Starlette app that answers `/v1/models` with one model named "litellm" and
echoes the request headers it receives, to prove the split and the forwarded headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from sidecar.testing.fake_provider import DEFAULT_TRANSCRIPT, PCM16_BYTES_PER_SECOND
from tests.relay_stack import USER_KEY, Stack, stack
from tests.support import COMPLETED, TRANSCRIBE, Loopback, Running, chunks, next_of, sdk_transcript, serve

NGINX = Path("/usr/sbin/nginx")
SITE = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "realtime.conf"
#: The issue's long session: 90 s streamed through nginx, longer than its default 60 s proxy timeouts.
STREAMED_S = 20  # seconds of audio, half before and half after the quiet period
QUIET_S = 70  # longer than nginx's default 60 s proxy_read_timeout
CHUNK_S = 0.1
STARTUP_DEADLINE_S = 10.0


def render_site(*, port: int, sidecar_port: int, litellm_port: int, overrides: Mapping[str, str] | None = None) -> str:
    """The shipped site file with the listen port and upstream ports replaced (and `overrides` applied).

    Each replaced text must occur exactly once, so a reshaped site file fails here loudly.
    """
    text = SITE.read_text()
    replacements = {
        "listen 80;": f"listen 127.0.0.1:{port};",
        "server 127.0.0.1:8787;": f"server 127.0.0.1:{sidecar_port};",
        "server 127.0.0.1:4000;": f"server 127.0.0.1:{litellm_port};",
        **(overrides or {}),
    }
    for old, new in replacements.items():
        assert text.count(old) == 1, f"{SITE.name} must contain {old!r} exactly once"
        text = text.replace(old, new)
    return text


def render_main(prefix: Path, site: Path) -> str:
    """A self-contained nginx.conf: foreground, every path under `prefix`, the site file included."""
    # A root master would run its workers as `nobody`, who cannot enter pytest's private tmp dirs.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"daemon off;\n{user}worker_processes 1;\npid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} info;\n"
        "events { worker_connections 256; }\n"
        f"http {{\n    access_log {prefix / 'access.log'};\n{temp}\n    include {site};\n}}\n"
    )


def free_port() -> int:
    """A loopback port that was free a moment ago (nginx must bind it itself)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Nginx(Loopback):
    """A running nginx serving the site file on a loopback port."""

    prefix: Path


async def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port`."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


def error_log(prefix: Path) -> str:
    """nginx's error log under `prefix`, for failure messages."""
    path = prefix / "error.log"
    return path.read_text() if path.exists() else "(no error log)"


def write_config(
    prefix: Path, *, port: int, sidecar_port: int, litellm_port: int, overrides: Mapping[str, str] | None
) -> Path:
    """Write the rendered site file and the nginx.conf including it under `prefix`; return the nginx.conf."""
    assert NGINX.exists(), "nginx is missing: run scripts/ensure-nginx.sh (as root)"
    prefix.mkdir()
    site = prefix / "realtime.conf"
    site.write_text(render_site(port=port, sidecar_port=sidecar_port, litellm_port=litellm_port, overrides=overrides))
    conf = prefix / "nginx.conf"
    conf.write_text(render_main(prefix, site))
    return conf


async def wait_listening(process: asyncio.subprocess.Process, port: int, prefix: Path) -> None:
    """Bounded poll until nginx (another process, no event to await) accepts on `port`."""
    deadline = asyncio.get_running_loop().time() + STARTUP_DEADLINE_S
    while not await accepts(port):
        assert process.returncode is None, f"nginx exited with {process.returncode}:\n{error_log(prefix)}"
        assert asyncio.get_running_loop().time() < deadline, f"nginx is not listening:\n{error_log(prefix)}"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def run_nginx(
    tmp_path: Path, *, sidecar_port: int, litellm_port: int, overrides: Mapping[str, str] | None = None
) -> AsyncIterator[Nginx]:
    """Run nginx in the foreground on the site file until the block exits, then stop it (SIGTERM)."""
    prefix = tmp_path / "nginx"
    port = free_port()
    conf = write_config(prefix, port=port, sidecar_port=sidecar_port, litellm_port=litellm_port, overrides=overrides)
    process = await asyncio.create_subprocess_exec(
        str(NGINX),
        "-p",
        str(prefix),
        "-e",
        str(prefix / "error.log"),
        "-c",
        str(conf),
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_listening(process, port, prefix)
        yield Nginx(port=port, prefix=prefix)
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), STARTUP_DEADLINE_S)


def fake_litellm_app() -> Starlette:
    """A stand-in LiteLLM proxy: `/v1/models` lists "litellm"; other paths echo the request headers."""

    async def models(request: Request) -> Response:
        model = {"id": "litellm", "object": "model", "created": 0, "owned_by": "litellm"}
        return JSONResponse({"object": "list", "data": [model]})

    async def echo(request: Request) -> Response:
        return JSONResponse({"path": request.url.path, "headers": dict(request.headers)})

    async def echo_websocket(websocket: WebSocket) -> None:
        offered = websocket.scope.get("subprotocols") or []
        await websocket.accept(subprotocol=offered[0] if offered else None)
        await websocket.send_json({"path": websocket.url.path, "headers": dict(websocket.headers)})
        await websocket.close()

    routes = [
        Route("/v1/models", models),
        Route("/{path:path}", echo),
        WebSocketRoute("/{path:path}", echo_websocket),
    ]
    return Starlette(routes=routes)


@dataclass
class Front:
    """nginx in front of a real sidecar stack and the stand-in LiteLLM."""

    nginx: Nginx
    sidecar: Stack
    litellm: Running


@contextlib.asynccontextmanager
async def front(
    tmp_path: Path, *, overrides: Mapping[str, str] | None = None, ws_ping_interval: float | None = 20.0
) -> AsyncIterator[Front]:
    """Start the sidecar stack, the stand-in LiteLLM and nginx on the shipped site file."""
    async with stack(tmp_path, ws_ping_interval=ws_ping_interval) as s, serve(fake_litellm_app()) as litellm:
        ports = {"sidecar_port": s.sidecar.port, "litellm_port": litellm.port}
        async with run_nginx(tmp_path, overrides=overrides, **ports) as nginx:
            yield Front(nginx, s, litellm)


async def refusal(url: str, headers: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
    """Open a WebSocket that must be refused; return the HTTP status and JSON body."""
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, additional_headers=dict(headers)):
            pass
    response = info.value.response
    return response.status_code, orjson.loads(response.body or b"{}")


def looped(audio: bytes, *, seconds: float) -> bytes:
    """`audio` repeated and cut to exactly `seconds` of 24 kHz PCM16."""
    size = round(seconds * PCM16_BYTES_PER_SECOND)
    return (audio * (size // len(audio) + 1))[:size]


async def stream_paced(connection: Any, audio: bytes) -> None:
    """Append `audio` in 100 ms chunks at real-time pace, as a microphone would (the sleeps pace, not sync)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for index, chunk in enumerate(chunks(audio)):
        await asyncio.sleep(max(0.0, start + index * CHUNK_S - loop.time()))
        await connection.input_audio_buffer.append(audio=chunk)


async def events_until(connection: Any, kind: str) -> list[Any]:
    """Every server event up to and including the first of type `kind`."""
    seen: list[Any] = []
    async for event in connection:
        seen.append(event)
        if event.type == kind:
            return seen
    raise AssertionError(f"connection ended before {kind}: {[e.type for e in seen]}")


async def test_plain_http_is_split_between_litellm_and_the_sidecar(tmp_path: Path) -> None:
    """Through nginx, /v1/models reaches LiteLLM and /v1/realtime/models reaches the sidecar."""
    async with front(tmp_path) as f:
        page = await f.nginx.openai(USER_KEY).models.list()
        assert [model.id for model in page.data] == ["litellm"]
        async with httpx.AsyncClient(base_url=f.nginx.http) as http:
            realtime = await http.get("/v1/realtime/models")
        assert realtime.status_code == 200
        assert "gpt-realtime-whisper" in [row["id"] for row in realtime.json()["data"]]


async def test_sdk_transcribes_speech_through_nginx(tmp_path: Path, speech_pcm16: bytes) -> None:
    """The openai SDK, based at nginx, streams the speech in 100 ms chunks, commits and gets the transcript."""
    async with front(tmp_path) as f:
        assert await sdk_transcript(f.nginx.openai(USER_KEY), speech_pcm16) == DEFAULT_TRANSCRIPT
        assert f.sidecar.provider.sessions[0].audio_bytes == len(speech_pcm16)


async def test_refusals_pass_through_nginx_unchanged(tmp_path: Path) -> None:
    """A refused upgrade reaches the client through nginx with the sidecar's own status and JSON body, on every
    voice route."""
    async with front(tmp_path) as f:
        cases: list[tuple[str, dict[str, str], int, str]] = [
            ("/v1/realtime?model=gpt-realtime-whisper&intent=transcription", {}, 401, "invalid_api_key"),
            ("/realtime?intent=transcription", {"Authorization": "Bearer sk-unknown"}, 401, "invalid_api_key"),
            ("/v1/realtime?model=nope", {"Authorization": f"Bearer {USER_KEY}"}, 404, "model_not_found"),
            ("/v1/realtime?model=whisper-1", {"api-key": USER_KEY}, 400, "model_not_realtime"),
            # The other voice routes reach the sidecar too (the stand-in LiteLLM would accept any upgrade).
            ("/v1/live/sessions", {}, 401, "invalid_api_key"),
            ("/v1/realtime/translations?model=nope", {"Authorization": f"Bearer {USER_KEY}"}, 404, "model_not_found"),
            # LiteLLM's aliases of the three routes reach the sidecar as well.
            ("/openai/v1/realtime?model=nope", {"api-key": USER_KEY}, 404, "model_not_found"),
            ("/realtime/translations?model=nope", {"Authorization": f"Bearer {USER_KEY}"}, 404, "model_not_found"),
            ("/live/sessions", {}, 401, "invalid_api_key"),
            ("/openai/v1/live/sessions", {}, 401, "invalid_api_key"),
        ]
        for path, headers, status, code in cases:
            proxied = await refusal(f"{f.nginx.ws}{path}", headers)
            assert (proxied[0], proxied[1]["error"]["code"]) == (status, code), path
            assert proxied == await refusal(f"{f.sidecar.sidecar.ws}{path}", headers)


async def test_webrtc_call_routes_reach_the_sidecar_through_nginx(tmp_path: Path) -> None:
    """The WebRTC creates and hangups (POSTs under the voice paths, issue 17) reach the sidecar: its own 401
    JSON, where the stand-in LiteLLM would answer a POST 405."""
    async with front(tmp_path) as f, httpx.AsyncClient() as http:
        for path in (
            "/v1/realtime/calls",
            "/openai/v1/realtime/calls",
            "/realtime/calls/rs_1/hangup",
            "/v1/realtime/calls/rs_1/hangup",
            "/v1/live/sessions",
            "/live/sessions",
            "/openai/v1/live/sessions/rs_1/hangup",
            "/v1/live/sessions/rs_1/hangup",
        ):
            proxied = await http.post(f"{f.nginx.http}{path}", content=b"v=0")
            direct = await http.post(f"{f.sidecar.sidecar.http}{path}", content=b"v=0")
            assert (proxied.status_code, proxied.json()["error"]["code"]) == (401, "invalid_api_key"), path
            assert proxied.json() == direct.json()


async def test_credentials_and_forwarding_headers_reach_the_upstreams(tmp_path: Path) -> None:
    """Both locations forward Authorization, api-key, the subprotocols, Host and X-Forwarded-*; `realtime` is chosen."""
    async with serve(fake_litellm_app()) as echo:
        async with run_nginx(tmp_path, sidecar_port=echo.port, litellm_port=echo.port) as nginx:
            credentials = {"Authorization": "Bearer sk-echo", "api-key": "sk-echo", "X-Forwarded-For": "203.0.113.7"}
            protocols: Any = ["realtime", "openai-insecure-api-key.sk-echo"]
            url = f"{nginx.ws}/v1/realtime?model=m"
            async with connect(url, additional_headers=credentials, subprotocols=protocols) as ws:
                assert ws.subprotocol == "realtime"
                upgraded = orjson.loads(await ws.recv())
            async with httpx.AsyncClient(base_url=nginx.http) as http:
                plain = (await http.get("/v1/chat/anything", headers=credentials)).json()
    assert upgraded["path"] == "/v1/realtime"
    assert plain["path"] == "/v1/chat/anything"
    assert upgraded["headers"]["sec-websocket-protocol"] == "realtime, openai-insecure-api-key.sk-echo"
    assert (upgraded["headers"]["upgrade"], upgraded["headers"]["connection"]) == ("websocket", "upgrade")
    for seen in (upgraded["headers"], plain["headers"]):
        assert (seen["authorization"], seen["api-key"]) == ("Bearer sk-echo", "sk-echo")
        assert (seen["host"], seen["x-forwarded-proto"]) == ("127.0.0.1", "http")
        assert seen["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"


async def test_long_session_with_a_quiet_minute_outlives_nginx_default_read_timeout(
    tmp_path: Path, speech_pcm16: bytes
) -> None:
    """A 90 s session: 10 s of paced audio, 70 s with no frame either way (pings off), 10 s more, commit: no cut.

    nginx re-arms its tunnel timers on traffic in either direction, so only a quiet period longer than its
    default 60 s proxy_read_timeout shows the shipped 3600 s setting matters (with the default it is cut).
    """
    audio = looped(speech_pcm16, seconds=STREAMED_S)
    half = len(audio) // 2
    async with front(tmp_path, ws_ping_interval=None) as f:
        client = f.nginx.openai(USER_KEY)
        options = {"ping_interval": None}
        async with client.realtime.connect(
            model="gpt-realtime-whisper", extra_query=TRANSCRIBE, websocket_connection_options=options
        ) as conn:
            await next_of(conn, "session.created")
            await stream_paced(conn, audio[:half])
            await asyncio.sleep(QUIET_S)  # the scenario itself: a client that says nothing for 70 s
            await stream_paced(conn, audio[half:])
            upstream = f.sidecar.provider.sessions[0]
            assert not upstream.closed.is_set()
            await conn.input_audio_buffer.commit()
            events = await events_until(conn, COMPLETED)
        assert events[-1].transcript == DEFAULT_TRANSCRIPT
        assert [event for event in events if event.type == "error"] == []
        assert len(f.sidecar.provider.sessions) == 1
        assert upstream.audio_bytes == len(audio) == STREAMED_S * PCM16_BYTES_PER_SECOND
