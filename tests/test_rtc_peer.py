"""sidecar/testing/rtc_peer.py without a browser: an aiortc caller creates a call with the openai SDK on
FakeCallProvider(answerer=RtcPeer()), and the peer's events reach both the sideband and the data channel."""

from __future__ import annotations

import asyncio
from fractions import Fraction
from typing import Any

import orjson
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack
from openai import AsyncOpenAI

from sidecar.testing.fake_calls import FakeCallProvider
from sidecar.testing.rtc_peer import CHANNEL, PeerCall, RtcPeer

COMPLETED = "conversation.item.input_audio_transcription.completed"
ITEM = Fraction(1, 5)  # 200 ms items: ten 20 ms Opus frames each


async def next_of(queue: asyncio.Queue[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The next event of type `kind` on the data channel (others skipped)."""
    while True:
        event = await queue.get()
        if event["type"] == kind:
            return event


async def test_the_peer_answers_an_sdk_call_and_reports_what_it_hears_to_the_sideband_and_the_data_channel() -> None:
    """Items of exactly 200 ms heard, the same events (same ids) on the sideband and the data channel; other
    client events on the channel reach the call's protocol; a commit after the audio stops reports the rest,
    so every second heard is reported once; the SDK's hangup ends the call and closes the connection."""
    peer = RtcPeer(item_seconds=ITEM, transcript="two words")
    async with FakeCallProvider(answerer=peer) as fake:
        client = AsyncOpenAI(base_url=f"{fake.url}/v1", api_key=fake.api_key, max_retries=0)
        caller = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        microphone = AudioStreamTrack()  # 20 ms frames of silence, in real time
        caller.addTrack(microphone)
        channel = caller.createDataChannel(CHANNEL)
        on_channel: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        channel.on("message", lambda text: on_channel.put_nowait(orjson.loads(text)))
        await caller.setLocalDescription(await caller.createOffer())
        raw = await client.realtime.calls.with_raw_response.create(
            sdp=caller.localDescription.sdp, session={"type": "transcription"}
        )
        call = await fake.wait_for_call()
        peer_call = await peer.wait_for_call()
        async with client.realtime.connect(call_id=call.call_id) as sideband:
            assert (await sideband.recv()).type == "session.created"
            # Attached before any audio can flow (as the sidecar's watch is): the sideband sees every item.
            await caller.setRemoteDescription(RTCSessionDescription(raw.http_response.text, "answer"))
            first = await next_of(on_channel, COMPLETED)
            assert first["usage"] == {"type": "duration", "seconds": 0.2} and first["transcript"] == "two words"
            channel.send(orjson.dumps({"type": "session.update", "session": {"type": "transcription"}}).decode())
            assert (await next_of(on_channel, "session.updated"))["session"]["type"] == "transcription"
            microphone.stop()
            channel.send(orjson.dumps({"type": "input_audio_buffer.commit"}).decode())
            await peer_call.committed.wait()
            await client.realtime.calls.hangup(call.call_id)
            from_sideband = [event async for event in sideband]
        await peer_call.track_ended.wait()  # the call ended: the peer closed its connection
        await caller.close()
        await peer.aclose()
    reported = [e for e in from_sideband if e.type == COMPLETED]
    assert peer_call.frames > 0 and peer_call.received == peer_call.billed == sum(peer_call.items, Fraction(0))
    assert all(item == ITEM for item in peer_call.items[:-1]) and 0 < peer_call.items[-1] <= ITEM
    # Every item reached the sideband (the sidecar bills these) with the seconds heard for it.
    assert [Fraction(str(e.usage.seconds)) for e in reported] == peer_call.items
    assert [e.event_id for e in reported][:1] == [first["event_id"]]
    assert any(e.type == "session.updated" for e in from_sideband)
    assert [e["type"] for e in peer_call.client_events] == ["session.update", "input_audio_buffer.commit"]
    assert call.hung_up.is_set() and peer_call.pc.connectionState == "closed"


class Recorder:
    """A call that keeps what the peer emits (CallLike)."""

    def __init__(self) -> None:
        self.data_channel: Any = None
        self.ended = asyncio.Event()
        self.events: list[dict[str, Any]] = []

    async def emit(self, event: dict[str, Any]) -> object:
        self.events.append(event)
        return event

    async def client_event(self, message: str | bytes) -> None:
        raise AssertionError("not forwarded")

    async def end(self, reason: str, *, code: int = 1000) -> None:
        self.ended.set()


async def test_a_commit_with_nothing_left_is_answered_commit_empty_and_a_closed_browser_ends_the_call() -> None:
    """Nothing heard since the last item: the commit gets OpenAI's `input_audio_buffer_commit_empty` error;
    the browser's connection closing ends the call (nothing to report)."""
    recorder = Recorder()
    peer_call = PeerCall(RTCPeerConnection(), ITEM, "x", recorder)
    peer_call.track_ended.set()
    peer_call.on_client_text('{"type": "input_audio_buffer.commit"}')
    await peer_call.committed.wait()
    assert [(e["type"], e["error"]["code"]) for e in recorder.events] == [("error", "input_audio_buffer_commit_empty")]
    await peer_call.media_closed()
    assert recorder.ended.is_set() and len(recorder.events) == 1
    await peer_call.close()
