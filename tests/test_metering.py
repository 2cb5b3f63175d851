"""Metering: formats, base64 lengths, exact audio seconds, rounding, token and time pricing."""

from __future__ import annotations

import base64
import itertools
import re
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.audio_formats import requested
from sidecar.metering import Figures, SessionMeter, decoded_length
from sidecar.pricing import Price

SPEECH_SECONDS = Decimal("6.667125")
WHISPER = Price(unit="second", per_unit=Decimal("0.000283333333333"))
# gpt-realtime's price-map figures, as the catalog turns them into Decimals.
GPT_REALTIME = Price(
    unit="token",
    input_token=Decimal("0.000004"),
    output_token=Decimal("0.000016"),
    input_audio_token=Decimal("0.000032"),
    output_audio_token=Decimal("0.000064"),
    cached_input_token=Decimal("4E-7"),
)
RESPONSE_USAGE: dict[str, Any] = {
    "total_tokens": 1500,
    "input_tokens": 1000,
    "output_tokens": 500,
    "input_token_details": {
        "text_tokens": 400,
        "audio_tokens": 600,
        "cached_tokens": 300,
        "cached_tokens_details": {"text_tokens": 100, "audio_tokens": 200},
    },
    "output_token_details": {"text_tokens": 100, "audio_tokens": 400},
}
# RFC 4648 section 4, padded: the reference for what decoded_length must accept.
STRICT_B64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
CHUNK_100MS_PCM16 = 4800
# No timing thresholds in tests; no example database written into the shared working tree.
PROPERTY = settings(deadline=None, database=None)


def b64(data: bytes) -> str:
    """Standard padded base64 text, as a client sends it."""
    return base64.b64encode(data).decode("ascii")


def stream(meter: SessionMeter, audio: bytes, chunk: int) -> None:
    """Append `audio` in `chunk`-byte pieces, each base64-encoded on its own, asserting each is accepted."""
    for start in range(0, len(audio), chunk):
        assert meter.on_append(b64(audio[start : start + chunk]))


# --- formats (audio_formats.py has the table; here: how the meter follows the provider's answers) -------


def switch(meter: SessionMeter, bps: int, ref: str = "evt_switch") -> None:
    """A client update to `bps`, and the provider's session.updated confirming it."""
    meter.on_update(ref, bps)
    meter.on_updated(bps)


def test_format_waits_for_the_provider_and_counts_the_most_seconds_meanwhile() -> None:
    """Audio after an update to mu-law counts at 8000 B/s until the answer, then at what the provider confirmed."""
    meter = SessionMeter(WHISPER)
    meter.on_update("evt_1", 8000)
    assert meter.on_append(b64(b"\x00" * 48000))
    assert meter.snapshot().audio_seconds == Decimal(6)  # unanswered: the lower byte rate, the most seconds
    meter.on_updated(48000)  # the provider kept PCM
    assert meter.snapshot().audio_seconds == Decimal(1)


def test_a_refused_update_leaves_its_audio_at_the_format_before() -> None:
    """The provider's error for an update (by its event id) settles the audio after it at the old format."""
    meter = SessionMeter(WHISPER)
    meter.on_update("evt_1", 8000)
    assert meter.on_append(b64(b"\x00" * 48000))
    meter.on_update_refused("evt_other")  # not this update: nothing changes
    assert meter.snapshot().audio_seconds == Decimal(6)
    meter.on_update_refused("evt_1")
    assert meter.snapshot().audio_seconds == Decimal(1)


def test_updates_are_answered_in_order() -> None:
    """Two updates in flight: each answer settles the audio after its own update, oldest first."""
    meter = SessionMeter(WHISPER)
    meter.on_update("evt_1", None)  # names no format
    assert meter.on_append(b64(b"\x00" * 48000))  # PCM: 1 s
    meter.on_update("evt_2", 8000)
    assert meter.on_append(b64(b"\x00" * 8000))  # mu-law: 1 s
    meter.on_updated(48000)  # answers evt_1
    meter.on_updated(8000)  # answers evt_2
    assert meter.snapshot().audio_seconds == Decimal(2)


def test_a_later_refused_update_joins_the_one_before() -> None:
    """A refused update that is not the oldest waiting one gives its audio to the update before it."""
    meter = SessionMeter(WHISPER)
    meter.on_update("evt_1", 8000)
    assert meter.on_append(b64(b"\x00" * 8000))
    meter.on_update("evt_2", 48000)
    assert meter.on_append(b64(b"\x00" * 8000))
    meter.on_update_refused("evt_2")
    meter.on_updated(8000)
    assert meter.snapshot().audio_seconds == Decimal(2)


def test_an_answer_naming_no_format_keeps_the_lower_rate() -> None:
    """A session.updated that names no format settles a format change at the lower byte rate."""
    meter = SessionMeter(WHISPER)
    meter.on_update("evt_1", 8000)
    meter.on_updated(None)
    assert meter.on_append(b64(b"\x00" * 8000))
    assert meter.snapshot().audio_seconds == Decimal(1)


# --- base64 ------------------------------------------------------------------------------------------


def test_decoded_length_of_empty_is_zero() -> None:
    """Empty audio decodes to zero bytes."""
    assert decoded_length("") == 0
    assert decoded_length(b"") == 0


@pytest.mark.parametrize(
    "text",
    [
        "QU@D",  # bad character
        "QUJD\n",  # whitespace
        "QU-_",  # URL-safe alphabet
        "QUJé",  # non-ASCII
        "QQ=",  # bad padding
        "QQ",  # missing padding
        "Q===",  # too much padding
        "QUJD====",  # a whole quad of padding (binascii strict mode lets this through)
        "=QQ=",  # leading padding
        "QU=I",  # padding inside
        "QQ==QQ==",  # data after padding
        "QUJDQ",  # wrong length
        "QUJDQUI",  # wrong length
    ],
)
def test_invalid_base64_is_not_billed(text: str) -> None:
    """Invalid base64 returns False from on_append and bills nothing."""
    meter = SessionMeter(WHISPER)
    assert meter.on_append(b64(b"\x00" * 480))
    before = meter.snapshot()
    assert decoded_length(text) is None
    assert decoded_length(text.encode("utf-8")) is None
    assert meter.on_append(text) is False
    assert meter.snapshot() == before


def test_decoded_length_of_non_text_is_none() -> None:
    """Something that is not str or bytes is invalid, not an exception."""
    assert decoded_length(None) is None  # type: ignore[arg-type]
    assert decoded_length(1234) is None  # type: ignore[arg-type]


@PROPERTY
@given(st.binary(max_size=2000))
def test_decoded_length_matches_b64decode(data: bytes) -> None:
    """For valid base64, decoded_length equals len(base64.b64decode) for str and bytes input."""
    text = b64(data)
    assert decoded_length(text) == len(base64.b64decode(text)) == len(data)
    assert decoded_length(text.encode("ascii")) == len(data)


@PROPERTY
@given(st.text(alphabet="AQgw+/=@-_ \n\u00e9", max_size=16))
def test_decoded_length_agrees_with_the_rfc_grammar(text: str) -> None:
    """On arbitrary text, decoded_length accepts exactly RFC 4648 padded base64, with b64decode's length."""
    expected = len(base64.b64decode(text)) if STRICT_B64.fullmatch(text) else None
    assert decoded_length(text) == expected


# --- audio seconds -----------------------------------------------------------------------------------


def test_speech_pcm16_in_100ms_chunks_is_exact(speech_pcm16: bytes) -> None:
    """The shared PCM16 speech streamed in 100 ms chunks bills exactly 6.667125 s."""
    meter = SessionMeter(WHISPER)
    stream(meter, speech_pcm16, CHUNK_100MS_PCM16)
    figures = meter.snapshot()
    assert figures.audio_bytes == meter.audio_bytes == 320022
    assert figures.audio_seconds == SPEECH_SECONDS
    assert str(figures.audio_seconds) == "6.667125"


def test_speech_ulaw_is_exact(speech_ulaw: bytes) -> None:
    """The shared mu-law speech at the beta g711_ulaw format bills exactly 6.667125 s."""
    meter = SessionMeter(WHISPER)
    rate = requested({"input_audio_format": "g711_ulaw"})
    assert rate == 8000
    switch(meter, rate)
    stream(meter, speech_ulaw, 800)
    assert meter.snapshot().audio_seconds == SPEECH_SECONDS
    assert meter.audio_bytes == 53337


def test_format_change_mid_session(speech_pcm16: bytes, speech_ulaw: bytes) -> None:
    """Each append is metered at the format in force when it arrived, across several changes."""
    meter = SessionMeter(WHISPER)
    stream(meter, speech_pcm16[:96000], CHUNK_100MS_PCM16)  # 2 s at 48000 B/s
    switch(meter, requested({"audio": {"input": {"format": {"type": "audio/pcmu"}}}}) or 0)
    stream(meter, speech_ulaw, 800)  # 6.667125 s at 8000 B/s
    switch(meter, 48000)
    stream(meter, speech_pcm16[:24000], CHUNK_100MS_PCM16)  # 0.5 s more at 48000 B/s
    switch(meter, 8000)  # a change with nothing appended after it bills nothing
    figures = meter.snapshot()
    assert figures.audio_bytes == 96000 + 53337 + 24000
    assert figures.audio_seconds == Decimal("9.167125")


def test_audio_seconds_round_half_even_to_microseconds() -> None:
    """Seconds are exact fractions rounded half-even to 6 places: 3 B = 62.5 us -> 62, 9 B = 187.5 -> 188."""
    three, nine = SessionMeter(WHISPER), SessionMeter(WHISPER)
    assert three.on_append(b64(b"abc"))
    assert nine.on_append(b64(b"abcdefghi"))
    assert three.snapshot().audio_seconds == Decimal("0.000062")
    assert nine.snapshot().audio_seconds == Decimal("0.000188")


def test_empty_meter_is_all_zero() -> None:
    """A session with no audio and no usage has zero figures and no upstream usage."""
    figures = SessionMeter(WHISPER).snapshot()
    assert figures == Figures(
        unit="second",
        quantity=Decimal(0),
        audio_seconds=Decimal(0),
        audio_bytes=0,
        input_tokens=0,
        output_tokens=0,
        cost_usd=Decimal(0),
        upstream_usage="",
    )


# The fixture is read-only bytes, so sharing it across examples is safe.
@settings(PROPERTY, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(min_value=0, max_value=320022), max_size=40))
def test_any_chunking_of_the_speech_bills_the_same(speech_pcm16: bytes, cuts: list[int]) -> None:
    """Splitting the shared speech at any points, each chunk encoded on its own, bills the same total."""
    meter = SessionMeter(WHISPER)
    bounds = [0, *sorted(cuts), len(speech_pcm16)]
    for start, end in itertools.pairwise(bounds):
        assert meter.on_append(b64(speech_pcm16[start:end]))
    figures = meter.snapshot()
    assert figures.audio_bytes == 320022
    assert figures.audio_seconds == SPEECH_SECONDS
    assert figures.cost_usd == Decimal("0.0018890187")


@PROPERTY
@given(
    audio=st.binary(max_size=3000),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=20),
    rate=st.sampled_from([48000, 8000, 32000]),
)
def test_any_chunking_of_any_audio_bills_the_same(audio: bytes, cuts: list[int], rate: int) -> None:
    """Any audio at any format, split anywhere, has the same figures as one append of all of it."""
    whole, pieces = SessionMeter(WHISPER, rounding="up"), SessionMeter(WHISPER, rounding="up")
    switch(whole, rate)
    switch(pieces, rate)
    assert whole.on_append(b64(audio))
    bounds = [0, *sorted(c for c in cuts if c <= len(audio)), len(audio)]
    for start, end in itertools.pairwise(bounds):
        assert pieces.on_append(b64(audio[start:end]))
    assert pieces.snapshot() == whole.snapshot()


def test_meter_keeps_no_audio() -> None:
    """The meter has fixed slots (no per-instance dict) and holds only counts, never audio."""
    meter = SessionMeter(WHISPER)
    assert meter.on_append(b64(b"\x01" * 4800))
    assert not hasattr(meter, "__dict__")
    held = [getattr(meter, name) for name in SessionMeter.__slots__]
    assert not any(isinstance(value, bytes | bytearray | memoryview) for value in held)


# --- time pricing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rounding", "increment", "quantity", "cost"),
    [
        ("exact", Decimal(1), Decimal("6.667125"), Decimal("0.0018890187")),  # 0.001889018749997777625
        ("up", Decimal(1), Decimal(7), Decimal("0.0019833333")),  # 0.001983333333331
        ("nearest", Decimal(1), Decimal(7), Decimal("0.0019833333")),
        ("up", Decimal("0.5"), Decimal("7.0"), Decimal("0.0019833333")),
        ("nearest", Decimal("0.5"), Decimal("6.5"), Decimal("0.0018416667")),  # 0.0018416666666645
        ("up", Decimal("0.1"), Decimal("6.7"), Decimal("0.0018983333")),  # 0.0018983333333311
    ],
)
def test_whisper_cost_per_second(
    speech_pcm16: bytes, rounding: Any, increment: Decimal, quantity: Decimal, cost: Decimal
) -> None:
    """gpt-realtime-whisper bills the speech per second at each rounding policy, to the hand-computed cent."""
    meter = SessionMeter(WHISPER, rounding=rounding, increment=increment)
    stream(meter, speech_pcm16, CHUNK_100MS_PCM16)
    figures = meter.snapshot()
    assert figures.unit == "second"
    assert figures.quantity == quantity
    assert figures.audio_seconds == SPEECH_SECONDS  # the policy never touches audio seconds
    assert isinstance(figures.cost_usd, Decimal)
    assert figures.cost_usd == meter.cost() == cost
    assert figures.cost_usd.as_tuple().exponent == -10


def test_nearest_rounds_half_up() -> None:
    """ "nearest" rounds an exact half up: 2.5 s bills 3 s."""
    meter = SessionMeter(WHISPER, rounding="nearest")
    assert meter.on_append(b64(b"\x00" * 120000))
    assert meter.snapshot().quantity == Decimal(3)


def test_minute_unit(speech_pcm16: bytes) -> None:
    """A per-minute price bills seconds / 60: exact to 8 places, or whole minutes rounded up."""
    price = Price(unit="minute", per_unit=Decimal("0.006"))
    exact, up = SessionMeter(price), SessionMeter(price, rounding="up")
    stream(exact, speech_pcm16, CHUNK_100MS_PCM16)
    stream(up, speech_pcm16, CHUNK_100MS_PCM16)
    assert exact.snapshot().quantity == Decimal("0.11111875")  # 6.667125 / 60
    assert exact.cost() == Decimal("0.0006667125")
    assert up.snapshot().quantity == Decimal(1)
    assert up.cost() == Decimal("0.0060000000")


def test_missing_price_counts_as_zero(speech_pcm16: bytes) -> None:
    """A model without a per-unit price meters audio but costs nothing."""
    meter = SessionMeter(Price(unit="second"))
    stream(meter, speech_pcm16, CHUNK_100MS_PCM16)
    assert meter.snapshot().audio_seconds == SPEECH_SECONDS
    assert meter.cost() == Decimal(0)


@pytest.mark.parametrize(
    "options",
    [
        {"rounding": "down"},
        {"increment": Decimal(0)},
        {"increment": Decimal("-1")},
        {"increment": Decimal("NaN")},
    ],
)
def test_bad_options_are_refused(options: dict[str, Any]) -> None:
    """An unknown rounding or a non-positive increment raises ValueError."""
    with pytest.raises(ValueError):
        SessionMeter(WHISPER, **options)


@pytest.mark.parametrize("rate", [0, -8000, True, 48000.0])
def test_bad_format_rate_is_refused(rate: Any) -> None:
    """on_update takes only a positive int (or None)."""
    with pytest.raises(ValueError):
        SessionMeter(WHISPER).on_update("evt", rate)


# --- token pricing -----------------------------------------------------------------------------------


def test_token_cost_with_cached_audio_and_text() -> None:
    """response.done usage is billed by text, cached, audio and output prices, and adds up per response."""
    meter = SessionMeter(GPT_REALTIME)
    meter.on_response_done(RESPONSE_USAGE)
    # 300 text * 4e-6 + 300 cached * 4e-7 + 400 audio * 3.2e-5 + 100 text out * 1.6e-5
    # + 400 audio out * 6.4e-5 = 0.0012 + 0.00012 + 0.0128 + 0.0016 + 0.0256
    assert meter.cost() == Decimal("0.04132")
    meter.on_response_done(RESPONSE_USAGE)
    figures = meter.snapshot()
    assert (figures.input_tokens, figures.output_tokens) == (2000, 1000)
    assert figures.unit == "token"
    assert figures.quantity == Decimal(3000)
    assert figures.cost_usd == Decimal("0.08264")
    assert figures.audio_seconds == Decimal(0)


def test_token_cost_without_details_is_all_text() -> None:
    """Without token details, all input is text and all output is text."""
    meter = SessionMeter(GPT_REALTIME)
    meter.on_response_done({"input_tokens": 1000, "output_tokens": 500})
    assert meter.cost() == Decimal("0.012")  # 1000 * 4e-6 + 500 * 1.6e-5


def test_cached_without_breakdown_comes_from_text_first() -> None:
    """Cached tokens without cached_tokens_details are taken from text, then audio."""
    meter = SessionMeter(GPT_REALTIME)
    details = {"text_tokens": 100, "audio_tokens": 900, "cached_tokens": 300}
    meter.on_response_done({"input_tokens": 1000, "output_tokens": 0, "input_token_details": details})
    # 0 text + 300 cached * 4e-7 + 700 audio * 3.2e-5
    assert meter.cost() == Decimal("0.02252")


def test_token_price_fallbacks() -> None:
    """Missing cached/audio prices fall back to the text prices; a missing text price counts as 0."""
    meter = SessionMeter(Price(unit="token", input_token=Decimal("0.000001"), output_token=None))
    meter.on_response_done(RESPONSE_USAGE)
    assert meter.cost() == Decimal("0.001")  # all 1000 input tokens at 1e-6, output at 0


def test_malformed_usage_counts_nothing() -> None:
    """Negative, boolean or non-numeric counts are treated as 0 and nothing raises."""
    meter = SessionMeter(GPT_REALTIME)
    meter.on_response_done({"input_tokens": -5, "output_tokens": "7", "input_token_details": [1]})
    meter.on_response_done({"input_tokens": True, "output_token_details": {"audio_tokens": None}})
    assert meter.snapshot().quantity == Decimal(0)
    assert meter.cost() == Decimal(0)


# --- upstream usage ----------------------------------------------------------------------------------


def test_upstream_usage_is_recorded_beside_the_figures(speech_pcm16: bytes) -> None:
    """Transcription usage reported by the upstream is summed into JSON beside the figures, never billed."""
    meter = SessionMeter(WHISPER)
    stream(meter, speech_pcm16, CHUNK_100MS_PCM16)
    billed = meter.snapshot()
    meter.on_upstream_usage({"type": "duration", "seconds": 6.6})
    meter.on_upstream_usage({"type": "duration", "seconds": 0.067})
    tokens = {"type": "tokens", "input_tokens": 70, "output_tokens": 12, "total_tokens": 82,
              "input_token_details": {"text_tokens": 0, "audio_tokens": 70}}  # fmt: skip
    meter.on_upstream_usage(tokens)
    meter.on_upstream_usage(tokens)
    meter.on_upstream_usage({"type": "mystery"})
    figures = meter.snapshot()
    assert (figures.cost_usd, figures.quantity, figures.audio_seconds) == (
        billed.cost_usd,
        billed.quantity,
        billed.audio_seconds,
    )
    assert figures.input_tokens == figures.output_tokens == 0
    assert " " not in figures.upstream_usage
    assert orjson.loads(figures.upstream_usage) == {
        "duration_seconds": 6.667,
        "tokens": {
            "input_tokens": 140,
            "output_tokens": 24,
            "total_tokens": 164,
            "input_token_details": {"text_tokens": 0, "audio_tokens": 140},
        },
        "events": 4,
    }


def test_upstream_usage_empty_until_reported() -> None:
    """No upstream usage means an empty string; malformed usage is ignored."""
    meter = SessionMeter(WHISPER)
    meter.on_upstream_usage({"type": "duration", "seconds": "3"})
    meter.on_upstream_usage({"type": "duration", "seconds": float("nan")})
    assert meter.snapshot().upstream_usage == ""
    meter.on_upstream_usage({"type": "duration", "seconds": 3})
    assert meter.snapshot().upstream_usage == '{"duration_seconds":3,"events":1}'


def test_cached_audio_tokens_use_their_own_price() -> None:
    """Cached audio tokens are billed at cache_read_input_audio_token_cost when the price map has one."""
    price = Price(
        unit="token",
        input_token=Decimal("6E-7"),
        input_audio_token=Decimal("1E-5"),
        cached_input_token=Decimal("6E-8"),
        cached_input_audio_token=Decimal("3E-7"),
    )
    meter = SessionMeter(price)
    meter.on_response_done(
        {
            "input_tokens": 1000,
            "output_tokens": 0,
            "input_token_details": {
                "text_tokens": 200,
                "audio_tokens": 800,
                "cached_tokens": 500,
                "cached_tokens_details": {"text_tokens": 100, "audio_tokens": 400},
            },
        }
    )
    # 100 text * 6e-7 + 100 cached text * 6e-8 + 400 cached audio * 3e-7 + 400 audio * 1e-5
    assert meter.cost() == Decimal("0.00006") + Decimal("0.000006") + Decimal("0.00012") + Decimal("0.004")


# --- the provider's reported usage: the larger of two counts, and transcription on conversation sessions --


def test_reported_duration_above_the_metered_seconds_is_billed() -> None:
    """When the provider reports more transcribed seconds than were metered, the larger is billed."""
    meter = SessionMeter(WHISPER)
    assert meter.on_append(b64(b"\x00" * 96000))  # 2 s metered
    assert not meter.reported_over_metered
    meter.on_upstream_usage({"type": "duration", "seconds": 12})
    figures = meter.snapshot()
    assert meter.reported_over_metered
    assert figures.audio_seconds == Decimal(2)  # what the sidecar metered, unchanged
    assert figures.quantity == Decimal(12)
    assert figures.cost_usd == Decimal("0.0034000000")
    assert meter.cost() == figures.cost_usd


def test_reported_duration_below_the_metered_seconds_changes_nothing() -> None:
    """A reported duration below the metered seconds bills the metered seconds."""
    meter = SessionMeter(WHISPER)
    assert meter.on_append(b64(b"\x00" * 96000))
    meter.on_upstream_usage({"type": "duration", "seconds": 1.5})
    assert not meter.reported_over_metered
    assert meter.snapshot().quantity == Decimal(2)


GPT_4O_TRANSCRIBE = Price(
    unit="second",
    per_unit=Decimal("0.0001"),
    input_token=Decimal("0.0000025"),
    input_audio_token=Decimal("0.0000025"),
    output_token=Decimal("0.00001"),
)
WHISPER_1 = Price(unit="second", per_unit=Decimal("0.0001"))


def test_transcription_tokens_on_a_conversation_session_are_billed_at_the_transcriber_price() -> None:
    """A conversation session's input transcription usage (tokens) adds its cost at the transcriber's prices."""
    meter = SessionMeter(GPT_REALTIME)
    usage = {
        "type": "tokens",
        "total_tokens": 130,
        "input_tokens": 100,
        "input_token_details": {"text_tokens": 10, "audio_tokens": 90},
        "output_tokens": 30,
    }
    meter.on_upstream_usage(usage)
    meter.on_transcription_usage(usage, GPT_4O_TRANSCRIBE)
    # 90 audio * 2.5e-6 + 10 text * 2.5e-6 + 30 out * 1e-5
    assert meter.cost() == Decimal("0.00055")
    figures = meter.snapshot()
    assert figures.cost_usd == Decimal("0.0005500000")
    assert figures.quantity == Decimal(0)  # no response: no conversation tokens
    assert orjson.loads(figures.upstream_usage)["transcription_cost_usd"] == "0.0005500000"


def test_transcription_duration_on_a_conversation_session_is_billed_per_second() -> None:
    """Duration usage (whisper-1) is billed at the transcriber's per-second price, beside response tokens."""
    meter = SessionMeter(GPT_REALTIME)
    meter.on_response_done(RESPONSE_USAGE)
    tokens_only = meter.cost()
    meter.on_transcription_usage({"type": "duration", "seconds": 7}, WHISPER_1)
    assert meter.cost() == tokens_only + Decimal("0.0007")


def test_transcription_per_minute_price() -> None:
    """A per-minute transcriber bills a reported duration at its price / 60."""
    meter = SessionMeter(GPT_REALTIME)
    meter.on_transcription_usage({"type": "duration", "seconds": 30}, Price(unit="minute", per_unit=Decimal("0.006")))
    assert meter.cost() == Decimal("0.003")


@pytest.mark.parametrize(
    ("usage", "price"),
    [
        ({"type": "tokens", "input_tokens": 10}, WHISPER_1),  # no token price
        ({"type": "duration", "seconds": 3}, Price(unit="second", input_token=Decimal("0.001"))),  # no time price
    ],
)
def test_unpriceable_transcription_usage_is_counted_not_guessed(usage: dict[str, Any], price: Price) -> None:
    """Usage the transcriber's price cannot price adds nothing and is counted in upstream_usage."""
    meter = SessionMeter(GPT_REALTIME)
    meter.on_upstream_usage(usage)
    meter.on_transcription_usage(usage, price)
    assert meter.cost() == 0
    assert meter.transcription_unpriced == 1
    assert orjson.loads(meter.snapshot().upstream_usage)["transcription_unpriced"] == 1
