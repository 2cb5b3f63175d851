"""What every protocol of the fake provider shares: the handshake and session records, the injected faults,
the reply of one client frame, and server event ids (sidecar/testing/fake_provider.py serves the Realtime
API, fake_live.py GPT-Live, fake_translation.py realtime translation; one server, one set of faults).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Final, Protocol

Event = dict[str, Any]

#: `audio/pcm` (`pcm16`) 24 kHz 16-bit mono; G.711 (`audio/pcmu`, `audio/pcma`) is 8000 bytes/s.
PCM16_BYTES_PER_SECOND: Final = 48_000
G711_BYTES_PER_SECOND: Final = 8_000
#: Words per transcript delta; the deltas concatenate to the transcript.
WORDS_PER_DELTA: Final = 3


@dataclass
class Faults:
    """Injected failures. Mutable at runtime: read on each connection (handshake) and each client event.

    `refuse_status` wins over `stall_handshake`. Append counts are per connection and include appends
    whose base64 is invalid. An append is the protocol's own: `input_audio_buffer.append` (Realtime API),
    `session.input_audio.append` (GPT-Live), `session.input_audio_buffer.append` (translation).
    """

    #: Refuse the handshake with this HTTP status and an OpenAI JSON error body.
    refuse_status: int | None = None
    #: Accept TCP but never answer the HTTP upgrade; released (HTTP 503) only when the provider closes.
    stall_handshake: bool = False
    #: Abort the TCP connection (no close frame) right after the Nth append.
    drop_after_appends: int | None = None
    #: `(n, code, reason)`: close cleanly with that code and reason right after the Nth append.
    close_after_appends: tuple[int, int, str] | None = None
    #: Slow reader: sleep this long before each receive.
    read_delay_s: float = 0.0
    #: Benchmark mode: answer every append with a transcription delta whose `delta` is the append's
    #: `event_id` (or, when it has none, its 0-based append index as a string): the Realtime API's
    #: `conversation.item.input_audio_transcription.delta`, the others' `session.input_transcript.delta`.
    reply_each_append: bool = False
    #: GPT-Live: send `session.usage.updated` (cumulative seconds on the provider's clock) after every Nth
    #: append. `FakeProvider.report_usage()` sends it on demand.
    usage_every_appends: int | None = None
    #: Behave like OpenAI itself: refuse `?model=` on an `intent=transcription` session (400 invalid_model).
    #: Off by default, since an OpenAI-compatible server (which this fake stands for) keeps `?model=`.
    reject_model_on_transcription: bool = False
    #: Keep every client event in `FakeSession.events` (benchmarks turn it off to keep memory flat).
    record_events: bool = True
    #: Report a commit's duration as its bytes at the format in force at the commit, instead of each append
    #: at the format in force when it arrived (a provider whose count differs from the sidecar's).
    duration_at_commit_format: bool = False
    #: Realtime API: keep each response in progress: `response.create` gets only `response.created`, and its
    #: `response.done` (status `cancelled`, with the fixed usage) comes when the client sends `response.cancel`.
    hold_responses: bool = False
    #: Realtime API: never answer `response.cancel` (a provider that does not finish what a walk-out cancels).
    ignore_cancel: bool = False
    #: Realtime API: answer `response.cancel` by closing cleanly with this `(code, reason)`, no response.done.
    close_on_cancel: tuple[int, str] | None = None


@dataclass
class Handshake:
    """One opening handshake as received, recorded before any check. Header names are lower-cased."""

    path: str
    query: dict[str, str]
    headers: dict[str, str]


@dataclass
class FakeSession:
    """What the provider saw on one upgraded connection."""

    handshake: Handshake
    #: Every client event received, parsed (JSON objects only; malformed frames are not recorded).
    events: list[Event] = field(default_factory=list)
    #: Decoded bytes of all valid appends (`input_audio_buffer.append`, or the protocol's own append).
    audio_bytes: int = 0
    #: Seconds of audio decoded, as a real provider decodes it: each append at the input format in force
    #: when it arrived, PCM at 24 kHz whatever rate the session declares (GPT-Live: at its startup format;
    #: translation: always 24 kHz PCM16).
    audio_seconds: Fraction = Fraction(0)
    #: Binary frames received (the Realtime API defines none; each is answered with an error).
    binary_frames: int = 0
    #: The current session config (after every `session.update` / `transcription_session.update`).
    session: dict[str, Any] = field(default_factory=dict)
    #: Set when the connection has ended, after `close_code` is final.
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    #: The close code in the close frame the client sent (its echo when the provider closed first);
    #: None when no close frame arrived (abort, drop).
    close_code: int | None = None
    #: The protocol spoken: "realtime", "live" (GPT-Live) or "translation".
    protocol: str = "realtime"
    #: GPT-Live: every cumulative `usage.seconds` the provider reported (`session.usage.updated`, then
    #: `session.closed`), in order. Whole seconds on the provider's clock, each started second counted.
    reported_seconds: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Reply:
    """What one client frame produces: events to send, then at most one action."""

    events: list[Event]
    drop: bool = False
    close: tuple[int, str] | None = None


_RUN: Final = uuid.uuid4().hex[:12]
_COUNTER = itertools.count(1)


def new_id(prefix: str) -> str:
    """A unique id in OpenAI's style, e.g. `event_3f2a..._17`: a per-process prefix and a counter.

    (A uuid4 per id costs a getrandom call per event, a visible share of the fake's CPU in `make bench`.)
    """
    return f"{prefix}_{_RUN}{next(_COUNTER)}"


def event(type_: str, **fields: Any) -> Event:
    """A server event with a fresh unique `event_id`."""
    return {"type": type_, "event_id": new_id("event"), **fields}


def error(code: str, message: str, *, client_event_id: Any = None) -> Event:
    """An `error` server event, type `invalid_request_error`."""
    detail = {"type": "invalid_request_error", "code": code, "message": message, "param": None}
    return event("error", error={**detail, "event_id": client_event_id})


def appended_bytes(audio: object) -> int | None:
    """How many bytes an append's base64 `audio` decodes to; None when it is not valid base64 text."""
    if not isinstance(audio, str):
        return None
    try:
        return len(base64.b64decode(audio, validate=True))
    except (binascii.Error, ValueError):
        return None


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    """Merge `update` into `base` in place: dicts merge recursively, anything else replaces."""
    for key, value in update.items():
        current = base.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            deep_merge(current, value)
        else:
            base[key] = value


def append_faults(events: list[Event], faults: Faults, appends: int) -> Reply:
    """`events`, then a drop or a close when the `appends`-th append reaches the configured count."""
    if faults.drop_after_appends is not None and appends >= faults.drop_after_appends:
        return Reply(events, drop=True)
    if faults.close_after_appends is not None and appends >= faults.close_after_appends[0]:
        _, code, reason = faults.close_after_appends
        return Reply(events, close=(code, reason))
    return Reply(events)


def word_chunks(text: str, *, size: int = WORDS_PER_DELTA) -> list[str]:
    """`text` in chunks of `size` words; the chunks concatenate back to `text` exactly."""
    words = text.split(" ")
    chunks = [" ".join(words[i : i + size]) for i in range(0, len(words), size)]
    return [chunk + " " for chunk in chunks[:-1]] + chunks[-1:]


class Conversation(Protocol):
    """One upgraded connection's protocol state (sans-I/O): the server's opening events, then one Reply per
    client frame. `now` is the provider's clock in seconds (FakeProvider's injected clock)."""

    record: FakeSession

    def opening(self, *, now: float) -> list[Event]:
        """The events sent as soon as the connection is upgraded."""
        ...

    def receive(self, message: str | bytes, faults: Faults, *, now: float) -> Reply:
        """Handle one client frame; never raises on bad input (it becomes an `error` event)."""
        ...
