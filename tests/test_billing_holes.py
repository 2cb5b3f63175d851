"""Nobody pays less than the provider decoded (issue 12, holes 1-4), end to end.

The client is the official openai SDK (raw websockets only for binary frames and refused upgrades); the
fake provider decodes audio as a real one does (each append at the input format in force when it arrives,
PCM at 24 kHz whatever rate a session declares) and reports transcription usage as OpenAI does. Every test
compares the one billed row with what the provider decoded.
"""

from __future__ import annotations

import base64
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from sidecar.testing.fake_provider import FakeProvider, Faults
from tests.relay_stack import MASTER_KEY, USER_KEY, entry, stack
from tests.support import COMPLETED, TRANSCRIBE, chunks, next_of

WHISPER = "gpt-realtime-whisper"
TWO_SECONDS_PCM = b"\x00\x01" * 48_000  # 2 s of 24 kHz PCM16


async def stream_and_commit(conn: Any, audio: bytes) -> Any:
    """Append `audio` in 100 ms chunks, commit, and return the transcription's completed event."""
    for piece in chunks(audio):
        await conn.input_audio_buffer.append(audio=piece)
    await conn.input_audio_buffer.commit()
    return await next_of(conn, COMPLETED)


@pytest.mark.parametrize("rate", [48000, 96000, 1e9, 1e300])
async def test_a_declared_sample_rate_cannot_lower_the_bill(tmp_path: Path, rate: float) -> None:
    """session.update with audio/pcm at a higher rate is refused; 2 s the provider decoded bill as 2 s."""
    async with stack(tmp_path) as s:
        async with s.sidecar.openai(USER_KEY).realtime.connect(model=WHISPER, extra_query=TRANSCRIBE) as conn:
            await next_of(conn, "session.created")
            fmt = {"type": "audio/pcm", "rate": rate}
            await conn.session.update(session={"type": "transcription", "audio": {"input": {"format": fmt}}})  # type: ignore[typeddict-item]
            error = await next_of(conn, "error")
            assert error.error.code == "invalid_audio_format"
            completed = await stream_and_commit(conn, TWO_SECONDS_PCM)
        row = await s.final_row()
        session = s.provider.sessions[0]
    assert completed.usage.seconds == 2
    assert session.audio_seconds == 2
    assert all(event["type"] != "session.update" for event in session.events)  # never reached the provider
    assert row.audio_seconds == row.quantity == Decimal(2)


async def test_a_format_switched_before_the_provider_confirms_bills_what_it_decoded(tmp_path: Path) -> None:
    """PCM, then mu-law appended before session.updated arrives: billed = decoded = 1 s + 1 s."""
    async with stack(tmp_path) as s:
        async with s.sidecar.openai(USER_KEY).realtime.connect(model=WHISPER, extra_query=TRANSCRIBE) as conn:
            await next_of(conn, "session.created")
            for piece in chunks(TWO_SECONDS_PCM[:48_000]):
                await conn.input_audio_buffer.append(audio=piece)
            await conn.session.update(
                session={"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcmu"}}}}
            )
            for piece in chunks(b"\xff" * 8000, 800):  # 1 s of mu-law, sent before the answer is read
                await conn.input_audio_buffer.append(audio=piece)
            await conn.input_audio_buffer.commit()
            completed = await next_of(conn, COMPLETED)
        row = await s.final_row()
    assert completed.usage.seconds == 2
    assert s.provider.sessions[0].audio_seconds == 2
    assert row.audio_seconds == row.quantity == Decimal(2)


async def test_a_provider_that_reports_more_than_was_metered_is_billed_the_larger(tmp_path: Path) -> None:
    """A provider counting 2 s of PCM at the mu-law format of the commit reports 12 s: 12 s are billed."""
    provider = FakeProvider(faults=Faults(duration_at_commit_format=True))
    async with provider, stack(tmp_path, provider=provider) as s:
        async with s.sidecar.openai(USER_KEY).realtime.connect(model=WHISPER, extra_query=TRANSCRIBE) as conn:
            await next_of(conn, "session.created")
            for piece in chunks(TWO_SECONDS_PCM):
                await conn.input_audio_buffer.append(audio=piece)
            await conn.session.update(
                session={"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcmu"}}}}
            )
            await next_of(conn, "session.updated")
            await conn.input_audio_buffer.commit()
            completed = await next_of(conn, COMPLETED)
        row = await s.final_row()
        metrics = s.sidecar.app.state.services.metrics
        over = metrics.reported_over_metered._value.get()
    assert completed.usage.seconds == 12
    assert row.audio_seconds == Decimal(2)  # what the sidecar metered, kept for reconciliation
    assert row.quantity == Decimal(12)
    assert orjson.loads(row.upstream_usage)["duration_seconds"] == 12
    assert over == 1


async def test_binary_client_frames_are_refused_and_never_reach_the_provider(tmp_path: Path) -> None:
    """A binary frame of audio is answered binary_not_supported; the provider gets nothing to decode."""
    async with stack(tmp_path) as s:
        url = f"{s.sidecar.ws}/v1/realtime?intent=transcription"
        async with connect(url, additional_headers={"Authorization": f"Bearer {USER_KEY}"}) as ws:
            assert orjson.loads(await ws.recv())["type"] == "session.created"
            await ws.send(b"\x00\x01" * 168_000)  # 7 s of PCM16, as a binary frame
            error = orjson.loads(await ws.recv())
            assert error["type"] == "error" and error["error"]["code"] == "binary_not_supported"
            append = {"type": "input_audio_buffer.append", "audio": base64.b64encode(TWO_SECONDS_PCM).decode()}
            await ws.send(orjson.dumps(append).decode())
            await ws.send(orjson.dumps({"type": "input_audio_buffer.commit"}).decode())
            while orjson.loads(await ws.recv())["type"] != COMPLETED:
                pass
        row = await s.final_row()
    assert s.provider.sessions[0].binary_frames == 0
    assert s.provider.sessions[0].audio_seconds == 2
    assert row.audio_seconds == Decimal(2)


def transcribers(provider: FakeProvider) -> list[dict[str, Any]]:
    return [
        entry(WHISPER, f"openai/{WHISPER}", provider.url, provider.api_key),
        entry("gpt-realtime", "openai/gpt-realtime", provider.url, provider.api_key),
        entry("whisper-1", "openai/whisper-1", provider.url, provider.api_key),
        entry("gpt-4o-transcribe", "openai/gpt-4o-transcribe", provider.url, provider.api_key),
    ]


@pytest.mark.parametrize(
    ("transcriber", "cost"),
    [
        ("whisper-1", Decimal("0.0002")),  # duration usage: 2 s at $0.0001/s
        ("gpt-4o-transcribe", Decimal("0.00025")),  # tokens: 20 audio in at $2.5e-6, 20 out at $1e-5
    ],
)
async def test_input_transcription_on_a_conversation_model_is_billed(
    tmp_path: Path, transcriber: str, cost: Decimal
) -> None:
    """gpt-realtime with a named transcriber and no response: the transcription is billed at its price."""
    provider = FakeProvider()
    async with provider, stack(tmp_path, provider=provider, entries=transcribers(provider)) as s:
        async with s.sidecar.openai(USER_KEY).realtime.connect(model="gpt-realtime") as conn:
            await next_of(conn, "session.created")
            audio_input = {"transcription": {"model": transcriber}}
            await conn.session.update(session={"type": "realtime", "audio": {"input": audio_input}})  # type: ignore[typeddict-item]
            updated = await next_of(conn, "session.updated")
            assert updated.session.audio.input.transcription.model == transcriber
            await stream_and_commit(conn, TWO_SECONDS_PCM)
        row = await s.final_row()
    assert row.cost_usd == cost
    assert Decimal(orjson.loads(row.upstream_usage)["transcription_cost_usd"]) == cost


async def test_a_transcriber_the_key_may_not_use_is_refused(tmp_path: Path) -> None:
    """A key allowed gpt-realtime only cannot name whisper-1 as its transcriber (model_not_allowed)."""
    provider = FakeProvider()
    async with provider, stack(tmp_path, provider=provider, entries=transcribers(provider)) as s:
        s.litellm.update_key(USER_KEY, models=["gpt-realtime"])
        async with s.sidecar.openai(USER_KEY).realtime.connect(model="gpt-realtime") as conn:
            await next_of(conn, "session.created")
            audio_input = {"transcription": {"model": "whisper-1"}}
            await conn.session.update(session={"type": "realtime", "audio": {"input": audio_input}})  # type: ignore[typeddict-item]
            error = await next_of(conn, "error")
            assert error.error.code == "model_not_allowed"
        await s.final_row()
    assert all(event["type"] != "session.update" for event in provider.sessions[0].events)


async def test_a_transcription_session_on_a_conversation_model_is_refused(tmp_path: Path) -> None:
    """intent=transcription with gpt-realtime is refused before the upgrade: 400 model_not_transcription."""
    async with stack(tmp_path) as s:
        url = f"{s.sidecar.ws}/v1/realtime?model=gpt-realtime&intent=transcription"
        with pytest.raises(InvalidStatus) as refused:
            await connect(url, additional_headers={"Authorization": f"Bearer {USER_KEY}"})
    response = refused.value.response
    assert response.status_code == 400
    assert orjson.loads(response.body or b"")["error"]["code"] == "model_not_transcription"
    assert s.provider.handshakes == []


def audio_input(**fields: Any) -> dict[str, Any]:
    return {"audio": {"input": fields}}


@pytest.mark.parametrize(
    ("session", "code"),
    [
        ({"type": "transcription", **audio_input(format={"type": "audio/pcm", "rate": 48000})}, "invalid_request"),
        (
            {"type": "transcription", "input_audio_format": "pcm16", **audio_input(format={"type": "audio/pcm"})},
            "invalid_request",
        ),
        ({"type": "transcription", **audio_input(transcription={"model": "gpt-realtime"})}, "model_not_transcription"),
        (
            {
                "type": "realtime",
                "model": "gpt-realtime",
                **audio_input(transcription={"model": "gpt-4o-mini-transcribe"}),
            },
            "model_not_found",
        ),
    ],
)
async def test_a_client_secret_cannot_be_minted_with_what_the_session_would_refuse(
    tmp_path: Path, session: dict[str, Any], code: str
) -> None:
    """Minting refuses an unmetered rate, a double-named format, or a transcriber that cannot be billed."""
    async with stack(tmp_path, client_secret_key="k" * 32) as s:
        async with httpx.AsyncClient(base_url=s.sidecar.http) as http:
            answer = await http.post(
                "/v1/realtime/client_secrets",
                json={"session": session},
                headers={"Authorization": f"Bearer {MASTER_KEY}"},
            )
    assert answer.status_code in (400, 404)
    assert answer.json()["error"]["code"] == code
