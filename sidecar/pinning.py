"""Pinned sessions: a session opened with a client secret keeps the settings the secret was minted with.

The bound settings are a GA `session` object (OpenAI Realtime `session.update`), e.g.

    {"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                                   "transcription": {"model": "gpt-realtime-whisper"}}}}

A client `session.update` may set anything the secret left open, and may repeat a bound value, but may not
change one: every leaf it sets is compared with the bound leaves at the same GA path. The beta spellings
(`input_audio_format: "pcm16"`, `input_audio_transcription`, `turn_detection`, ...) are mapped to their GA
paths first, so they cannot slip past. Pure: no I/O, called only for session updates (never per audio frame).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Final

Path = tuple[str, ...]

# Beta session fields -> the GA path that holds the same setting.
BETA_ALIASES: Final[dict[str, Path]] = {
    "input_audio_format": ("audio", "input", "format"),
    "input_audio_transcription": ("audio", "input", "transcription"),
    "input_audio_noise_reduction": ("audio", "input", "noise_reduction"),
    "turn_detection": ("audio", "input", "turn_detection"),
    "output_audio_format": ("audio", "output", "format"),
    "voice": ("audio", "output", "voice"),
    "modalities": ("output_modalities",),
}
# Beta format strings -> GA format objects (OpenAI Realtime GA `audio.input.format`).
BETA_FORMATS: Final[dict[str, dict[str, Any]]] = {
    "pcm16": {"type": "audio/pcm", "rate": 24000},
    "g711_ulaw": {"type": "audio/pcmu"},
    "g711_alaw": {"type": "audio/pcma"},
}


def leaves(obj: Mapping[str, Any], prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Every (path, value) whose value is not an object; an empty object sets nothing."""
    for key, value in obj.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            yield from leaves(value, path)
        else:
            yield path, value


def settings(session: Mapping[str, Any]) -> Iterator[tuple[Path, Any]]:
    """The leaves a session object sets, beta fields at their GA paths (a field set both ways yields both)."""
    for key, value in session.items():
        path = BETA_ALIASES.get(key)
        if path is None:
            yield from leaves({key: value})
            continue
        if path[-1] == "format" and isinstance(value, str):
            value = BETA_FORMATS.get(value, {"type": value})
        if isinstance(value, Mapping):
            yield from leaves(value, path)
        else:
            yield path, value


class Pin:
    """The bound settings of one session, ready to check client updates against."""

    def __init__(self, bound: Mapping[str, Any]) -> None:
        self._leaves = dict(settings(bound))

    def conflict(self, update: Mapping[str, Any]) -> str | None:
        """The dotted path of the first bound setting `update` would change, or None when it changes none."""
        for path, value in settings(update):
            for bound_path, bound_value in self._leaves.items():
                if _clashes(path, value, bound_path, bound_value):
                    return ".".join(bound_path if len(bound_path) <= len(path) else path)
        return None


def _clashes(path: Path, value: Any, bound_path: Path, bound_value: Any) -> bool:
    if path == bound_path:
        return bool(value != bound_value)
    # A non-object replacing a bound object (e.g. `"format": null`), or digging into a bound non-object
    # (e.g. `turn_detection: {...}` where the secret bound `turn_detection: null`).
    shorter, longer = (path, bound_path) if len(path) < len(bound_path) else (bound_path, path)
    return longer[: len(shorter)] == shorter
