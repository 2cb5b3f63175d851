"""Test support: run the sidecar app under uvicorn on a real loopback socket in the test's loop."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from openai import AsyncOpenAI
from starlette.applications import Starlette

from sidecar.server import DrainingServer, config_for

CHUNK_BYTES = 4800  # 100 ms of 24 kHz PCM16
TRANSCRIBE = {"intent": "transcription"}  # the `extra_query` of an SDK transcription session
COMPLETED = "conversation.item.input_audio_transcription.completed"


def bound_socket() -> socket.socket:
    """A listening socket on 127.0.0.1 with a free port: connections queue until the server serves."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    return sock


@dataclass
class Loopback:
    """Something serving HTTP and WebSocket on a loopback port (the sidecar, nginx in front of it)."""

    port: int

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def openai(self, key: str) -> AsyncOpenAI:
        """An official OpenAI SDK client whose base URL is this endpoint."""
        return AsyncOpenAI(base_url=f"{self.http}/v1", api_key=key, max_retries=0)


@dataclass
class Running(Loopback):
    """A sidecar served on a loopback port."""

    app: Starlette
    server: DrainingServer


@contextlib.asynccontextmanager
async def serve(
    app: Starlette,
    *,
    max_frame_bytes: int = 4 * 1024 * 1024,
    grace_s: float = 5.0,
    ws_ping_interval: float | None = 20.0,
    **limits: Any,
) -> AsyncIterator[Running]:
    """Serve `app` until the block exits; the lifespan runs first; leaving the block drains like SIGTERM.
    `limits` go to `config_for` (handshake_timeout_s, max_connections)."""
    sock = bound_socket()
    config = config_for(
        app,
        host="127.0.0.1",
        port=0,
        max_frame_bytes=max_frame_bytes,
        log_level="warning",
        ws_ping_interval=ws_ping_interval,
        **limits,
    )
    server = DrainingServer(config, app=app, grace_s=grace_s)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield Running(port=sock.getsockname()[1], app=app, server=server)
    finally:
        server.begin_drain()
        await task
        sock.close()


def chunks(audio: bytes, size: int = CHUNK_BYTES) -> Iterator[str]:
    """Base64 chunks of `audio`, 100 ms each by default."""
    for start in range(0, len(audio), size):
        yield base64.b64encode(audio[start : start + size]).decode()


async def next_of(connection: Any, kind: str) -> Any:
    """The next server event of type `kind` from an SDK connection (others are skipped)."""
    async for event in connection:
        if event.type == kind:
            return event
    raise AssertionError(f"connection ended before {kind}")


async def next_raw(ws: Any, kind: str) -> dict[str, Any]:
    """The next event of type `kind` from a websockets connection, parsed (others are skipped)."""
    while True:
        event: dict[str, Any] = orjson.loads(await ws.recv())
        if event["type"] == kind:
            return event


async def sdk_transcript(client: AsyncOpenAI, speech_pcm16: bytes, *, model: str = "gpt-realtime-whisper") -> str:
    """With the openai SDK: open a transcription session, stream the speech in 100 ms chunks, commit, and
    return the transcript (the session must be announced as a transcription session)."""
    async with client.realtime.connect(model=model, extra_query=TRANSCRIBE) as conn:
        created = await next_of(conn, "session.created")
        assert created.session.type == "transcription"
        for audio in chunks(speech_pcm16):
            await conn.input_audio_buffer.append(audio=audio)
        await conn.input_audio_buffer.commit()
        done = await next_of(conn, COMPLETED)
    transcript: str = done.transcript
    return transcript
