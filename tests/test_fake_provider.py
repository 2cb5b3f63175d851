"""The fake realtime provider, driven by a plain websockets client over a real socket."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from sidecar.testing.fake_provider import (
    DEFAULT_TRANSCRIPT,
    RESPONSE_TOTAL_TOKENS,
    FakeProvider,
    Faults,
    response_usage,
)

KEY = "sk-test-provider-key-abcdef0123"
CHUNK = 4800  # 100 ms of 24 kHz PCM16
SPEECH_SECONDS = 6.667125
SPEECH_BYTES = 320022


@pytest.fixture
async def provider() -> AsyncIterator[FakeProvider]:
    """A started fake provider with a known key."""
    async with FakeProvider(api_key=KEY) as fake:
        yield fake


def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def open_ws(provider: FakeProvider, path: str, headers: dict[str, str]) -> connect:
    return connect(provider.url + path, additional_headers=headers, max_size=None)


async def recv_event(ws: ClientConnection) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(await ws.recv())
    return event


async def recv_until(ws: ClientConnection, event_type: str) -> list[dict[str, Any]]:
    """Every event up to and including the first of `event_type`."""
    events = [await recv_event(ws)]
    while events[-1]["type"] != event_type:
        events.append(await recv_event(ws))
    return events


async def send_event(ws: ClientConnection, event_type: str, **fields: Any) -> None:
    await ws.send(json.dumps({"type": event_type, **fields}))


async def append(ws: ClientConnection, audio: bytes, **fields: Any) -> None:
    await send_event(ws, "input_audio_buffer.append", audio=base64.b64encode(audio).decode(), **fields)


async def refused(provider: FakeProvider, path: str, headers: dict[str, str]) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as info:
        async with open_ws(provider, path, headers):
            pass
    return info.value


async def test_openai_form_announces_a_realtime_session(provider: FakeProvider) -> None:
    """Bearer auth on /v1/realtime upgrades and sends session.created with the model."""
    async with open_ws(provider, "/v1/realtime?model=gpt-realtime", bearer()) as ws:
        created = await recv_event(ws)
    assert created["type"] == "session.created"
    assert created["event_id"].startswith("event_")
    session = created["session"]
    assert (session["type"], session["model"], session["object"]) == (
        "realtime",
        "gpt-realtime",
        "realtime.session",
    )
    assert session["audio"]["input"] == {
        "format": {"type": "audio/pcm", "rate": 24000},
        "transcription": None,
    }
    handshake = provider.handshakes[0]
    assert handshake.path == "/v1/realtime"
    assert handshake.query == {"model": "gpt-realtime"}
    assert handshake.headers["authorization"] == f"Bearer {KEY}"


async def test_azure_ga_form_announces_a_transcription_session(provider: FakeProvider) -> None:
    """api-key auth on /openai/v1/realtime with intent=transcription names the model for transcription."""
    path = "/openai/v1/realtime?model=my-whisper&intent=transcription"
    async with open_ws(provider, path, {"api-key": KEY}) as ws:
        session = (await recv_event(ws))["session"]
    assert session["type"] == "transcription"
    assert session["model"] == "my-whisper"
    assert session["audio"]["input"]["transcription"] == {"model": "my-whisper"}


async def test_azure_preview_form_uses_the_deployment(provider: FakeProvider) -> None:
    """/openai/realtime with api-version and deployment upgrades; the deployment is the model."""
    path = "/openai/realtime?api-version=2025-04-01-preview&deployment=my-dep"
    async with open_ws(provider, path, {"api-key": KEY}) as ws:
        session = (await recv_event(ws))["session"]
    assert session["model"] == "my-dep"
    assert provider.sessions[0].handshake.query["api-version"] == "2025-04-01-preview"


async def test_openai_transcription_without_model_is_accepted(provider: FakeProvider) -> None:
    """intent=transcription without model on the OpenAI path gives a transcription session, model None."""
    async with open_ws(provider, "/v1/realtime?intent=transcription", bearer()) as ws:
        session = (await recv_event(ws))["session"]
    assert (session["type"], session["model"]) == ("transcription", None)


@pytest.mark.parametrize(
    ("path", "headers", "status", "code"),
    [
        ("/v1/elsewhere", bearer(), 404, "not_found"),
        ("/v1/realtime", {}, 401, "invalid_api_key"),
        ("/v1/realtime", bearer("sk-wrong-key-999999999"), 401, "invalid_api_key"),
        ("/v1/realtime", {"api-key": KEY}, 401, "invalid_api_key"),
        ("/openai/v1/realtime", bearer(), 401, "invalid_api_key"),
        (
            "/openai/realtime?api-version=2025-04-01-preview",
            {"api-key": KEY},
            400,
            "missing_required_parameter",
        ),
        ("/openai/realtime?deployment=d", {"api-key": KEY}, 400, "missing_required_parameter"),
        ("/v1/realtime?intent=transcription&model=whisper-1", bearer(), 400, "invalid_model"),
    ],
)
async def test_refusals_carry_status_and_openai_error_body(
    provider: FakeProvider, path: str, headers: dict[str, str], status: int, code: str
) -> None:
    """Each bad handshake is refused with its HTTP status and an OpenAI JSON error, and still recorded."""
    provider.faults.reject_model_on_transcription = True  # behave like OpenAI for the invalid_model row
    exc = await refused(provider, path, headers)
    assert exc.response.status_code == status
    assert exc.response.headers["Content-Type"] == "application/json"
    error = json.loads(exc.response.body or b"")["error"]
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    assert len(provider.handshakes) == 1
    assert provider.sessions == []


async def test_compatible_mode_accepts_model_on_transcription(provider: FakeProvider) -> None:
    """By default (an OpenAI-compatible server) `?model=` is accepted on a transcription session."""
    url = f"{provider.url}/v1/realtime?intent=transcription&model=whisper-1"
    async with connect(url, additional_headers=bearer()) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"


async def test_wrong_key_is_masked_in_the_refusal(provider: FakeProvider) -> None:
    """The 401 message names the wrong key only in masked form."""
    exc = await refused(provider, "/v1/realtime", bearer("sk-wrong-key-999999999"))
    message = json.loads(exc.response.body or b"")["error"]["message"]
    assert message.startswith("Incorrect API key provided: ")
    assert "sk-wrong-key-999999999" not in message


async def test_streamed_speech_is_transcribed_with_exact_duration(provider: FakeProvider, speech_pcm16: bytes) -> None:
    """100 ms PCM16 appends then commit: committed, word deltas, completed with 6.667125 s usage."""
    async with open_ws(provider, "/v1/realtime?intent=transcription", bearer()) as ws:
        await recv_event(ws)
        for start in range(0, len(speech_pcm16), CHUNK):
            await append(ws, speech_pcm16[start : start + CHUNK])
        await send_event(ws, "input_audio_buffer.commit")
        events = await recv_until(ws, "conversation.item.input_audio_transcription.completed")
    committed, *deltas, completed = events
    assert committed["type"] == "input_audio_buffer.committed"
    assert len(deltas) > 1
    assert {d["type"] for d in deltas} == {"conversation.item.input_audio_transcription.delta"}
    assert "".join(d["delta"] for d in deltas) == DEFAULT_TRANSCRIPT
    assert {d["item_id"] for d in deltas} == {committed["item_id"]} == {completed["item_id"]}
    assert completed["transcript"] == DEFAULT_TRANSCRIPT
    assert completed["content_index"] == 0
    assert completed["usage"] == {"type": "duration", "seconds": SPEECH_SECONDS}
    assert provider.sessions[0].audio_bytes == SPEECH_BYTES
    assert len({e["event_id"] for e in events}) == len(events)


async def test_g711_input_format_reports_duration_at_8000_bytes_per_second(
    provider: FakeProvider, speech_ulaw: bytes
) -> None:
    """After session.update selects audio/pcmu, the mu-law speech reports 6.667125 s too."""
    async with open_ws(provider, "/v1/realtime?model=gpt-realtime", bearer()) as ws:
        await recv_event(ws)
        await send_event(ws, "session.update", session={"audio": {"input": {"format": {"type": "audio/pcmu"}}}})
        await recv_until(ws, "session.updated")
        await append(ws, speech_ulaw)
        await send_event(ws, "input_audio_buffer.commit")
        completed = (await recv_until(ws, "conversation.item.input_audio_transcription.completed"))[-1]
    assert completed["usage"]["seconds"] == SPEECH_SECONDS


async def test_session_updates_deep_merge(provider: FakeProvider) -> None:
    """session.update and the beta transcription_session.update merge into the session and echo it."""
    async with open_ws(provider, "/v1/realtime?intent=transcription", bearer()) as ws:
        await recv_event(ws)
        transcription = {"audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}}}
        await send_event(ws, "session.update", session=transcription)
        updated = await recv_event(ws)
        await send_event(ws, "transcription_session.update", session={"input_audio_format": "pcm16"})
        beta = await recv_event(ws)
    assert updated["type"] == "session.updated"
    assert updated["session"]["audio"]["input"] == {
        "format": {"type": "audio/pcm", "rate": 24000},
        "transcription": {"model": "gpt-4o-transcribe"},
    }
    assert beta["type"] == "transcription_session.updated"
    assert beta["session"]["input_audio_format"] == "pcm16"
    assert provider.sessions[0].session == beta["session"]


async def test_empty_commit_error_leaks_key_host_and_deployment(provider: FakeProvider) -> None:
    """Committing nothing yields the error whose message names the key, host:port and deployment."""
    path = "/openai/realtime?api-version=2025-04-01-preview&deployment=secret-deployment"
    async with open_ws(provider, path, {"api-key": KEY}) as ws:
        await recv_event(ws)
        await send_event(ws, "input_audio_buffer.commit", event_id="evt_client_1")
        event = await recv_event(ws)
    assert event["type"] == "error"
    error = event["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "input_audio_buffer_commit_empty")
    assert error["event_id"] == "evt_client_1"
    for secret in (KEY, provider.host_port, "secret-deployment"):
        assert secret in error["message"]


async def test_clear_discards_uncommitted_audio(provider: FakeProvider) -> None:
    """After input_audio_buffer.clear, a commit finds the buffer empty; audio_bytes still counts it."""
    async with open_ws(provider, "/v1/realtime?model=gpt-realtime", bearer()) as ws:
        await recv_event(ws)
        await append(ws, b"\x00" * CHUNK)
        await send_event(ws, "input_audio_buffer.clear")
        cleared = await recv_event(ws)
        await send_event(ws, "input_audio_buffer.commit")
        error = await recv_event(ws)
    assert cleared["type"] == "input_audio_buffer.cleared"
    assert error["error"]["code"] == "input_audio_buffer_commit_empty"
    assert provider.sessions[0].audio_bytes == CHUNK


async def test_bad_frames_get_errors_and_the_session_lives_on(provider: FakeProvider) -> None:
    """Malformed JSON, binary, non-object, unknown type and bad base64 each get an error; nothing breaks."""
    async with open_ws(provider, "/v1/realtime?model=gpt-realtime", bearer()) as ws:
        await recv_event(ws)
        codes = []
        for frame in ("{not json", b"\x00\x01", "[1, 2]", '{"type": "no.such.event"}'):
            await ws.send(frame)
            codes.append((await recv_event(ws))["error"]["code"])
        await send_event(ws, "input_audio_buffer.append", audio="!!not-base64!!")
        codes.append((await recv_event(ws))["error"]["code"])
        await send_event(ws, "response.create")
        after = await recv_until(ws, "response.done")
    assert codes == [
        "invalid_json",
        "binary_not_supported",
        "invalid_json",
        "unknown_event",
        "invalid_base64",
    ]
    assert after[-1]["type"] == "response.done"
    session = provider.sessions[0]
    assert session.audio_bytes == 0
    assert [e["type"] for e in session.events] == [
        "no.such.event",
        "input_audio_buffer.append",
        "response.create",
    ]


async def test_response_create_reports_fixed_token_usage(provider: FakeProvider) -> None:
    """response.create yields response.created then response.done with the documented usage."""
    async with open_ws(provider, "/v1/realtime?model=gpt-realtime", bearer()) as ws:
        await recv_event(ws)
        await send_event(ws, "response.create")
        created, done = await recv_event(ws), await recv_event(ws)
    assert created["type"] == "response.created"
    assert done["type"] == "response.done"
    assert done["response"]["id"] == created["response"]["id"]
    usage = done["response"]["usage"]
    assert usage == response_usage()
    assert usage["total_tokens"] == RESPONSE_TOTAL_TOKENS == 160
    assert usage["input_token_details"]["cached_tokens_details"] == {"text_tokens": 10, "audio_tokens": 0}


async def test_refuse_status_fault_is_read_per_connection(provider: FakeProvider) -> None:
    """Setting refuse_status at runtime refuses the next handshake with that status and a JSON body."""
    async with open_ws(provider, "/v1/realtime", bearer()) as ws:
        await recv_event(ws)
    provider.faults.refuse_status = 503
    exc = await refused(provider, "/v1/realtime", bearer())
    assert exc.response.status_code == 503
    assert json.loads(exc.response.body or b"")["error"]["type"] == "server_error"
    assert len(provider.sessions) == 1


async def test_stall_handshake_holds_the_upgrade_until_close() -> None:
    """With stall_handshake the upgrade is never answered; closing the provider releases it with 503."""
    fake = FakeProvider(api_key=KEY, faults=Faults(stall_handshake=True))
    await fake.start()
    attempt = asyncio.create_task(refused(fake, "/v1/realtime", bearer()))
    await fake.wait_for_handshake(0)
    assert not attempt.done()
    await fake.aclose()
    assert (await attempt).response.status_code == 503
    assert fake.sessions == []


async def test_drop_after_appends_aborts_without_close_frame(provider: FakeProvider) -> None:
    """After the Nth append the TCP connection is aborted: the client sees no close frame."""
    provider.faults.drop_after_appends = 3
    async with open_ws(provider, "/v1/realtime?model=gpt-realtime", bearer()) as ws:
        await recv_event(ws)
        for _ in range(3):
            await append(ws, b"\x00" * CHUNK)
        with pytest.raises(ConnectionClosedError) as info:
            await ws.recv()
    assert info.value.rcvd is None
    session = provider.sessions[0]
    await session.closed.wait()
    assert session.close_code is None
    assert session.audio_bytes == 3 * CHUNK


async def test_close_after_appends_closes_cleanly_with_code_and_reason(provider: FakeProvider) -> None:
    """After the Nth append the provider sends a close frame with the configured code and reason."""
    provider.faults.close_after_appends = (2, 4123, "fault close")
    async with open_ws(provider, "/v1/realtime?model=gpt-realtime", bearer()) as ws:
        await recv_event(ws)
        await append(ws, b"\x00" * CHUNK)
        await append(ws, b"\x00" * CHUNK)
        with pytest.raises(ConnectionClosedError) as info:
            await ws.recv()
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (4123, "fault close")


async def test_reply_each_append_pairs_deltas_with_appends(provider: FakeProvider) -> None:
    """In benchmark mode each append is answered by a delta carrying its event_id, or its index."""
    provider.faults.reply_each_append = True
    async with open_ws(provider, "/v1/realtime?intent=transcription", bearer()) as ws:
        await recv_event(ws)
        for n in range(3):
            await append(ws, b"\x00" * CHUNK, event_id=f"evt_{n}")
        await append(ws, b"\x00" * CHUNK)
        deltas = [await recv_event(ws) for _ in range(4)]
    assert {d["type"] for d in deltas} == {"conversation.item.input_audio_transcription.delta"}
    assert [d["delta"] for d in deltas] == ["evt_0", "evt_1", "evt_2", "3"]


async def test_slow_reader_still_answers_every_event_in_order(provider: FakeProvider) -> None:
    """With read_delay_s the provider reads slowly but answers each event, in order."""
    provider.faults.read_delay_s = 0.001
    async with open_ws(provider, "/v1/realtime?model=gpt-realtime", bearer()) as ws:
        await recv_event(ws)
        await send_event(ws, "input_audio_buffer.clear")
        await send_event(ws, "response.create")
        types = [(await recv_event(ws))["type"] for _ in range(3)]
    assert types == ["input_audio_buffer.cleared", "response.created", "response.done"]


async def test_client_close_code_is_recorded(provider: FakeProvider) -> None:
    """The close code the client sends is recorded on the session, which is then marked closed."""
    async with open_ws(provider, "/v1/realtime?model=gpt-realtime", bearer()) as ws:
        await recv_event(ws)
        await ws.close(4003, "session_terminated")
    session = await provider.wait_for_session(0)
    await session.closed.wait()
    assert session.close_code == 4003


async def test_wait_for_session_resolves_when_that_session_exists(provider: FakeProvider) -> None:
    """A waiter started before any connection resolves with the second session once it is upgraded."""
    waiter = asyncio.create_task(provider.wait_for_session(1))
    async with open_ws(provider, "/v1/realtime?model=a", bearer()) as first:
        await recv_event(first)
        assert not waiter.done()
        async with open_ws(provider, "/v1/realtime?model=b", bearer()) as second:
            await recv_event(second)
            session = await waiter
    assert session is provider.sessions[1]
    assert session.handshake.query["model"] == "b"


async def test_send_all_then_drop_all_reach_every_live_session(provider: FakeProvider) -> None:
    """send_all pushes an event (with an event_id) to each session; drop_all aborts them all."""
    async with (
        open_ws(provider, "/v1/realtime?model=a", bearer()) as first,
        open_ws(provider, "/v1/realtime?model=b", bearer()) as second,
    ):
        await recv_event(first)
        await recv_event(second)
        await provider.send_all({"type": "rate_limits.updated", "rate_limits": []})
        pushed = [await recv_event(first), await recv_event(second)]
        await provider.drop_all()
        for ws in (first, second):
            with pytest.raises(ConnectionClosedError) as info:
                await ws.recv()
            assert info.value.rcvd is None
    assert [p["type"] for p in pushed] == ["rate_limits.updated"] * 2
    assert all(p["event_id"] for p in pushed)
    assert all(s.closed.is_set() for s in provider.sessions)


async def test_module_main_prints_url_serves_and_stops_on_sigterm() -> None:
    """`python -m sidecar.testing.fake_provider` prints its URL, serves, and exits 0 on SIGTERM."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar.testing.fake_provider",
        "--port",
        "0",
        "--api-key",
        KEY,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    url = (await process.stdout.readline()).decode().strip()
    try:
        async with connect(f"{url}/v1/realtime?model=m", additional_headers=bearer()) as ws:
            created = await recv_event(ws)
    finally:
        process.send_signal(signal.SIGTERM)
        code = await process.wait()
    assert url.startswith("ws://127.0.0.1:")
    assert created["type"] == "session.created"
    assert code == 0
