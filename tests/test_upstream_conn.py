"""The lean upstream client on both event loops the sidecar runs on (asyncio in tests, uvloop in serve)."""

from __future__ import annotations

import asyncio

import orjson
import pytest
import uvloop
from websockets.exceptions import ConnectionClosed

from sidecar.errors import UpstreamError
from sidecar.testing.fake_provider import FakeProvider, Faults
from sidecar.upstream_conn import open_upstream


async def exchange() -> tuple[str, int | None, int | None]:
    """Open a transcription session on the fake provider, append, commit, read the transcript, close."""
    async with FakeProvider() as provider:
        conn = await open_upstream(
            f"{provider.url}/v1/realtime?model=m&intent=transcription",
            (("Authorization", f"Bearer {provider.api_key}"),),
            max_frame_bytes=1 << 20,
            open_timeout_s=5,
        )
        assert orjson.loads(await conn.recv())["type"] == "session.created"
        await conn.send(orjson.dumps({"type": "input_audio_buffer.append", "audio": "AAAA"}).decode())
        await conn.send(orjson.dumps({"type": "input_audio_buffer.commit"}).decode())
        transcript = ""
        while not transcript:
            event = orjson.loads(await conn.recv())
            if event["type"].endswith("transcription.completed"):
                transcript = event["transcript"]
        await conn.close(4000, "done")
        session = provider.sessions[0]
        await session.closed.wait()
        refused: int | None = None
        provider.faults.refuse_status = 503
        try:
            await open_upstream(f"{provider.url}/v1/realtime?model=m", (), max_frame_bytes=1024, open_timeout_s=5)
        except UpstreamError as exc:
            refused = exc.status
        return transcript, session.close_code, refused


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_send_recv_close_and_refusal_on_each_loop(loop_factory: object) -> None:
    """Messages both ways, the close code reaches the provider, and a refused handshake carries its status."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:  # type: ignore[arg-type]
        transcript, close_code, refused = runner.run(exchange())
    assert transcript.startswith("The quick brown fox")
    assert close_code == 4000
    assert refused == 503


async def test_drop_raises_connection_closed_without_a_close_frame() -> None:
    """A provider that drops the TCP connection makes recv raise ConnectionClosed with no received close."""
    async with FakeProvider(faults=Faults(drop_after_appends=1)) as provider:
        conn = await open_upstream(
            f"{provider.url}/v1/realtime?model=m", (("Authorization", f"Bearer {provider.api_key}"),),
            max_frame_bytes=1 << 20, open_timeout_s=5,
        )  # fmt: skip
        await conn.recv()
        await conn.send(orjson.dumps({"type": "input_audio_buffer.append", "audio": "AAAA"}).decode())
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await conn.recv()
        assert closed.value.rcvd is None


async def test_unreachable_and_bad_url_are_upstream_errors() -> None:
    """A closed port and a non-WebSocket URL fail with UpstreamError messages that name no host."""
    for url in ("ws://127.0.0.1:1/v1/realtime", "http://example.invalid/x"):
        with pytest.raises(UpstreamError) as failed:
            await open_upstream(url, (), max_frame_bytes=1024, open_timeout_s=2)
        assert "127.0.0.1" not in str(failed.value) and "example" not in str(failed.value)
