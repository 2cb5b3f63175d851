"""The hot-path frame splitter and builder (sidecar/wsframes.py) agree with websockets' own frames."""

from __future__ import annotations

import itertools
import os

from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_TEXT, Close, Frame
from websockets.streams import StreamReader

from sidecar.wsframes import BINARY, RAW, REST, TEXT, FrameSplitter, frame


def _wire(f: Frame, *, mask: bool) -> bytes:
    return f.serialize(mask=mask)


def _parse(data: bytes, *, mask: bool) -> Frame:
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=mask)
    try:
        next(parser)
    except StopIteration as done:
        parsed: Frame = done.value
        return parsed
    raise AssertionError("incomplete frame")


_frames = st.one_of(
    st.builds(lambda d: Frame(OP_TEXT, d), st.text(max_size=300).map(str.encode)),
    st.builds(lambda d: Frame(OP_BINARY, d), st.binary(max_size=70_000)),
    st.builds(lambda d: Frame(OP_PING, d), st.binary(max_size=125)),
    st.builds(lambda d: Frame(OP_TEXT, d, fin=False), st.binary(max_size=50)),
    st.builds(lambda d: Frame(OP_CONT, d), st.binary(max_size=50)),
    st.just(Frame(OP_CLOSE, Close(1000, "bye").serialize())),
)


@given(frames=st.lists(_frames, max_size=8), cuts=st.lists(st.integers(min_value=0), max_size=6), masked=st.booleans())
def test_splitting_any_chunking_matches_the_frames_sent(frames: list[Frame], cuts: list[int], masked: bool) -> None:
    """However the stream is cut, final data frames outside a fragmented message come out as payloads and every
    other frame as its exact bytes."""
    wires = [_wire(f, mask=masked) for f in frames]
    stream = b"".join(wires)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    splitter = FrameSplitter(masked=masked, max_size=None)
    out = []
    for a, b in itertools.pairwise(points):
        out += splitter.feed(stream[a:b])
    assert splitter.pending == 0
    assert len(out) == len(frames)
    fragmented = False  # RFC 6455 5.4: a non-final text/binary frame opens a message, a final continuation ends it
    for (kind, payload), sent, wire in zip(out, frames, wires, strict=True):
        fast = sent.fin and sent.opcode in (OP_TEXT, OP_BINARY) and not fragmented
        if sent.opcode in (OP_TEXT, OP_BINARY) and not sent.fin:
            fragmented = True
        elif sent.opcode is OP_CONT and sent.fin:
            fragmented = False
        if fast:
            assert kind == (TEXT if sent.opcode is OP_TEXT else BINARY)
            assert payload == sent.data
        else:
            assert kind == RAW
            assert payload == wire


def test_a_frame_masked_the_wrong_way_is_left_to_websockets() -> None:
    """An unmasked frame where masks are required (and the reverse) is handed over raw, for websockets to refuse."""
    unmasked = _wire(Frame(OP_TEXT, b"hi"), mask=False)
    assert FrameSplitter(masked=True, max_size=None).feed(unmasked) == [(RAW, unmasked)]
    masked = _wire(Frame(OP_TEXT, b"hi"), mask=True)
    assert FrameSplitter(masked=False, max_size=None).feed(masked) == [(RAW, masked)]


def test_an_oversized_frame_ends_the_fast_path_for_good() -> None:
    """Past max_size the rest of the stream, and all that follows, goes to websockets (which fails with 1009)."""
    small = _wire(Frame(OP_TEXT, b"ok"), mask=True)
    big = _wire(Frame(OP_BINARY, b"x" * 2000), mask=True)
    splitter = FrameSplitter(masked=True, max_size=1000)
    assert splitter.feed(small + big[:10]) == [(TEXT, b"ok"), (REST, big[:10])]
    assert splitter.feed(big[10:]) == [(REST, big[10:])]
    assert splitter.done


@given(payload=st.binary(max_size=70_000), text=st.booleans(), client=st.booleans())
def test_built_frames_parse_back_with_websockets(payload: bytes, text: bool, client: bool) -> None:
    """`frame` builds what websockets parses back: the same opcode and payload, masked on the client side."""
    mask = os.urandom(4) if client else None
    parsed = _parse(frame(payload, text=text, mask=mask), mask=client)
    assert parsed.opcode is (OP_TEXT if text else OP_BINARY)
    assert parsed.fin
    assert parsed.data == payload


def test_a_data_frame_inside_a_fragmented_message_is_left_to_websockets() -> None:
    """Between a non-final data frame and its final continuation, a final data frame is handed over raw (RFC 6455
    5.4: websockets then fails the connection with 1002); after the message ends the fast path takes data again."""
    opening = _wire(Frame(OP_TEXT, b"he", fin=False), mask=True)
    ping = _wire(Frame(OP_PING, b""), mask=True)
    intruder = _wire(Frame(OP_BINARY, b"x"), mask=True)
    middle = _wire(Frame(OP_CONT, b"l", fin=False), mask=True)
    ending = _wire(Frame(OP_CONT, b"lo"), mask=True)
    after = _wire(Frame(OP_TEXT, b"ok"), mask=True)
    splitter = FrameSplitter(masked=True, max_size=None)
    assert splitter.feed(opening + ping) == [(RAW, opening), (RAW, ping)]
    assert splitter.feed(intruder) == [(RAW, intruder)]
    assert splitter.feed(middle + ending + after) == [(RAW, middle), (RAW, ending), (TEXT, b"ok")]
