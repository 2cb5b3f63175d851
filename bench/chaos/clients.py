"""Client sessions with the official openai SDK: the test speech, looped, at real-time pace (or faster).

Each session has its own key (registered in the fake LiteLLM the sidecar asks) and a tag that prefixes the
`event_id` of its appends, so the billing rows (by key hash) and the provider's decoded audio (by tag) are
both found per session. `sent` counts the bytes of each append the SDK accepted while the connection was open.
The SDK's own reconnection is off (`max_retries=0`): a session that a fault ends stays ended.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from openai import AsyncOpenAI

from bench.chaos.stack import MODEL

SPEECH: Final = Path(__file__).resolve().parents[2] / "examples" / "audio" / "speech_24k_pcm16.wav"
CHUNK_BYTES: Final = 4_800  # 100 ms of 24 kHz PCM16
CHUNK_S: Final = 0.1
OPEN_TIMEOUT_S: Final = 15.0


def speech_chunks(chunk_ms: int = 100) -> list[tuple[str, int]]:
    """The test speech (6.667125 s, WAV header removed) as (base64, raw bytes) chunks of `chunk_ms`."""
    pcm = SPEECH.read_bytes()[44:]
    size = CHUNK_BYTES * chunk_ms // 100
    out = []
    for start in range(0, len(pcm), size):
        piece = pcm[start : start + size]
        out.append((base64.b64encode(piece).decode(), len(piece)))
    return out


@dataclass
class ClientSession:
    """One client session's identity and what it sent."""

    tag: str
    key: str
    sent: int = 0
    opened: bool = False
    ended: str = ""  # how it ended: closed (by us), aborted (by us), server_closed, refused:<why>
    events: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    abort: asyncio.Event = field(default_factory=asyncio.Event)  # set: the client vanishes (TCP abort)


async def run_session(
    base_http: str, session: ClientSession, chunks: list[tuple[str, int]], *, duration_s: float, pace: float = 1.0
) -> None:
    """Stream `chunks` in a loop for `duration_s` of audio at `pace` x real time, then close; never raises."""
    try:
        await _run(base_http, session, chunks, duration_s=duration_s, pace=pace)
    except Exception as exc:  # a fault may end a session anywhere: record how, never crash the harness
        if not session.ended:
            session.ended = f"{'refused' if not session.opened else 'error'}:{type(exc).__name__}"
    finally:
        session.done.set()


async def _run(
    base_http: str, session: ClientSession, chunks: list[tuple[str, int]], *, duration_s: float, pace: float
) -> None:
    async with AsyncOpenAI(base_url=f"{base_http}/v1", api_key=session.key, max_retries=0) as client:
        manager = client.realtime.connect(model=MODEL, extra_query={"intent": "transcription"}, max_retries=0)
        async with asyncio.timeout(OPEN_TIMEOUT_S):
            conn = await manager.enter()
        await _stream(conn, session, chunks, duration_s=duration_s, pace=pace)


async def _stream(
    conn: Any, session: ClientSession, chunks: list[tuple[str, int]], *, duration_s: float, pace: float
) -> None:
    try:
        closed = asyncio.Event()
        opened = asyncio.Event()
        reader = asyncio.create_task(_read(conn, session, opened, closed))
        async with asyncio.timeout(OPEN_TIMEOUT_S):
            await opened.wait()
        session.opened = not closed.is_set()
        loop = asyncio.get_running_loop()
        start = loop.time()
        chunk_s = chunks[0][1] / (CHUNK_BYTES / CHUNK_S)  # the seconds one (full) chunk holds
        count = int(duration_s / chunk_s)
        for index in range(count):
            await asyncio.sleep(max(0.0, start + index * chunk_s / pace - loop.time()))  # pacing
            if closed.is_set():
                session.ended = "server_closed"
                break
            if session.abort.is_set():
                _abort(conn)
                session.ended = "aborted"
                break
            audio, size = chunks[index % len(chunks)]
            try:
                await conn.input_audio_buffer.append(audio=audio, event_id=f"{session.tag}.{index}")
            except Exception:
                session.ended = "server_closed"
                break
            session.sent += size
        else:
            session.ended = "closed"
        if session.ended == "closed":
            with contextlib.suppress(Exception):
                await conn.close()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
    finally:
        if session.ended != "aborted":
            with contextlib.suppress(Exception):
                await conn.close()


async def _read(conn: Any, session: ClientSession, opened: asyncio.Event, closed: asyncio.Event) -> None:
    try:
        async for event in conn:
            session.events += 1
            if getattr(event, "type", "") == "session.created":
                opened.set()
    except Exception:
        pass
    finally:
        closed.set()
        opened.set()


def _abort(conn: Any) -> None:
    """Drop the TCP connection without a close frame (a client that vanishes)."""
    transport = conn._connection.transport  # the websockets connection under the SDK's
    transport.abort()
