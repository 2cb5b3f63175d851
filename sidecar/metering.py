"""Metering: base64 audio -> bytes -> seconds -> quantity -> Decimal cost.

docs/api.md, "Metering and billing".

Pure arithmetic: no I/O, no clock, no logging. The relay calls `SessionMeter.on_append` for every client
`input_audio_buffer.append`, so that path only validates the base64 text and adds an integer; decoded audio
is never produced or kept. Everything exact is done with integers and Fractions; money is Decimal, never
float.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation, Overflow
from fractions import Fraction
from math import ceil, floor
from types import MappingProxyType
from typing import Any, Final, Literal

import orjson

from sidecar.audio_formats import DEFAULT_BYTES_PER_SECOND
from sidecar.pricing import Price

Rounding = Literal["exact", "up", "nearest"]
ROUNDINGS: Final = ("exact", "up", "nearest")

_B64_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_PAD: Final = 0x3D  # "="
_SECONDS_PLACES: Final = 6  # microseconds: 24 kHz samples are 41.67 us apart
_MINUTES_PLACES: Final = 8
_COST_QUANTUM: Final = Decimal("1e-10")
# 100 significant digits: counts times prices (at most ~40 digits in practice) stay exact, so the only
# rounding is the final quantize. Passed explicitly so no task's ambient context can change a bill.
_CTX: Final = Context(prec=100, rounding=ROUND_HALF_EVEN, traps=[InvalidOperation, Overflow])
_ZERO: Final = Decimal(0)
_HALF: Final = Fraction(1, 2)
_SIXTY: Final = Decimal(60)
_EMPTY: Final[Mapping[str, Any]] = MappingProxyType({})


def decoded_length(b64: str | bytes) -> int | None:
    """The number of bytes that standard, padded base64 (RFC 4648 section 4) decodes to; None if invalid.

    Valid means: only the 64 alphabet characters, length a multiple of 4, and at most two `=` and only at
    the end. No whitespace, no URL-safe alphabet. Non-zero trailing bits (`QR==`) are accepted, as
    `base64.b64decode` accepts them. The empty string is 0. Anything not str/bytes is None. Never raises.

    Nothing is decoded: one C pass deletes the alphabet and what is left must be exactly the padding.
    Measured 2.5-4x faster than `binascii.a2b_base64(strict_mode=True)` on 20-100 ms chunks; that
    function also lets `QUJD====` through.
    """
    if isinstance(b64, str):
        if not b64.isascii():  # O(1) for str
            return None
        data = b64.encode("ascii")
    elif isinstance(b64, bytes | bytearray):
        data = b64
    else:
        return None
    n = len(data)
    if n & 3:
        return None
    if n == 0:
        return 0
    pad = (2 if data[-2] == _PAD else 1) if data[-1] == _PAD else 0
    # `rest` is every non-alphabet byte; valid only when those are exactly the trailing padding.
    rest = data.translate(None, _B64_ALPHABET)
    if len(rest) != pad:
        return None
    return (n >> 2) * 3 - pad


@dataclass(frozen=True, slots=True)
class Figures:
    """A session's cumulative figures for one usage event (the usage event's metering fields).

    `unit` is the price unit; `quantity` is in that unit (seconds, minutes or tokens) after the rounding
    policy; `audio_seconds` is exact to the microsecond (half-even) and never rounded by policy;
    `cost_usd` is quantized to 10 decimal places; `upstream_usage` is compact JSON or "".
    """

    unit: str
    quantity: Decimal
    audio_seconds: Decimal
    audio_bytes: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal
    upstream_usage: str


class _Segment:
    """Audio appended after one client session update that the provider has not answered yet."""

    __slots__ = ("bytes", "ref", "requested")

    def __init__(self, ref: str, requested: int | None) -> None:
        self.ref = ref
        self.requested = requested  # bytes per second the update asks for; None: it names no format
        self.bytes = 0


class SessionMeter:
    """Meters one relayed session. Not thread-safe; one per session, driven by its relay task.

    Audio is counted as integer bytes per bytes-per-second bucket, so format changes mid-session are
    exact. A format takes effect for metering only when the provider confirms it (docs/billing.md): audio
    appended after a client's session update and before the provider's answer to it waits in a segment,
    counted meanwhile at the lowest byte rate it could be at (the most seconds), and settled at the format
    the provider's `session.updated` names (or at the format before, when the provider refuses the update).
    Tokens come from `response.done` usage and add up. Upstream-reported transcription usage is recorded
    beside the figures; on a time-billed session the larger of the metered and the reported seconds is
    billed, and on a conversation session the transcription usage is billed at the transcription model's
    price (`on_transcription_usage`).
    """

    __slots__ = (
        "_audio_in",
        "_audio_out",
        "_bps",
        "_cached_audio",
        "_cached_text",
        "_current",
        "_increment",
        "_open",
        "_price",
        "_rounding",
        "_settled",
        "_settled_bytes",
        "_text_in",
        "_text_out",
        "_transcription_cost",
        "_transcription_unpriced",
        "_up_events",
        "_up_seconds",
        "_up_tokens",
    )

    def __init__(self, price: Price, *, rounding: Rounding = "exact", increment: Decimal = Decimal(1)) -> None:
        """Start an empty meter at the default format (audio/pcm, 48000 bytes/s).

        `rounding` and `increment` apply to time units only: "exact" keeps 6 decimals of seconds or 8 of
        minutes (half-even), "up" bills whole multiples of `increment` units rounded up, "nearest" rounds
        half-up to a multiple of `increment`. Raises ValueError for an unknown rounding or an increment
        that is not a finite positive Decimal.
        """
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        if not isinstance(increment, Decimal) or not increment.is_finite() or increment <= 0:
            raise ValueError(f"increment must be a finite positive Decimal, got {increment!r}")
        self._price = price
        self._rounding: Rounding = rounding
        self._increment = increment
        self._bps = DEFAULT_BYTES_PER_SECOND  # the confirmed format in force
        self._current = 0  # bytes at `_bps`, appended while no update awaited its answer
        self._open: deque[_Segment] = deque()  # updates the provider has not answered, oldest first
        self._settled: dict[int, int] = {}  # bytes per second -> bytes, for formats no longer in force
        self._settled_bytes = 0
        self._text_in = 0  # input tokens not counted as audio (text, and image when present)
        self._audio_in = 0
        self._cached_text = 0
        self._cached_audio = 0
        self._text_out = 0
        self._audio_out = 0
        self._up_events = 0
        self._up_seconds: Decimal | None = None  # None until a duration usage arrives
        self._up_tokens: dict[str, Any] = {}
        self._transcription_cost = _ZERO
        self._transcription_unpriced = 0  # transcription usages the transcription model's price could not price

    @property
    def rounding(self) -> Rounding:
        """The rounding policy of time units (for cores that bill time themselves with `bill_time`)."""
        return self._rounding

    @property
    def increment(self) -> Decimal:
        """The rounding increment of time units."""
        return self._increment

    # --- audio: the hot path -------------------------------------------------------------------------

    def on_append(self, audio_b64: str | bytes) -> bool:
        """Meter one `input_audio_buffer.append` audio field.

        Returns False, and bills nothing, when the text is not valid base64 (see `decoded_length`).
        """
        n = decoded_length(audio_b64)
        if n is None:
            return False
        if self._open:
            self._open[-1].bytes += n
        else:
            self._current += n
        return True

    @property
    def audio_bytes(self) -> int:
        """Decoded audio bytes metered so far, all formats."""
        return self._settled_bytes + self._current + sum(segment.bytes for segment in self._open)

    # --- formats: session updates and the provider's answers -----------------------------------------

    def on_update(self, ref: str, requested: int | None) -> None:
        """A client session update (event id `ref`) goes to the provider; `requested` is the bytes per second
        it asks for (`audio_formats.requested`), None when it names no format. Appends after it wait for the
        provider's answer."""
        if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested <= 0):
            raise ValueError(f"bytes per second must be a positive int, got {requested!r}")
        self._open.append(_Segment(ref, requested))

    def on_updated(self, confirmed: int | None) -> None:
        """The provider's `session.updated` (or `session.created`): the format in force, by
        `audio_formats.confirmed`, None when it names none. Answers the oldest waiting update, in order."""
        segment = self._open.popleft() if self._open else None
        if confirmed is None:
            requested = segment.requested if segment is not None else None
            confirmed = min(self._bps, requested) if requested is not None else self._bps
        self._settle()
        self._bps = confirmed
        if segment is not None:
            self._current = segment.bytes

    def on_update_refused(self, ref: object) -> None:
        """The provider answered the client update `ref` with an `error`: it changed nothing, so the audio
        appended after it is at the format before it. An unknown `ref` changes nothing."""
        index = next((i for i, segment in enumerate(self._open) if segment.ref == ref), None)
        if index is None:
            return
        segment = self._open[index]
        del self._open[index]
        if index:
            self._open[index - 1].bytes += segment.bytes
        else:
            self._current += segment.bytes

    def _settle(self) -> None:
        if self._current:
            self._settled[self._bps] = self._settled.get(self._bps, 0) + self._current
            self._settled_bytes += self._current
            self._current = 0

    # --- tokens and upstream usage -------------------------------------------------------------------

    def on_response_done(self, usage: Mapping[str, Any]) -> None:
        """Add one `response.done` `response.usage` to the session's tokens.

        Input is split into text, audio and cached (text/audio) by `input_token_details`; without details
        everything is text. Input tokens that are neither audio nor cached audio (text, image) are priced
        as text. Without `cached_tokens_details`, cached tokens are taken from text first. Malformed or
        negative counts are treated as 0; nothing raises.
        """
        in_details = _mapping(usage.get("input_token_details"))
        audio_in = _count(in_details, "audio_tokens")
        total_in = _count(usage, "input_tokens", _count(in_details, "text_tokens") + audio_in)
        audio_in = min(audio_in, total_in)
        text_in = total_in - audio_in
        cached = min(_count(in_details, "cached_tokens"), total_in)
        cached_details = in_details.get("cached_tokens_details")
        if isinstance(cached_details, Mapping):
            cached_audio = _count(cached_details, "audio_tokens")
        else:
            cached_audio = cached - min(cached, text_in)
        cached_audio = min(cached_audio, audio_in, cached)
        cached_text = min(cached - cached_audio, text_in)

        out_details = _mapping(usage.get("output_token_details"))
        audio_out = _count(out_details, "audio_tokens")
        total_out = _count(usage, "output_tokens", _count(out_details, "text_tokens") + audio_out)
        audio_out = min(audio_out, total_out)

        self._text_in += text_in
        self._audio_in += audio_in
        self._cached_text += cached_text
        self._cached_audio += cached_audio
        self._text_out += total_out - audio_out
        self._audio_out += audio_out

    def on_upstream_usage(self, usage: Mapping[str, Any]) -> None:
        """Record the usage of one `conversation.item.input_audio_transcription.completed`.

        `{"type": "duration", "seconds": s}` adds s to the reported duration (billed when it exceeds the
        metered seconds of a time-billed session); `{"type": "tokens", ...}` adds
        every integer count (nested details too). Other or malformed usage is ignored; nothing raises.
        """
        kind = usage.get("type")
        if kind == "duration":
            value = _seconds_of(usage.get("seconds"))
            if value is None:
                return
            self._up_seconds = value if self._up_seconds is None else _CTX.add(self._up_seconds, value)
        elif kind == "tokens":
            _add_counts(self._up_tokens, usage)
        else:
            return
        self._up_events += 1

    def on_transcription_usage(self, usage: Mapping[str, Any], price: Price) -> None:
        """Bill the usage of one input-audio transcription on a conversation session at the transcription
        model's `price` (docs/billing.md): `tokens` usage at its token prices (audio input tokens at the
        audio price, else the text price), `duration` usage at its per-second (or per-minute) price. Call
        `on_upstream_usage` too, to record it. Usage the price cannot price is counted as unpriced, not
        guessed. Nothing raises."""
        kind = usage.get("type")
        cost: Decimal | None = None
        if kind == "tokens":
            cost = _token_cost(usage, price)
        elif kind == "duration":
            seconds = _seconds_of(usage.get("seconds"))
            cost = None if seconds is None else _time_cost(seconds, price)
        else:
            return
        if cost is None:
            self._transcription_unpriced += 1
        else:
            self._transcription_cost = _CTX.add(self._transcription_cost, cost)

    @property
    def reported_over_metered(self) -> bool:
        """True when the provider reported more transcribed seconds than the sidecar metered."""
        return self._up_seconds is not None and self._up_seconds > self._metered_seconds()

    @property
    def transcription_unpriced(self) -> int:
        """Transcription usages (conversation sessions) whose model's price had no field to price them."""
        return self._transcription_unpriced

    # --- figures -------------------------------------------------------------------------------------

    def snapshot(self) -> Figures:
        """The session's cumulative figures now."""
        metered = self._metered_seconds()
        quantity = self._quantity(self._billed_seconds(metered))
        return Figures(
            unit=self._price.unit,
            quantity=quantity,
            audio_seconds=_round_places(metered, _SECONDS_PLACES),
            audio_bytes=self.audio_bytes,
            input_tokens=self._text_in + self._audio_in,
            output_tokens=self._text_out + self._audio_out,
            cost_usd=self._cost(quantity),
            upstream_usage=self._upstream_json(),
        )

    def cost(self) -> Decimal:
        """The session's cost so far in USD, quantized to 10 places (what `snapshot().cost_usd` says)."""
        return self._cost(self._quantity(self._billed_seconds(self._metered_seconds())))

    def _metered_seconds(self) -> Fraction:
        """Seconds of the appended audio; a waiting segment at the lowest byte rate it could be at."""
        seconds = Fraction(self._current, self._bps)
        for bps, count in self._settled.items():
            seconds += Fraction(count, bps)
        lowest = self._bps
        for segment in self._open:
            if segment.requested is not None and segment.requested < lowest:
                lowest = segment.requested
            seconds += Fraction(segment.bytes, lowest)
        return seconds

    def _billed_seconds(self, metered: Fraction) -> Fraction:
        """The larger of the metered seconds and the provider's reported duration (docs/billing.md)."""
        reported = self._up_seconds
        if reported is not None and reported > metered:
            return Fraction(reported)
        return metered

    def _quantity(self, seconds: Fraction) -> Decimal:
        unit = self._price.unit
        if unit == "token":
            return Decimal(self._text_in + self._audio_in + self._text_out + self._audio_out)
        amount = seconds if unit == "second" else seconds / 60
        if self._rounding == "exact":
            return _round_places(amount, _SECONDS_PLACES if unit == "second" else _MINUTES_PLACES)
        steps = amount / Fraction(self._increment)
        whole = ceil(steps) if self._rounding == "up" else floor(steps + _HALF)
        return _CTX.multiply(Decimal(whole), self._increment)

    def _cost(self, quantity: Decimal) -> Decimal:
        price = self._price
        if price.unit != "token":
            total = _CTX.multiply(quantity, price.per_unit or _ZERO)
        else:
            text_in = price.input_token or _ZERO
            cached = price.cached_input_token if price.cached_input_token is not None else text_in
            audio_in = price.input_audio_token if price.input_audio_token is not None else text_in
            text_out = price.output_token or _ZERO
            audio_out = price.output_audio_token if price.output_audio_token is not None else text_out
            cached_audio = price.cached_input_audio_token if price.cached_input_audio_token is not None else cached
            terms = (
                (self._text_in - self._cached_text, text_in),
                (self._cached_text, cached),
                (self._cached_audio, cached_audio),
                (self._audio_in - self._cached_audio, audio_in),
                (self._text_out, text_out),
                (self._audio_out, audio_out),
            )
            total = _ZERO
            for count, unit_price in terms:
                total = _CTX.add(total, _CTX.multiply(Decimal(count), unit_price))
        total = _CTX.add(total, self._transcription_cost)
        return total.quantize(_COST_QUANTUM, rounding=ROUND_HALF_EVEN, context=_CTX)

    def _upstream_json(self) -> str:
        if not self._up_events:
            return ""
        record: dict[str, Any] = {}
        if self._up_seconds is not None:
            # A JSON number for reconciliation only: the exact Decimal sum, shown via its nearest float.
            integral = self._up_seconds == self._up_seconds.to_integral_value()
            record["duration_seconds"] = int(self._up_seconds) if integral else float(self._up_seconds)
        if self._up_tokens:
            record["tokens"] = self._up_tokens
        record["events"] = self._up_events
        if self._transcription_cost:
            record["transcription_cost_usd"] = _plain(self._transcription_cost.quantize(_COST_QUANTUM, context=_CTX))
        if self._transcription_unpriced:
            record["transcription_unpriced"] = self._transcription_unpriced
        return orjson.dumps(record).decode()


def bill_time(
    seconds: Fraction, price: Price, *, rounding: Rounding = "exact", increment: Decimal = Decimal(1)
) -> tuple[Decimal, Decimal]:
    """(quantity, cost_usd) of `seconds` at a time `price` (unit second or minute), by the same arithmetic and
    rounding policy as `SessionMeter` on a time-priced session: for meters that count time some other way
    (GPT-Live session seconds, sidecar/surfaces/live.py). An unpriced model costs 0.

    Raises ValueError for a token price or a bad rounding / increment (as `SessionMeter` does).
    """
    if price.unit == "token":
        raise ValueError("bill_time needs a time price (unit second or minute)")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if not isinstance(increment, Decimal) or not increment.is_finite() or increment <= 0:
        raise ValueError(f"increment must be a finite positive Decimal, got {increment!r}")
    amount = seconds if price.unit == "second" else seconds / 60
    if rounding == "exact":
        quantity = _round_places(amount, _SECONDS_PLACES if price.unit == "second" else _MINUTES_PLACES)
    else:
        steps = amount / Fraction(increment)
        whole = ceil(steps) if rounding == "up" else floor(steps + _HALF)
        quantity = _CTX.multiply(Decimal(whole), increment)
    cost = _CTX.multiply(quantity, price.per_unit or _ZERO)
    return quantity, cost.quantize(_COST_QUANTUM, rounding=ROUND_HALF_EVEN, context=_CTX)


def _round_places(value: Fraction, places: int) -> Decimal:
    """`value` rounded half-even to `places` decimals, exactly (no float, no double rounding)."""
    return Decimal(round(value * 10**places)).scaleb(-places, context=_CTX)


def _plain(value: Decimal) -> str:
    return format(value, "f")


def _seconds_of(value: object) -> Decimal | None:
    """A reported duration as an exact Decimal; None unless a finite non-negative number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    seconds = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    return seconds if seconds.is_finite() and seconds >= 0 else None


def _time_cost(seconds: Decimal, price: Price) -> Decimal | None:
    """`seconds` at a per-second price (or per-minute / 60); None when the price has neither."""
    if price.per_unit is None or price.unit == "token":
        return None
    amount = seconds if price.unit == "second" else _CTX.divide(seconds, _SIXTY)
    return _CTX.multiply(amount, price.per_unit)


def _token_cost(usage: Mapping[str, Any], price: Price) -> Decimal | None:
    """A transcription's `tokens` usage at `price`'s token prices; None when it has no input token price."""
    text_price = price.input_token
    audio_price = price.input_audio_token if price.input_audio_token is not None else text_price
    if audio_price is None or text_price is None:
        return None
    details = _mapping(usage.get("input_token_details"))
    audio = _count(details, "audio_tokens")
    total_in = _count(usage, "input_tokens", _count(details, "text_tokens") + audio)
    audio = min(audio, total_in)
    out = _count(usage, "output_tokens")
    total = _CTX.multiply(Decimal(audio), audio_price)
    total = _CTX.add(total, _CTX.multiply(Decimal(total_in - audio), text_price))
    return _CTX.add(total, _CTX.multiply(Decimal(out), price.output_token or text_price))


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else _EMPTY


def _count(usage: Mapping[str, Any], key: str, default: int = 0) -> int:
    """A token count from upstream JSON: a non-negative int, else `default` when absent, else 0."""
    value = usage.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0
    return value


def _add_counts(into: dict[str, Any], usage: Mapping[str, Any]) -> None:
    """Add every non-negative int of `usage` (recursing into nested objects) into `into`, key by key."""
    for key, value in usage.items():
        if isinstance(value, Mapping):
            nested = into.setdefault(key, {})
            if isinstance(nested, dict):
                _add_counts(nested, value)
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            previous = into.get(key, 0)
            if isinstance(previous, int):
                into[key] = previous + value
