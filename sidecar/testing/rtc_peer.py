"""A real WebRTC peer (aiortc) standing in for a provider's media side: the far end of a browser's call.

OpenAI's WebRTC convention (docs/browser.md, "Captions over WebRTC"): the browser sends its microphone as
an audio track and opens a data channel named `oai-events`; the provider answers the SDP offer, hears the
track, and sends its server events on that channel (and on the call's sidebands, which is how the sidecar
meters the call). This peer does that for real on one machine: it answers the offer with aiortc, decodes
the audio it receives, and counts it exactly (decoded samples / sample rate, as a Fraction). Every
`item_seconds` of received audio it emits one transcription item, and the remainder when the browser
commits (`input_audio_buffer.commit` on the data channel, after stopping its track):

    conversation.item.input_audio_transcription.delta       (a few words, for the in-progress line)
    conversation.item.input_audio_transcription.completed   usage {"type": "duration", "seconds": s}

where `s` is exactly the seconds of audio received for that item, so the seconds a call bills can be
compared with what the peer heard. The words are fixed (`transcript`): nothing here recognises speech.
"Heard" is what aiortc decoded: the last few packets of a call (at most its audio jitter buffer's 4 x 20 ms)
may still sit undecoded when the audio stops, and are neither counted nor reported.

When the browser's connection or its data channel closes while the call goes on (a closed tab), the peer
reports what it heard and not yet reported, then ends the call (`call.end("media_closed")`), as OpenAI ends
a call whose peer connection closes; when the call ends first (a hangup), the peer closes its connection.

Plugged into sidecar.testing.fake_calls.FakeCallProvider as its `answerer` (`RtcPeer()(offer_sdp, call)`),
each event goes through `call.emit` (the call's sidebands and this peer's data channel); alone,
`await peer.answer(offer_sdp)` answers with events on the data channel only.

ICE on one machine: aiortc gathers host candidates on every interface except 127.0.0.1 and no STUN
server is configured here (aiortc's default is Google's), so the call runs over the machine's own
address; the browser must then show its real host candidates (Chromium:
`--disable-features=WebRtcHideLocalIpsWithMdns`, else it offers only `.local` mDNS names).

The answer is complete (non-trickle): aiortc gathers every candidate before `setLocalDescription`
returns, as OpenAI's answer is.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Final, Protocol

import orjson
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

Event = dict[str, Any]

CHANNEL: Final = "oai-events"  # the data channel a browser opens for the provider's events
DEFAULT_ITEM_SECONDS: Final = Fraction(2)
DEFAULT_TRANSCRIPT: Final = "Captions over WebRTC."
# A commit reports the remainder once the browser's audio has stopped: Chromium sends no RTCP BYE when a
# track or transceiver stops (checked with Chromium 156), so "stopped" is QUIET_S without a decoded frame
# (20 ms frames on one machine; 1 s leaves room for a loaded CI host), within COMMIT_WAIT_S of the commit (a
# commit while audio still flows).
QUIET_S: Final = 1.0
COMMIT_WAIT_S: Final = 5.0


class CallLike(Protocol):
    """What the peer uses of a FakeCallProvider call (sidecar.testing.fake_calls.FakeCall)."""

    #: Set by the answerer: every event of the call then also goes to the browser's data channel.
    data_channel: Callable[[Event], Awaitable[None]] | None
    ended: asyncio.Event

    async def emit(self, event: Event) -> object: ...

    async def client_event(self, message: str | bytes) -> None: ...

    async def end(self, reason: str, *, code: int = 1000) -> None: ...


def seconds_text(seconds: Fraction) -> float:
    """A received duration as the JSON number OpenAI sends (20 ms Opus frames: exact in 6 decimals)."""
    return round(float(seconds), 6)


@dataclass
class PeerCall:
    """One call the peer answered: its connection, the audio it heard, the items it emitted."""

    pc: RTCPeerConnection
    item_seconds: Fraction
    transcript: str
    call: CallLike | None = None  # the fake provider's call; None: events go to the data channel only
    received: Fraction = Fraction(0)  # seconds of audio decoded from the browser's track
    billed: Fraction = Fraction(0)  # seconds reported in completed items' usage
    frames: int = 0
    items: list[Fraction] = field(default_factory=list)
    channel: RTCDataChannel | None = None
    channel_open: asyncio.Event = field(default_factory=asyncio.Event)
    track_started: asyncio.Event = field(default_factory=asyncio.Event)
    track_ended: asyncio.Event = field(default_factory=asyncio.Event)
    committed: asyncio.Event = field(default_factory=asyncio.Event)  # set once a commit has been answered
    _reported: asyncio.Condition = field(default_factory=asyncio.Condition)
    _sent: int = 0  # items whose completed event has been sent
    _heard: asyncio.Event = field(default_factory=asyncio.Event)  # set at each decoded frame
    client_events: list[Event] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    _order: asyncio.Lock = field(default_factory=asyncio.Lock)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def pending(self) -> Fraction:
        """Seconds received and not yet reported in an item."""
        return self.received - self.billed

    def spawn(self, work: Awaitable[None]) -> None:
        """Run `work` in the background, kept until done (cancelled by close)."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def hear(self, track: MediaStreamTrack) -> None:
        """Decode the browser's audio until its track ends, emitting an item every `item_seconds`."""
        self.track_started.set()
        try:
            while True:
                frame = await track.recv()
                self.frames += 1
                self._heard.set()
                self.received += Fraction(frame.samples, frame.sample_rate)  # type: ignore[union-attr]
                while self.pending >= self.item_seconds:
                    await self.report(self.item_seconds)
        except MediaStreamError:
            pass
        finally:
            self.track_ended.set()

    async def report(self, seconds: Fraction) -> None:
        """Emit one transcription item of `seconds` (deltas word by word, then completed with its usage)."""
        self.billed += seconds
        self.items.append(seconds)
        item_id = f"item_{uuid.uuid4().hex[:16]}"
        async with self._order:
            for index, word in enumerate(self.transcript.split(" ")):
                await self.send(
                    {
                        "type": "conversation.item.input_audio_transcription.delta",
                        "item_id": item_id,
                        "content_index": 0,
                        "delta": f" {word}" if index else word,
                    }
                )
            await self.send(
                {
                    "type": "conversation.item.input_audio_transcription.completed",
                    "item_id": item_id,
                    "content_index": 0,
                    "transcript": self.transcript,
                    "usage": {"type": "duration", "seconds": seconds_text(seconds)},
                }
            )
        async with self._reported:
            self._sent += 1
            self._reported.notify_all()

    async def wait_for_items(self, n: int) -> None:
        """Return once `n` items have been reported (sent to the call's sidebands and data channel)."""
        async with self._reported:
            await self._reported.wait_for(lambda: self._sent >= n)

    async def send(self, event: Event) -> None:
        """One server event into the call (with a fresh event_id)."""
        event = {"event_id": f"event_{next(self._ids)}_{uuid.uuid4().hex[:8]}", **event}
        if self.call is None:
            await self.to_channel(event)
        else:
            await self.call.emit(event)  # to the call's sidebands, and back to to_channel

    def on_client_text(self, text: str | bytes) -> None:
        """A client event from the data channel: a commit reports the remainder (the audio is the peer's);
        anything else goes to the call's protocol (fake_call_protocol.py), which answers it."""
        try:
            event = orjson.loads(text)
        except orjson.JSONDecodeError:
            event = None
        if isinstance(event, dict):
            self.client_events.append(event)
        if isinstance(event, dict) and event.get("type") == "input_audio_buffer.commit":
            self.spawn(self.commit())
        elif self.call is not None:
            self.spawn(self.call.client_event(text))

    async def commit(self) -> None:
        """Report what was received and not yet reported, once the audio has stopped (QUIET_S without a
        frame, the track ended, or COMMIT_WAIT_S after the commit); nothing left: `input_audio_buffer_commit_empty`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._quiet(), COMMIT_WAIT_S)
        if self.pending > 0:
            await self.report(self.pending)
        else:
            async with self._order:
                await self.send(
                    {
                        "type": "error",
                        "error": {
                            "type": "invalid_request_error",
                            "code": "input_audio_buffer_commit_empty",
                            "message": "Error committing input audio buffer: buffer is empty.",
                        },
                    }
                )
        self.committed.set()

    async def media_closed(self) -> None:
        """The browser's connection closed or failed while the call went on: report what was heard and not yet
        reported, then end the call (OpenAI ends a call whose peer connection closes)."""
        if self.call is None or self.call.ended.is_set():
            return  # the call ended first (hung up): the peer closed the connection itself
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._quiet(), COMMIT_WAIT_S)
        if self.pending > 0:
            await self.report(self.pending)
        await self.call.end("media_closed")

    async def _quiet(self) -> None:
        """Return once no frame has been decoded for QUIET_S, or the track has ended."""
        while not self.track_ended.is_set():
            self._heard.clear()
            try:
                await asyncio.wait_for(self._heard.wait(), QUIET_S)
            except TimeoutError:
                return

    async def to_channel(self, event: Event) -> None:
        """`event` on the oai-events channel, when it is open (FakeCall.data_channel)."""
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(orjson.dumps(event).decode())

    async def close(self) -> None:
        """Close the connection and stop the background work."""
        await self.pc.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class RtcPeer:
    """Answers browsers' offers with real WebRTC connections; `calls` keeps every call it answered."""

    def __init__(self, *, item_seconds: Fraction = DEFAULT_ITEM_SECONDS, transcript: str = DEFAULT_TRANSCRIPT):
        self.item_seconds = item_seconds
        self.transcript = transcript
        self.calls: list[PeerCall] = []
        self._answered = asyncio.Condition()

    async def __call__(self, offer_sdp: str, call: CallLike) -> str:
        """FakeCallProvider's answerer: answer `offer_sdp` for `call` (its events go through `call.emit`)."""
        return await self.answer(offer_sdp, call=call)

    async def answer(self, offer_sdp: str, *, call: CallLike | None = None) -> str:
        """The SDP answer to `offer_sdp` (candidates included). With `call`, events go through `call.emit`
        (its sidebands and this peer's data channel), other client events to `call.client_event`, and the
        call ends when the browser's connection does; without, events go to the data channel only."""
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        peer_call = PeerCall(pc, self.item_seconds, self.transcript, call)
        self._wire(peer_call)
        if call is not None:
            call.data_channel = peer_call.to_channel
            peer_call.spawn(_close_when_ended(peer_call, call))
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        async with self._answered:
            self.calls.append(peer_call)
            self._answered.notify_all()
        return pc.localDescription.sdp

    def _wire(self, peer_call: PeerCall) -> None:
        """Route the connection's track and data channel into `peer_call`."""
        pc = peer_call.pc

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                peer_call.spawn(peer_call.hear(track))

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState in ("closed", "failed"):
                peer_call.spawn(peer_call.media_closed())

        @pc.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            if channel.label != CHANNEL:
                return
            peer_call.channel = channel
            channel.on("message", peer_call.on_client_text)
            # A closed tab aborts the SCTP association at once; ICE would take its consent timeout to notice.
            channel.on("close", lambda: peer_call.spawn(peer_call.media_closed()))
            if channel.readyState == "open":
                peer_call.channel_open.set()
            channel.on("open", peer_call.channel_open.set)

    async def wait_for_call(self, index: int = 0) -> PeerCall:
        """The `index`-th call answered, once it has been."""
        async with self._answered:
            await self._answered.wait_for(lambda: len(self.calls) > index)
        return self.calls[index]

    async def aclose(self) -> None:
        """Close every call."""
        await asyncio.gather(*(c.close() for c in self.calls), return_exceptions=True)


async def _close_when_ended(peer_call: PeerCall, call: CallLike) -> None:
    """Close the media connection once the call has ended (hung up, closed by a sideband, ...)."""
    await call.ended.wait()
    await peer_call.pc.close()
