"""Contract tests, issue 12 items 5 and 6: with the official openai SDK as the client and a fake provider that
sends chosen frames and closes with a chosen reason, nothing the SDK decodes names the provider's key, host
or deployment, however the provider spells them (docs/api.md, "After the upgrade")."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

from sidecar.testing.fake_provider import FakeProvider
from tests.relay_stack import USER_KEY, Stack, entry, stack
from tests.support import TRANSCRIBE

PUBLIC = "captions"
DEPLOY = "acme/SecretDeploy7"  # letters, digits and a slash: it can turn up in base64 audio by chance
AUDIO = "AAAA" + DEPLOY.lower() + "AA"  # valid base64 (24 characters) that spells the deployment name
AUDIO_TYPES = ("response.output_audio.delta", "response.audio.delta")
END = '{"type":"test.end"}'


def entries(provider: FakeProvider) -> list[dict[str, Any]]:
    """One transcription model whose deployment name differs from its public name."""
    return [
        entry(
            PUBLIC,
            f"openai/{DEPLOY}",
            provider.url,
            provider.api_key,
            model_info={"base_model": "gpt-realtime-whisper"},
        )
    ]


def secrets(provider: FakeProvider) -> tuple[str, ...]:
    return provider.api_key, provider.host_port, provider.host_port.split(":")[0], DEPLOY


def escaped(text: str, *, upper: bool = False) -> str:
    """Every character of `text` as a JSON \\uXXXX escape."""
    return "".join(f"\\u{ord(c):04X}" if upper else f"\\u{ord(c):04x}" for c in text)


def crafted(provider: FakeProvider) -> list[str | bytes]:
    """Frames a provider may send that name its secrets, spelled as JSON allows, across event types."""
    key, host_port = provider.api_key, provider.host_port
    host = host_port.split(":")[0]
    slashed = DEPLOY.replace("/", "\\/")
    return [
        '{"type":"error","error":{"code":"x","message":"bad key ' + key.replace("-", "\\u002d") + '"}}',
        '{"type":"error","error":{"code":"x","message":"at ' + host_port.replace(".", "\\u002E") + '"}}',
        '{"type":"response.output_audio_transcript.delta","item_id":"i1","delta":"I am ' + DEPLOY + '"}',
        '{"type":"response.output_text.delta","item_id":"i1","delta":"' + slashed + '"}',
        '{"type":"response.done","response":{"output":[{"content":[{"transcript":"' + DEPLOY.upper() + '"}]}]}}',
        '{"type":"conversation.item.input_audio_transcription.delta","item_id":"i2","delta":"' + escaped(key) + '"}',
        '{"type":"conversation.item.input_audio_transcription.completed","item_id":"i2","transcript":"' + host + '"}',
        '{"type":"session.updated","session":{"type":"transcription","model":"' + slashed + '"}}',
        '{"type":"rate_limits.updated","rate_limits":[{"name":"' + escaped(host_port, upper=True) + '"}]}',
        ('{"type":"error","error":{"code":"x","message":"' + key.replace("-", "\\u002D") + '"}}').encode(),
        '{"type":"response.output_audio.delta","item_id":"' + DEPLOY + '","delta":"' + AUDIO + '"}',
    ]


def decoded_text(event: Any, *, top: bool = True) -> str:
    """Every string the client decodes as text (keys and values; an audio delta's base64 is audio)."""
    if isinstance(event, dict):
        audio = top and event.get("type") in AUDIO_TYPES
        return " ".join(f"{k} {decoded_text(v, top=False)}" for k, v in event.items() if not (audio and k == "delta"))
    if isinstance(event, list):
        return " ".join(decoded_text(v, top=False) for v in event)
    return event if isinstance(event, str) else ""


async def test_the_sdk_never_decodes_a_secret_however_the_provider_spells_it(tmp_path: Path) -> None:
    """Keys and hosts spelled with \\u escapes (either hex case), an escaped slash, the deployment name in
    deltas, response.done, transcription and session events, in a binary frame: the SDK decodes none of
    them, and the base64 audio that happens to spell the deployment name arrives untouched."""
    async with FakeProvider() as provider, stack(tmp_path, entries=entries(provider), provider=provider) as s:
        client = s.sidecar.openai(USER_KEY)
        frames = crafted(provider)
        async with client.realtime.connect(model=PUBLIC, extra_query=TRANSCRIBE) as conn:
            received = [json.loads(await conn.recv_bytes())]  # session.created, naming the deployment
            for frame in [*frames, END]:
                await provider.send_raw(frame)
            while received[-1]["type"] != "test.end":
                received.append(json.loads(await conn.recv_bytes()))  # as the SDK's parse_event decodes
        events = received[:-1]
        assert [e["type"] for e in events[1:]] == [json.loads(f)["type"] for f in frames]
        leaked = [
            (index, secret)
            for index, event in enumerate(events)
            for secret in secrets(provider)
            if secret.lower() in decoded_text(event).lower()
        ]
        assert leaked == []
        assert events[0]["session"]["model"] == PUBLIC
        assert events[3]["delta"] == f"I am {PUBLIC}"
        assert events[-1] == {"type": "response.output_audio.delta", "item_id": PUBLIC, "delta": AUDIO}
        assert base64.b64decode(events[-1]["delta"])  # still the audio it was


async def close_received(s: Stack, provider: FakeProvider, code: int, reason: str) -> Close:
    """The close frame the SDK receives when the provider closes with (code, reason) after the first append."""
    provider.faults.close_after_appends = (1, code, reason)
    async with s.sidecar.openai(USER_KEY).realtime.connect(model=PUBLIC, extra_query=TRANSCRIBE) as conn:
        await conn.input_audio_buffer.append(audio="AAAA")
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await conn.recv()
    assert closed.value.rcvd is not None
    return closed.value.rcvd


async def test_upstream_close_reason_reaches_the_sdk_scrubbed(tmp_path: Path) -> None:
    """A provider closing with its key, host:port and deployment in the reason, cut short inside the key at
    its end: the SDK gets the provider's close code and a reason that names none of them."""
    async with FakeProvider() as provider, stack(tmp_path, entries=entries(provider), provider=provider) as s:
        key = provider.api_key
        reason = f"bye {key} {provider.host_port} {DEPLOY} retry with {key[:12]}"
        assert len(reason.encode()) <= 123
        received = await close_received(s, provider, 4400, reason)
        assert received.code == 4400
        assert received.reason == f"bye [redacted] [redacted] {PUBLIC} retry with [redacted]"


async def test_upstream_close_reason_grown_by_scrubbing_is_cut_on_a_character_boundary(tmp_path: Path) -> None:
    """A 121-byte reason whose host names grow when redacted reaches the SDK cut to at most 123 bytes, with
    no euro sign cut in half and no host left."""
    async with FakeProvider() as provider, stack(tmp_path, entries=entries(provider), provider=provider) as s:
        host = provider.host_port.split(":")[0]
        reason = f"{host} " * 4 + "€" * 27  # 40 + 81 bytes; each host (9 characters) becomes [redacted] (10)
        assert len(reason.encode()) == 121
        received = await close_received(s, provider, 4401, reason)
        assert received.code == 4401
        assert received.reason == "[redacted] " * 4 + "€" * 26  # 122 bytes: a 27th would need 125
