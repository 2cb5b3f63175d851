"""Input audio formats: what a client may ask for, and what a provider's session object confirms."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.audio_formats import DEFAULT_BYTES_PER_SECOND, FormatRefused, confirmed, requested


def ga(fmt: object) -> dict[str, Any]:
    return {"audio": {"input": {"format": fmt}}}


@pytest.mark.parametrize(
    ("session", "bps"),
    [
        (ga({"type": "audio/pcm", "rate": 24000}), 48000),
        (ga({"type": "audio/pcm", "rate": 24000.0}), 48000),
        (ga({"type": "audio/pcm"}), 48000),
        (ga({"type": "audio/pcmu"}), 8000),
        (ga({"type": "audio/pcma", "rate": 8000}), 8000),
        ({"input_audio_format": "pcm16"}, 48000),
        ({"input_audio_format": "g711_ulaw"}, 8000),
        ({"input_audio_format": "g711_alaw"}, 8000),
        ({"instructions": "hi"}, None),
        ({"audio": {"input": {"noise_reduction": None}}}, None),
        ({"audio": "garbage"}, None),
    ],
)
def test_formats_the_provider_decodes_at_the_metered_rate_are_accepted(session: dict[str, Any], bps: int) -> None:
    """GA and beta formats at the rate the provider decodes them give their bytes per second (None: no format)."""
    assert requested(session) == bps


@pytest.mark.parametrize(
    "session",
    [
        ga({"type": "audio/pcm", "rate": 48000}),
        ga({"type": "audio/pcm", "rate": 96000}),
        ga({"type": "audio/pcm", "rate": 1e9}),
        ga({"type": "audio/pcm", "rate": 1e300}),
        ga({"type": "audio/pcm", "rate": 16000}),
        ga({"type": "audio/pcm", "rate": float("nan")}),
        ga({"type": "audio/pcm", "rate": "24000"}),
        ga({"type": "audio/pcm", "rate": True}),
        ga({"type": "audio/pcmu", "rate": 24000}),
        ga({"type": "audio/opus"}),
        ga({"type": ["audio/pcm"]}),
        ga({}),
        ga("pcm16"),
        ga(48000),
        {"input_audio_format": "opus"},
        {"input_audio_format": "audio/pcm"},
        {"input_audio_format": {"type": "audio/pcm"}},
        {**ga({"type": "audio/pcm"}), "input_audio_format": "pcm16"},  # both ways, even agreeing
        {**ga({"type": "audio/pcmu"}), "input_audio_format": "pcm16"},  # both ways, conflicting
    ],
)
def test_other_formats_rates_and_double_naming_are_refused(session: dict[str, Any]) -> None:
    """A rate other than the provider's, an unknown format, or a format named both ways is refused."""
    with pytest.raises(FormatRefused):
        requested(session)


@pytest.mark.parametrize(
    ("session", "bps"),
    [
        (ga({"type": "audio/pcm", "rate": 24000}), 48000),
        (ga({"type": "audio/pcm", "rate": 48000}), 48000),  # PCM is decoded at 24 kHz whatever it echoes
        (ga({"type": "audio/pcmu"}), 8000),
        ({"input_audio_format": "g711_alaw"}, 8000),
        ({**ga({"type": "audio/pcm"}), "input_audio_format": "g711_ulaw"}, 8000),  # both: the lower rate
        (ga({"type": "audio/opus"}), 8000),  # unknown: the lower rate
        (ga("audio/pcmu"), 8000),
        ({"model": "x"}, None),
    ],
)
def test_confirmed_format_is_read_by_type_and_never_raises(session: dict[str, Any], bps: int | None) -> None:
    """A provider's session object gives the byte rate of its format type; doubt gives the lower rate."""
    assert confirmed(session) == bps


def test_default_is_pcm_at_24_khz() -> None:
    """The session default is audio/pcm at 24 kHz, 48000 bytes a second."""
    assert DEFAULT_BYTES_PER_SECOND == 48000
