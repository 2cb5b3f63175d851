"""WebSocket data frames on the relay's hot path, split and built without websockets' generator parser.

Every audio chunk crosses the relay as two data frames each way, and websockets' sans-I/O parser (a chain
of generators, a `Frame` object and an event list per frame) was the largest share of the relay's own
Python time after the system calls. RFC 6455 section 5.2 is simple for the frames that matter:

- `FrameSplitter` cuts a byte stream into complete frames. A final, unfragmented text or binary frame with
  no reserved bits, masked as the side requires, within the size limit, comes out as its (unmasked)
  payload. Any other complete frame (ping, pong, close, a fragment, reserved bits, a wrongly masked
  frame) comes out as its raw bytes, for websockets' sans-I/O protocol to handle: it keeps owning the
  connection's state, the closing handshake, pings and protocol errors. A frame over the size limit ends
  the fast path for good: the rest of the stream goes to websockets, which fails the connection (1009).
  While a fragmented message is open (a non-final text or binary frame went to websockets, and its final
  continuation frame has not), final data frames are handed over raw as well: RFC 6455 section 5.4 allows
  only control frames between fragments, and websockets fails the connection with 1002.
- `frame` builds one final text or binary frame, masked with a given key on the client side.

Pure: no I/O, no clock. Unmasking and masking use websockets' C `apply_mask`.
"""

from __future__ import annotations

import struct
from typing import Any, Final

from websockets.speedups import apply_mask

TEXT: Final = 1
BINARY: Final = 2
RAW: Final = 0  # a complete frame for websockets, as its bytes
REST: Final = -1  # everything from here on, for websockets (the fast path has ended)

_FIN_TEXT: Final = 0x81
_FIN_BINARY: Final = 0x82
_MASK_BIT: Final = 0x80
_FIN_BIT: Final = 0x80
_OPCODE: Final = 0x0F
_FAST: Final = (_FIN_TEXT, _FIN_BINARY)  # first bytes of the frames the fast path takes, no message open
_NONE: Final = ()  # ... while a fragmented message is open


class FrameSplitter:
    """Complete frames out of a byte stream, for one direction of one connection.

    `masked`: frames must carry a mask (what a server receives); `max_size`: the largest payload.
    """

    __slots__ = ("_fast", "_pending", "done", "masked", "max_size")

    def __init__(self, *, masked: bool, max_size: int | None) -> None:
        self.masked = masked
        self.max_size = max_size
        self._pending = b""
        self._fast: tuple[int, ...] = _FAST  # _NONE while a fragmented message is open
        self.done = False  # the fast path has ended: feed() returns everything as REST

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._pending)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The complete frames in what was held back + `data`: (TEXT|BINARY, payload), (RAW, frame), (REST, bytes)."""
        if self.done:
            return [(REST, data)]
        buf = self._pending + data if self._pending else data
        view = memoryview(buf)
        size = len(buf)
        out: list[tuple[int, bytes]] = []
        pos = 0
        masked, max_size, fast = self.masked, self.max_size, self._fast
        while size - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            length = second & 0x7F
            head = pos + 2
            if length == 126:
                if size - head < 2:
                    break
                length = int.from_bytes(view[head : head + 2], "big")
                head += 2
            elif length == 127:
                if size - head < 8:
                    break
                length = int.from_bytes(view[head : head + 8], "big")
                head += 8
            if max_size is not None and length > max_size:
                self.done = True
                out.append((REST, bytes(view[pos:])))
                self._pending = b""
                return out
            has_mask = second & _MASK_BIT
            start = head + 4 if has_mask else head
            end = start + length
            if end > size:
                break
            if first in fast and bool(has_mask) == masked:
                # apply_mask (C) takes any buffer, though its stub says bytes: no copy before unmasking.
                unmask: Any = apply_mask
                payload = unmask(view[start:end], view[head:start]) if has_mask else bytes(view[start:end])
                out.append((TEXT if first == _FIN_TEXT else BINARY, payload))
            else:
                out.append((RAW, bytes(view[pos:end])))
                opcode = first & _OPCODE
                if opcode == 0 and first & _FIN_BIT:  # the final continuation frame closes the message
                    fast = self._fast = _FAST
                elif 0 < opcode < 3 and not first & _FIN_BIT:  # a text or binary frame opens one
                    fast = self._fast = _NONE
            pos = end
        view.release()
        self._pending = buf[pos:] if pos < size else b""
        return out


_HEAD16: Final = struct.Struct("!BBH").pack
_HEAD64: Final = struct.Struct("!BBQ").pack


def frame(payload: bytes, *, text: bool, mask: bytes | None = None) -> bytes:
    """One final, unfragmented data frame; masked with the 4-byte `mask` when given (a client's frame)."""
    first = _FIN_TEXT if text else _FIN_BINARY
    length = len(payload)
    bit = 0 if mask is None else _MASK_BIT
    if length < 126:
        head = bytes((first, bit | length))
    elif length < 65536:
        head = _HEAD16(first, bit | 126, length)
    else:
        head = _HEAD64(first, bit | 127, length)
    if mask is None:
        return head + payload
    return b"".join((head, mask, apply_mask(payload, mask)))
