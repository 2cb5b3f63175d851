"""Every way a session can end is billed exactly once, end to end (docs/api.md, "Metering and billing").

The sidecar runs on a real socket with a fake provider; the client is the official openai SDK (the raw
websockets client where the test needs to abort TCP). Each test runs twice: embedded mode into SQLite, and
Redis stream -> `UsageConsumer` -> PostgreSQL. Each asserts exactly one realtime_usage row with the exact
audio seconds, cost, status and close_reason, and every usage event stored once.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from websockets.asyncio.client import connect

from sidecar.testing.fake_provider import FakeProvider, Faults
from tests.billing_support import (
    CHUNK_BYTES,
    MODEL,
    Sink,
    assert_billed_once,
    embedded_sink,
    next_event,
    redis_sink,
    stream_speech,
    until_closed,
)
from tests.relay_stack import USER_KEY, stack
from tests.support import TRANSCRIBE, chunks

SPEECH_BYTES = 320_022  # 6.667125 s of 24 kHz PCM16


@pytest.fixture(params=["embedded-sqlite", "redis-postgresql"])
def sink_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the session is billed: embedded into SQLite, or through Redis into PostgreSQL."""
    if request.param == "embedded-sqlite":
        return f"sqlite:///{tmp_path / 'billing-embedded.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def sink(sink_database: str, tmp_path: Path, redis_url: str, usage_stream: str) -> AsyncIterator[Sink]:
    """The billing sink for `sink_database`'s mode."""
    if sink_database.startswith("sqlite"):
        async with embedded_sink(tmp_path, database_url=sink_database) as embedded:
            yield embedded
        return
    async with redis_sink(tmp_path, redis_url=redis_url, stream=usage_stream, database_url=sink_database) as redis:
        yield redis


async def test_client_close_bills_the_whole_file_once(tmp_path: Path, speech_pcm16: bytes, sink: Sink) -> None:
    """The SDK streams the whole file and exits its context: one final record of 6.667125 s, client_close."""
    assert len(speech_pcm16) == SPEECH_BYTES
    async with stack(tmp_path, publisher=sink.tap) as s:
        async with s.sidecar.openai(USER_KEY).realtime.connect(model=MODEL, extra_query=TRANSCRIBE) as conn:
            await stream_speech(conn, speech_pcm16)
        billed = await sink.billed()
    row = assert_billed_once(
        billed, sink.tap.events, audio_bytes=SPEECH_BYTES, close_reason="client_close", key=USER_KEY
    )
    assert row.audio_seconds == Decimal("6.667125")


async def test_client_tcp_abort_bills_once_as_client_abort(tmp_path: Path, speech_pcm16: bytes, sink: Sink) -> None:
    """A client that vanishes without a close frame is billed once for all it sent, close_reason client_abort."""
    async with stack(tmp_path, publisher=sink.tap) as s:
        url = f"{s.sidecar.ws}/v1/realtime?model={MODEL}&intent=transcription"
        ws = await connect(url, additional_headers={"Authorization": f"Bearer {USER_KEY}"})
        assert orjson.loads(await ws.recv())["type"] == "session.created"
        for piece in chunks(speech_pcm16):
            await ws.send(orjson.dumps({"type": "input_audio_buffer.append", "audio": piece}).decode())
        await ws.send(orjson.dumps({"type": "input_audio_buffer.commit"}).decode())
        while orjson.loads(await ws.recv())["type"] != "conversation.item.input_audio_transcription.completed":
            pass
        ws.transport.abort()
        billed = await sink.billed()
    assert_billed_once(billed, sink.tap.events, audio_bytes=SPEECH_BYTES, close_reason="client_abort")


async def test_upstream_clean_close_bills_what_was_streamed(tmp_path: Path, speech_pcm16: bytes, sink: Sink) -> None:
    """The provider closing cleanly (4000) after 12 appends: the client gets 4000, billed 1.2 s, upstream_close."""
    appends = 12
    async with FakeProvider(faults=Faults(close_after_appends=(appends, 4000, "bye"))) as provider:
        async with stack(tmp_path, provider=provider, publisher=sink.tap) as s:
            async with s.sidecar.openai(USER_KEY).realtime.connect(model=MODEL, extra_query=TRANSCRIBE) as conn:
                await next_event(conn, "session.created")
                for piece in list(chunks(speech_pcm16))[:appends]:
                    await conn.input_audio_buffer.append(audio=piece)
                _, code = await until_closed(conn)
            billed = await sink.billed()
    assert code == 4000
    assert_billed_once(billed, sink.tap.events, audio_bytes=appends * CHUNK_BYTES, close_reason="upstream_close")


async def test_upstream_drop_bills_once_as_upstream_error(tmp_path: Path, speech_pcm16: bytes, sink: Sink) -> None:
    """The provider dropping TCP after 9 appends: upstream_error event, close 1011, billed 0.9 s once."""
    appends = 9
    async with FakeProvider(faults=Faults(drop_after_appends=appends)) as provider:
        async with stack(tmp_path, provider=provider, publisher=sink.tap) as s:
            async with s.sidecar.openai(USER_KEY).realtime.connect(model=MODEL, extra_query=TRANSCRIBE) as conn:
                await next_event(conn, "session.created")
                for piece in list(chunks(speech_pcm16))[:appends]:
                    await conn.input_audio_buffer.append(audio=piece)
                events, code = await until_closed(conn)
            billed = await sink.billed()
    assert code == 1011
    assert (events[-1].type, events[-1].error.code) == ("error", "upstream_error")
    assert_billed_once(billed, sink.tap.events, audio_bytes=appends * CHUNK_BYTES, close_reason="upstream_error")


async def test_idle_timeout_bills_once(tmp_path: Path, speech_pcm16: bytes, sink: Sink) -> None:
    """A client that streams the file and goes quiet gets the idle_timeout error, then 4008; billed once."""
    async with stack(tmp_path, publisher=sink.tap, idle_timeout_s=0.5) as s:
        async with s.sidecar.openai(USER_KEY).realtime.connect(model=MODEL, extra_query=TRANSCRIBE) as conn:
            await stream_speech(conn, speech_pcm16)
            events, code = await until_closed(conn)
        billed = await sink.billed()
    assert code == 4008
    assert (events[-1].type, events[-1].error.code) == ("error", "idle_timeout")
    assert_billed_once(billed, sink.tap.events, audio_bytes=SPEECH_BYTES, close_reason="idle_timeout")


async def test_max_duration_bills_once(tmp_path: Path, speech_pcm16: bytes, sink: Sink) -> None:
    """A session reaching its length limit gets the max_duration error, then 4008; billed once for the file."""
    async with stack(tmp_path, publisher=sink.tap, max_session_s=1.5) as s:
        async with s.sidecar.openai(USER_KEY).realtime.connect(model=MODEL, extra_query=TRANSCRIBE) as conn:
            await stream_speech(conn, speech_pcm16)
            events, code = await until_closed(conn)
        billed = await sink.billed()
    assert code == 4008
    assert (events[-1].type, events[-1].error.code) == ("error", "max_duration")
    assert_billed_once(billed, sink.tap.events, audio_bytes=SPEECH_BYTES, close_reason="max_duration")


async def test_server_shutdown_bills_a_live_session_once(tmp_path: Path, speech_pcm16: bytes, sink: Sink) -> None:
    """Stopping the server while a session is live bills it once for the file, close_reason server_shutdown."""
    async with stack(tmp_path, publisher=sink.tap) as s:
        async with s.sidecar.openai(USER_KEY).realtime.connect(model=MODEL, extra_query=TRANSCRIBE) as conn:
            await stream_speech(conn, speech_pcm16)
            s.sidecar.server.handle_exit(signal.SIGTERM, None)  # what `sidecar serve` does on SIGTERM
            events, code = await until_closed(conn)
        billed = await sink.billed()
    assert_billed_once(billed, sink.tap.events, audio_bytes=SPEECH_BYTES, close_reason="server_shutdown")
    assert code == 1001  # docs/api.md: 1001 server_shutdown, after the error event
    assert (events[-1].type, events[-1].error.code) == ("error", "server_shutdown")
