"""The lean upstream client on both event loops the sidecar runs on (asyncio in tests, uvloop in serve)."""

from __future__ import annotations

import asyncio

import orjson
import pytest
import uvloop
from websockets.exceptions import ConnectionClosed

from sidecar.catalog import LIVE_ENDPOINT, TRANSLATION_ENDPOINT, Deployment
from sidecar.errors import UpstreamError
from sidecar.testing.fake_provider import FakeProvider, Faults
from sidecar.upstream import connect_any, websocket_dialer
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


# --- the other two routes (issue 15): the relay's dialer and failover on their upstream forms --------------


async def test_connect_any_fails_over_to_a_gpt_live_deployment() -> None:
    """On /v1/live/sessions: a refused deployment, then one that answers; the session opens with session.start."""
    async with FakeProvider() as provider:
        wrong = Deployment("openai", "gpt-live-1", provider.url, "sk-wrong-key-123456", deployment_id="bad")
        good = Deployment("azure", "my-live-deployment", provider.url, provider.api_key, deployment_id="good")
        failed: list[str] = []
        dial = websocket_dialer(max_frame_bytes=1 << 20, connect_timeout_s=5)
        connected = await connect_any(
            [wrong, good],
            dial,
            transcription=False,
            route=LIVE_ENDPOINT,
            on_failure=lambda deployment, exc: failed.append(f"{deployment.deployment_id} {exc.status}"),
        )
        start = {"type": "session.start", "session": {"model": "my-live-deployment"}}
        await connected.connection.send(orjson.dumps(start).decode())
        started = orjson.loads(await connected.connection.recv())
        await connected.connection.close()
    assert failed == ["bad 401"]
    assert (connected.attempts, connected.target.route, connected.target.deployment) == (2, LIVE_ENDPOINT, good)
    assert [h.path for h in provider.handshakes] == ["/v1/live/sessions", "/openai/v1/live/sessions"]
    assert provider.handshakes[1].headers["api-key"] == provider.api_key and provider.handshakes[1].query == {}
    assert started["type"] == "session.started" and started["session"]["model"] == "my-live-deployment"


async def test_connect_any_opens_a_translation_session() -> None:
    """On /v1/realtime/translations the dialled upstream names the model in its query and opens with session.created."""
    async with FakeProvider() as provider:
        deployment = Deployment("openai", "gpt-realtime-translate", provider.url, provider.api_key)
        dial = websocket_dialer(max_frame_bytes=1 << 20, connect_timeout_s=5)
        connected = await connect_any([deployment], dial, transcription=False, route=TRANSLATION_ENDPOINT)
        created = orjson.loads(await connected.connection.recv())
        await connected.connection.close()
    assert created["type"] == "session.created" and created["session"]["model"] == "gpt-realtime-translate"
    assert provider.handshakes[0].query == {"model": "gpt-realtime-translate"}
