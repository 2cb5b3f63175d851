"""Input audio formats: which ones a client may ask for, and what the provider confirmed (docs/billing.md).

Pure: no I/O. Used for session updates and the provider's session events, never per audio frame.

The sidecar meters at the rate the provider actually decodes, not the rate a client declares:
`audio/pcm` (beta `pcm16`) is 24 kHz 16-bit mono, 48000 bytes a second; `audio/pcmu` / `audio/pcma` (beta
`g711_ulaw` / `g711_alaw`) are 8 kHz, 8000 bytes a second. A client update that names any other format or
rate, names the format both ways (GA `audio.input.format` and beta `input_audio_format`), or names a format
that is not an object (GA) or one of the beta strings, is refused before it reaches the provider.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

PCM_BYTES_PER_SECOND: Final = 48000
G711_BYTES_PER_SECOND: Final = 8000
#: The session default (OpenAI Realtime: `audio/pcm` at 24 kHz).
DEFAULT_BYTES_PER_SECOND: Final = PCM_BYTES_PER_SECOND

# GA type -> (the only rate the provider decodes it at, bytes per second).
_GA: Final[Mapping[str, tuple[int, int]]] = {
    "audio/pcm": (24000, PCM_BYTES_PER_SECOND),
    "audio/pcmu": (8000, G711_BYTES_PER_SECOND),
    "audio/pcma": (8000, G711_BYTES_PER_SECOND),
}
_BETA: Final[Mapping[str, int]] = {
    "pcm16": PCM_BYTES_PER_SECOND,
    "g711_ulaw": G711_BYTES_PER_SECOND,
    "g711_alaw": G711_BYTES_PER_SECOND,
}
#: Beside the GA and beta names, what a provider's session object may call a format (type names alone).
_ANY_NAME: Final[Mapping[str, int]] = {**_BETA, **{name: bps for name, (_, bps) in _GA.items()}}


class FormatRefused(ValueError):
    """A client's session update names an input format the sidecar will not forward. The text is for the client."""


def _ga_format(session: Mapping[str, Any]) -> object:
    audio = session.get("audio")
    if not isinstance(audio, Mapping):
        return None
    audio_input = audio.get("input")
    return audio_input.get("format") if isinstance(audio_input, Mapping) else None


def requested(session: Mapping[str, Any]) -> int | None:
    """The bytes per second a client's `session.update` / `transcription_session.update` session asks for.

    None when it names no input format. Raises FormatRefused (see the module docstring).
    """
    ga, beta = _ga_format(session), session.get("input_audio_format")
    if ga is not None and beta is not None:
        raise FormatRefused("Name the input format once: audio.input.format or input_audio_format, not both.")
    if beta is not None:
        if isinstance(beta, str) and beta in _BETA:
            return _BETA[beta]
        raise FormatRefused(f"input_audio_format must be one of {', '.join(_BETA)}.")
    if ga is None:
        return None
    kind = ga.get("type") if isinstance(ga, Mapping) else None
    if not isinstance(ga, Mapping) or not isinstance(kind, str) or kind not in _GA:
        raise FormatRefused(f"audio.input.format.type must be one of {', '.join(_GA)}.")
    rate, bps = _GA[kind]
    declared = ga.get("rate", rate)
    if isinstance(declared, bool) or not isinstance(declared, int | float) or declared != rate:
        raise FormatRefused(f"{kind} input audio is {rate} Hz; audio.input.format.rate must be {rate}.")
    return bps


def confirmed(session: Mapping[str, Any]) -> int | None:
    """The bytes per second of the input format a provider's session object (`session.created` /
    `session.updated` / their beta names) says is in force; None when it names none. Never raises.

    By format type only: the provider decodes PCM at 24 kHz whatever rate it echoes. When the object names
    the format both ways, or a name this module does not know, the lower byte rate (more seconds) wins.
    """
    found: list[int] = []
    ga = _ga_format(session)
    if isinstance(ga, Mapping):
        kind = ga.get("type")
        found.append(_ANY_NAME.get(kind, G711_BYTES_PER_SECOND) if isinstance(kind, str) else G711_BYTES_PER_SECOND)
    elif ga is not None:
        found.append(_ANY_NAME.get(ga, G711_BYTES_PER_SECOND) if isinstance(ga, str) else G711_BYTES_PER_SECOND)
    beta = session.get("input_audio_format")
    if beta is not None:
        found.append(_ANY_NAME.get(beta, G711_BYTES_PER_SECOND) if isinstance(beta, str) else G711_BYTES_PER_SECOND)
    return min(found) if found else None
