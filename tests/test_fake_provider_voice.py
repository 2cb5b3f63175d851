"""The fake provider's GPT-Live and realtime translation, driven by the official `openai` SDK (and a raw
websockets client where the SDK cannot misbehave) over a real socket, on a clock the tests advance."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from fractions import Fraction
from typing import Any

import pytest
from openai import AsyncOpenAI
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from sidecar.testing.fake_live import INVALID_START
from sidecar.testing.fake_provider import DEFAULT_TRANSCRIPT, FakeProvider, Faults
from sidecar.testing.fake_translation import DEFAULT_TRANSLATION, FRAME_BYTES

KEY = "sk-test-provider-key-voice-0123"
CHUNK = 4800  # 100 ms of 24 kHz PCM16
SPEECH_BYTES = 320022


class Clock:
    """The provider's clock, moved by the test (seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def provider(clock: Clock) -> AsyncIterator[FakeProvider]:
    """A started fake provider with a known key and a test-driven clock."""
    async with FakeProvider(api_key=KEY, clock=clock) as fake:
        yield fake


def sdk(provider: FakeProvider, key: str = KEY) -> AsyncOpenAI:
    """The official SDK pointed at the fake (`<url>/v1`, as the sidecar's OpenAI-compatible bases)."""
    return AsyncOpenAI(api_key=key, base_url=provider.url.replace("ws://", "http://") + "/v1", max_retries=0)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(await ws.recv())
    return event


# --- GPT-Live ----------------------------------------------------------------------------------------


async def test_live_session_with_the_sdk(provider: FakeProvider, clock: Clock) -> None:
    """session.start -> session.started; appends counted; mute acknowledged; a response; session.closed
    with the cumulative seconds on the provider's clock (each started second counted)."""
    async with sdk(provider).live.connect() as conn:
        await conn.session.start(session={"model": "gpt-live-1", "instructions": "Be brief."}, event_id="start-1")
        started = await conn.recv()
        assert started.type == "session.started"
        assert started.session.id.startswith("sess_") and started.session.model == "gpt-live-1"
        assert started.client_event_id == "start-1"
        for _ in range(3):
            await conn.session.input_audio.append(audio=b64(b"\x01\x00" * (CHUNK // 2)))
        await conn.session.input_audio.mute(event_id="mute-1")
        muted = await conn.recv()
        assert muted.type == "session.input_audio.muted" and muted.client_event_id == "mute-1"
        await conn.session.input_audio.unmute()
        assert (await conn.recv()).type == "session.input_audio.unmuted"
        await conn.response.create()
        transcript = ""
        while transcript != DEFAULT_TRANSCRIPT:
            event = await conn.recv()
            assert event.type in ("session.output_transcript.delta", "session.output_audio.delta")
            if event.type == "session.output_transcript.delta":
                transcript += event.delta
        clock.now += 2.5
        await conn.session.close()
        closed = [event async for event in conn]
    assert [event.type for event in closed] == ["session.output_audio.delta", "session.closed"]
    assert closed[-1].reason == "close_requested" and closed[-1].usage.seconds == 3
    session = provider.sessions[0]
    assert session.protocol == "live"
    assert session.handshake.path == "/v1/live/sessions" and session.handshake.query == {}
    assert session.handshake.headers["authorization"] == f"Bearer {KEY}"
    assert session.audio_bytes == 3 * CHUNK and session.audio_seconds == Fraction(3, 10)
    assert session.reported_seconds == [3]
    await session.closed.wait()
    assert session.close_code == 1000


async def test_live_usage_every_n_appends_and_on_demand(provider: FakeProvider, clock: Clock) -> None:
    """`session.usage.updated` carries cumulative seconds: after every Nth append, and when asked."""
    provider.faults = Faults(usage_every_appends=2)
    async with sdk(provider).live.connect() as conn:
        await conn.session.start(session={"model": "gpt-live-1"})
        await conn.recv()
        clock.now += 0.4
        await conn.session.input_audio.append(audio=b64(bytes(CHUNK)))
        await conn.session.input_audio.append(audio=b64(bytes(CHUNK)))
        first = await conn.recv()
        clock.now += 1.0
        await provider.report_usage()
        second = await conn.recv()
    assert first.type == second.type == "session.usage.updated"
    assert (first.usage.seconds, second.usage.seconds) == (1, 2)
    assert provider.sessions[0].reported_seconds == [1, 2]


async def test_live_audio_format_sets_the_byte_rate(provider: FakeProvider) -> None:
    """Audio is counted at the startup format: G.711 at 8000 bytes a second."""
    async with sdk(provider).live.connect() as conn:
        await conn.session.start(session={"model": "gpt-live-1", "audio": {"format": {"type": "audio/pcmu"}}})
        await conn.recv()
        await conn.session.input_audio.append(audio=b64(bytes(4000)))
        await conn.session.close()
        _ = [event async for event in conn]
    assert provider.sessions[0].audio_seconds == Fraction(1, 2)


@pytest.mark.parametrize(
    "first",
    [
        {"type": "session.input_audio.append", "audio": "AAAA", "event_id": "a1"},
        {"type": "session.start", "session": {"model": ""}, "event_id": "a1"},
        {"type": "session.start", "event_id": "a1"},
    ],
    ids=["append-first", "empty-model", "no-session"],
)
async def test_live_requires_a_session_start_first(provider: FakeProvider, first: dict[str, Any]) -> None:
    """Anything but a usable session.start first is an `invalid_session_start` error, then close 1008."""
    async with connect(provider.url + "/v1/live/sessions", additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        await ws.send(json.dumps(first))
        error = await recv_json(ws)
        with pytest.raises(ConnectionClosedError):
            await ws.recv()
    assert error["type"] == "error" and error["error"]["code"] == INVALID_START
    assert error["error"]["client_event_id"] == "a1" == error["client_event_id"]
    assert ws.close_code == 1008


async def test_live_errors_keep_the_session(provider: FakeProvider) -> None:
    """After the start, bad frames get Live-shaped errors and the session goes on."""
    async with sdk(provider).live.connect() as conn:
        await conn.session.start(session={"model": "gpt-live-1"})
        await conn.recv()
        await conn.session.input_audio.append(audio="not base64!", event_id="bad-1")
        bad = await conn.recv()
        await conn.session.start(session={"model": "gpt-live-1"})
        again = await conn.recv()
        await conn.session.update(session={"instructions": "Shorter."}, event_id="u1")
        updated = await conn.recv()
    assert bad.type == "error" and bad.error.code == "invalid_base64" and bad.error.client_event_id == "bad-1"
    assert again.type == "error" and again.error.code == "session_already_started"
    assert updated.type == "session.updated" and updated.session.instructions == "Shorter."
    assert provider.sessions[0].audio_bytes == 0


async def test_live_update_naming_the_model_is_refused_leaking_key_host_and_deployment(
    provider: FakeProvider,
) -> None:
    """The model is immutable; the refusal names the key, host:port and deployment (scrub bait)."""
    async with sdk(provider).live.connect() as conn:
        await conn.session.start(session={"model": "my-live-deployment"})
        await conn.recv()
        await conn.send({"type": "session.update", "session": {"model": "gpt-live-1"}})
        refused = await conn.recv()
    assert refused.type == "error" and refused.error.code == "immutable_parameter"
    for leak in (KEY, provider.host_port, "my-live-deployment"):
        assert leak in refused.error.message


async def test_live_handshake_refusals(provider: FakeProvider) -> None:
    """A query (the model belongs in session.start), a wrong key, and Azure's api-key form."""
    with pytest.raises(InvalidStatus) as query:
        async with connect(provider.url + "/v1/live/sessions?model=gpt-live-1", additional_headers=bearer()):
            pass
    with pytest.raises(InvalidStatus) as wrong_key:
        async with sdk(provider, key="sk-wrong-key-0000").live.connect():
            pass
    async with connect(provider.url + "/openai/v1/live/sessions", additional_headers={"api-key": KEY}) as ws:
        await ws.send(json.dumps({"type": "session.start", "session": {"model": "my-deployment"}}))
        started = await recv_json(ws)
    assert query.value.response.status_code == 400
    assert json.loads(query.value.response.body or b"")["error"]["code"] == "unknown_parameter"
    assert wrong_key.value.response.status_code == 401
    assert started["type"] == "session.started" and started["session"]["model"] == "my-deployment"


async def test_live_drop_after_appends_with_the_sdk(provider: FakeProvider) -> None:
    """Fault: the connection is aborted after the Nth append; the SDK sees no close frame."""
    provider.faults = Faults(drop_after_appends=2)
    with pytest.raises(ConnectionClosedError) as dropped:
        async with sdk(provider).live.connect() as conn:
            await conn.session.start(session={"model": "gpt-live-1"})
            await conn.recv()
            for _ in range(2):
                await conn.session.input_audio.append(audio=b64(bytes(CHUNK)))
            _ = [event async for event in conn]
    assert dropped.value.rcvd is None
    session = await provider.wait_for_session()
    await session.closed.wait()
    assert session.audio_bytes == 2 * CHUNK and session.close_code is None


async def test_live_reply_each_append_echoes_event_ids(provider: FakeProvider) -> None:
    """Benchmark mode: every append answered by an input transcript delta carrying its event_id."""
    provider.faults = Faults(reply_each_append=True)
    async with sdk(provider).live.connect() as conn:
        await conn.session.start(session={"model": "gpt-live-1"})
        await conn.recv()
        for index in range(3):
            await conn.session.input_audio.append(audio=b64(bytes(CHUNK)), event_id=f"a{index}")
        deltas = [await conn.recv() for _ in range(3)]
    assert [(d.type, d.delta) for d in deltas] == [("session.input_transcript.delta", f"a{i}") for i in range(3)]


# --- realtime translation -------------------------------------------------------------------------------


def bearer() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


async def test_translation_session_with_the_sdk(provider: FakeProvider, speech_pcm16: bytes) -> None:
    """session.created names the URL's model; updates merge; the speech is counted to the byte; each 200 ms
    frame is answered with transcript and audio deltas; session.close -> session.closed."""
    async with sdk(provider).realtime.translations.connect(model="gpt-realtime-translate") as conn:
        created = await conn.recv()
        assert created.type == "session.created"
        assert created.session.model == "gpt-realtime-translate" and created.session.type == "translation"
        audio = {"output": {"language": "fr"}, "input": {"transcription": {"model": "gpt-live-transcribe"}}}
        await conn.session.update(session={"audio": audio})
        updated = await conn.recv()
        assert updated.type == "session.updated" and updated.session.audio.output is not None
        assert updated.session.audio.output.language == "fr"
        for offset in range(0, len(speech_pcm16), FRAME_BYTES):
            await conn.session.input_audio_buffer.append(audio=b64(speech_pcm16[offset : offset + FRAME_BYTES]))
        await conn.session.close()
        events = [event async for event in conn]
    frames = SPEECH_BYTES // FRAME_BYTES
    kinds = [event.type for event in events]
    assert kinds[-1] == "session.closed"
    assert kinds.count("session.output_audio.delta") == frames
    assert kinds.count("session.input_transcript.delta") == kinds.count("session.output_transcript.delta") == frames
    translated = "".join(e.delta for e in events if e.type == "session.output_transcript.delta")
    assert translated.startswith(DEFAULT_TRANSLATION.split(" ")[0] + " ")
    elapsed = [e.elapsed_ms for e in events if e.type == "session.output_audio.delta"]
    assert elapsed == [200 * i for i in range(frames)]
    session = provider.sessions[0]
    assert session.protocol == "translation"
    assert session.handshake.path == "/v1/realtime/translations"
    assert session.handshake.query == {"model": "gpt-realtime-translate"}
    assert session.audio_bytes == len(speech_pcm16) == SPEECH_BYTES
    assert session.audio_seconds == Fraction(SPEECH_BYTES, 48000)
    await session.closed.wait()
    assert session.close_code == 1000


async def test_translation_without_transcription_sends_no_source_deltas(provider: FakeProvider) -> None:
    """Source transcript deltas only when audio.input.transcription is configured; a short chunk waits."""
    async with sdk(provider).realtime.translations.connect(model="gpt-realtime-translate") as conn:
        await conn.recv()
        await conn.session.input_audio_buffer.append(audio=b64(bytes(FRAME_BYTES // 2)))
        await conn.session.input_audio_buffer.append(audio=b64(bytes(FRAME_BYTES // 2)))
        first = await conn.recv()
        second = await conn.recv()
    assert (first.type, second.type) == ("session.output_transcript.delta", "session.output_audio.delta")


async def test_translation_refusals_and_errors(provider: FakeProvider) -> None:
    """No model in the URL is refused before the upgrade; unknown events, a model or a type in an update
    are error events (the model one naming key, host:port and deployment); the session goes on."""
    with pytest.raises(InvalidStatus) as no_model:
        async with connect(provider.url + "/v1/realtime/translations", additional_headers=bearer()):
            pass
    url = provider.url + "/openai/v1/realtime/translations?model=my-translate-deployment"
    async with connect(url, additional_headers={"api-key": KEY}) as ws:
        created = await recv_json(ws)
        replies = []
        for event in (
            {"type": "response.create", "event_id": "e1"},
            {"type": "session.update", "session": {"model": "gpt-realtime-translate"}, "event_id": "e2"},
            {"type": "session.update", "session": {"type": "realtime"}},
            {"type": "session.input_audio_buffer.append", "audio": "%%%"},
        ):
            await ws.send(json.dumps(event))
            replies.append(await recv_json(ws))
    assert no_model.value.response.status_code == 400
    assert created["session"]["model"] == "my-translate-deployment"
    assert [r["error"]["code"] for r in replies] == [
        "unknown_event",
        "unknown_parameter",
        "unknown_parameter",
        "invalid_base64",
    ]
    assert replies[0]["error"]["event_id"] == "e1"
    for leak in (KEY, provider.host_port, "my-translate-deployment"):
        assert leak in replies[1]["error"]["message"]


async def test_translation_close_after_appends_with_the_sdk(provider: FakeProvider) -> None:
    """Fault: the provider closes with the configured code and reason after the Nth append."""
    provider.faults = Faults(close_after_appends=(2, 4000, "translation over"))
    with pytest.raises(ConnectionClosedError) as closed:
        async with sdk(provider).realtime.translations.connect(model="gpt-realtime-translate") as conn:
            await conn.recv()
            for _ in range(2):
                await conn.session.input_audio_buffer.append(audio=b64(bytes(CHUNK)))
            _ = [event async for event in conn]
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4000, "translation over")
    assert provider.sessions[0].audio_bytes == 2 * CHUNK


async def test_translation_refuse_status_with_the_sdk(provider: FakeProvider) -> None:
    """Fault: the upgrade is refused with the injected status, on the translation route too."""
    provider.faults = Faults(refuse_status=503)
    with pytest.raises(InvalidStatus) as refused:
        async with sdk(provider).realtime.translations.connect(model="gpt-realtime-translate"):
            pass
    assert refused.value.response.status_code == 503
    assert provider.handshakes[0].path == "/v1/realtime/translations" and provider.sessions == []
