"""Keeping a deployment's secrets out of everything the upstream sends the client (docs/api.md, "After the upgrade").

The secrets of a deployment are its api key, its api_base host with and without the port, and its
deployment (upstream model) name when it is not part of the public model name. They are matched ignoring
case, with Unicode case folding (hosts are case-insensitive, and so are Azure deployment names; a key with
its case changed is still the key). The key and hosts become `[redacted]`, the deployment name becomes the
public model name.

What is scrubbed is what the client decodes, not the raw text: a JSON string can spell a secret with
escapes (`\\u0073k-...`, `\\u002D`, `\\/`), which a substring check on the raw frame misses. So:

- a text frame with no `\\u` and no `\\/` escape spells every character of every string either as itself
  or with JSON's one mandatory escape; if no secret, written that way, occurs in the frame (ignoring case),
  the client cannot decode one, and the frame is relayed as the same string. This is the hot path: a
  lower-cased copy and a few `in` checks, and for an audio delta only over the part before its base64;
- any other frame is parsed and serialised again by orjson, which spells every string one way, and that is
  checked the same way; only when it holds a secret is every string of the event (keys and values, at any
  depth) scrubbed and the event serialised again. A frame that needs no change is relayed as it came.

The base64 audio of an audio delta (`response.output_audio.delta`, beta `response.audio.delta`: its top-level
`delta`) is not text: it is never scanned nor changed (a chance match of a short deployment name in random
base64 would otherwise corrupt the audio). On the hot path an audio delta is recognised by the shape OpenAI
sends (`type` first, `delta` last, compact, no backslash); any other shape takes the general path.

What this defends against is a provider echoing its own configuration: error messages, close reasons,
transcripts and session objects naming the key, host or deployment. It does not defend against a provider
that hides a secret on purpose (it could spell it in the audio, split it across two deltas - the scrub is
per event - or repeat a JSON key so that the hot path reads another `type` than the client does).

Binary frames are scrubbed as the text they decode to (raw bytes when they are not UTF-8). An upstream close
reason (plain text, at most 123 bytes) is scrubbed, also of a secret the provider cut short at its end, and
cut to 123 bytes on a character boundary.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final
from urllib.parse import urlsplit

import orjson

from sidecar import protocol
from sidecar.catalog import Deployment

REDACTED: Final = "[redacted]"
#: A close frame's reason: at most 123 bytes of UTF-8 (RFC 6455 5.5.1: 125 bytes of payload, 2 for the code).
MAX_REASON_BYTES: Final = 123
#: A close reason that ends with this many characters of a secret, or more, had the secret cut short.
PARTIAL_MIN: Final = 4

# Escapes that spell a character some other way than itself or its one mandatory escape.
_UNICODE_ESCAPE, _SLASH_ESCAPE = "\\u", "\\/"
# An audio delta as OpenAI sends it: `type` first, its base64 `delta` last (checked exactly; anything else
# takes the general path). Without a backslash in the frame every `"` delimits a string, so the text before
# `"delta":` holds every other string of the event.
_AUDIO_HEADS: Final = ('{"type":"response.output_audio.delta",', '{"type":"response.audio.delta",')
_AUDIO_TYPES: Final = frozenset({"response.output_audio.delta", "response.audio.delta"})
_AUDIO_KEY: Final = '"delta":'
_AUDIO_KEY_SIZE: Final = len(_AUDIO_KEY)


def secrets_of(deployment: Deployment) -> tuple[str, ...]:
    """Text that must never reach a client: the api key and the api_base host (with and without port)."""
    found: list[str] = []
    if deployment.api_key:
        found.append(deployment.api_key)
    if deployment.api_base:
        parts = urlsplit(deployment.api_base)
        if parts.netloc:
            found.append(parts.netloc)
        if parts.hostname and parts.hostname not in found:
            found.append(parts.hostname)
    # Longest first, so a host:port is replaced before its bare host.
    return tuple(sorted(found, key=len, reverse=True))


class Scrubber:
    """Scrubs one deployment's secrets out of upstream frames and close reasons. Pure; never raises."""

    __slots__ = ("_json_needles", "_needles", "_pattern", "_replacements", "_secrets")

    def __init__(self, replacements: Mapping[str, str]) -> None:
        """`replacements`: each secret (matched ignoring case) and the text that replaces it."""
        secrets = sorted((s for s in replacements if s), key=len, reverse=True)  # longest first wins
        self._secrets = tuple(secrets)
        self._replacements = {_fold(s): replacements[s] for s in reversed(secrets)}
        # What a frame is checked for: each secret case-folded, leaving out those that hold another one (a
        # host:port holds its host); and each as it appears in a raw frame that has no \u or \/ escape.
        self._needles = _fewest(_fold(s) for s in secrets)
        self._json_needles = _fewest(_fold(orjson.dumps(s).decode()[1:-1]) for s in secrets)
        alternatives = "|".join(re.escape(s) for s in secrets)
        self._pattern = re.compile(alternatives, re.IGNORECASE) if secrets else None

    @classmethod
    def for_deployment(cls, deployment: Deployment, *, public_model: str) -> Scrubber:
        """The scrubber of a session of `public_model` relayed to `deployment`."""
        replacements = dict.fromkeys(secrets_of(deployment), REDACTED)
        upstream = deployment.model
        # A deployment name that is part of the public name is told to the client anyway: not a secret.
        if upstream and _fold(upstream) not in _fold(public_model):
            replacements.setdefault(upstream, public_model)
        return cls(replacements)

    def adding(self, secret: str, replacement: str) -> Scrubber:
        """This scrubber with one more secret: a deployment name that is not part of `replacement` (the
        deployment of a conversation session's input transcription model, shown as its public name)."""
        if not secret or _fold(secret) in _fold(replacement):
            return self
        replacements = {s: self._replacements[_fold(s)] for s in self._secrets}
        replacements.setdefault(secret, replacement)
        return Scrubber(replacements)

    @property
    def secrets(self) -> tuple[str, ...]:
        """The secrets scrubbed, longest first."""
        return self._secrets

    # ---- frames -----------------------------------------------------------------------------------

    def text(self, text: str) -> str:
        """One upstream text frame as the client may see it; the same object when nothing needs scrubbing."""
        needles = self._needles
        if not needles:
            return text
        if "\\" in text:
            return self._escaped(text)
        lowered = None
        if text.startswith(_AUDIO_HEADS) and text.endswith('"}'):
            start = text.rfind('"', 0, -2) - _AUDIO_KEY_SIZE  # the last string is the top-level `delta`
            if start > 0 and text.startswith(_AUDIO_KEY, start):
                head = text[:start]  # every string of the event but its base64 audio
                lowered = head.lower() if head.isascii() else head.casefold()  # _fold, inline: per frame
        if lowered is None:
            lowered = text.lower() if text.isascii() else text.casefold()
        for needle in needles:  # not any(): this loop is the cost of every frame
            if needle in lowered:
                return self._decoded(text)
        return text

    def data(self, data: bytes) -> bytes:
        """One upstream binary frame: scrubbed as the text it decodes to, or as raw bytes when not UTF-8."""
        if not self._needles:
            return data
        try:
            text = data.decode()
        except UnicodeDecodeError:
            return self._raw_bytes(data)
        out = self.text(text)
        return data if out is text else out.encode()

    def reason(self, reason: str) -> str:
        """An upstream close reason fit to relay: scrubbed, a secret cut short at its end redacted too,
        and at most MAX_REASON_BYTES of UTF-8, cut on a character boundary."""
        text = _cut(self._string(reason), MAX_REASON_BYTES)
        partial = self._partial_tail(text)
        if partial:
            text = _cut(text[:-partial], MAX_REASON_BYTES - len(REDACTED)) + REDACTED
        return text

    # ---- the general path ----------------------------------------------------------------------------

    def _escaped(self, text: str) -> str:
        """A frame with a backslash: parsed when it has an escape that can spell a secret another way, or
        holds a secret spelled with JSON's mandatory escapes; else relayed as it is."""
        if _UNICODE_ESCAPE in text or _SLASH_ESCAPE in text or _found(self._json_needles, _fold(text)):
            return self._decoded(text)
        return text

    def _decoded(self, text: str) -> str:
        """Parse the frame; if what it decodes to holds a secret, scrub every string in it and serialise it
        again. A frame that needs no change is returned as it came."""
        try:
            event = orjson.loads(text)
        except orjson.JSONDecodeError:
            # What orjson refuses a client's parser may still take (NaN, huge integers, lone surrogates).
            try:
                event = json.loads(text)
            except ValueError:  # not JSON: nothing is decoded, the raw text is what a client reads
                return self._string(text)
            except RecursionError:  # too deep for us, maybe not for the client: only safe without escapes
                return self._string(text) if "\\" not in text else _withheld()
            return self._rewritten(text, event, _json_dumps)
        try:
            canonical = orjson.dumps(event).decode()  # every string spelled one way: a raw check is enough
        except TypeError:  # orjson's JSONEncodeError (nesting too deep to serialise): look at every string
            return self._rewritten(text, event, _orjson_dumps)
        if not _found(self._json_needles, _fold(canonical)):
            return text
        return self._rewritten(text, event, _orjson_dumps)

    def _rewritten(self, text: str, event: Any, dumps: Callable[[Any], str]) -> str:
        """`event` (decoded from `text`) with every string scrubbed, serialised; `text` if nothing changed."""
        audio = isinstance(event, dict) and event.get("type") in _AUDIO_TYPES
        holder = [event]
        if not self._scrub_tree(holder, audio=event if audio else None):
            return text
        try:
            return dumps(holder[0])
        except (TypeError, ValueError, RecursionError):  # orjson's JSONEncodeError is a TypeError
            return _withheld()

    def _scrub_tree(self, holder: list[Any], *, audio: Any) -> bool:
        """Scrub every string under `holder` in place, iteratively (no depth limit); True if any changed.
        The `delta` of `audio` (the event, when it is an audio delta) is left as it is."""
        changed = False
        stack: list[Any] = [holder]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                changed |= self._scrub_dict(node, stack, skip="delta" if node is audio else None)
                continue
            for index, value in enumerate(node):
                if isinstance(value, str):
                    new = self._string(value)
                    if new is not value:
                        node[index], changed = new, True
                elif isinstance(value, dict | list):
                    stack.append(value)
        return changed

    def _scrub_dict(self, node: dict[str, Any], stack: list[Any], *, skip: str | None) -> bool:
        changed = rekey = False
        for key, value in node.items():
            if isinstance(value, str):
                if key != skip:
                    new = self._string(value)
                    if new is not value:
                        node[key], changed = new, True  # an existing key: the dict's size is unchanged
            elif isinstance(value, dict | list):
                stack.append(value)
            rekey = rekey or self._string(key) is not key
        if rekey:
            items = [(self._string(key), value) for key, value in node.items()]
            node.clear()
            node.update(items)
        return changed or rekey

    # ---- strings ---------------------------------------------------------------------------------------

    def _string(self, text: str) -> str:
        """`text` (as decoded) with every secret replaced; the same object when it holds none."""
        if not _found(self._needles, _fold(text)):
            return text
        assert self._pattern is not None  # no needles without a pattern
        out = self._pattern.sub(self._replacement, text)
        # A replacement next to other text can spell a secret again (pathological names): give up on it.
        return REDACTED if _found(self._needles, _fold(out)) else out

    def _replacement(self, match: re.Match[str]) -> str:
        # The pattern ignores case as the re module does; what it matched may fold to no secret's own folding.
        return self._replacements.get(_fold(match.group()), REDACTED)

    def _raw_bytes(self, data: bytes) -> bytes:
        """Bytes that are not UTF-8: each secret's UTF-8 bytes, ignoring ASCII case, become `[redacted]`."""
        pattern = re.compile(b"|".join(re.escape(s.encode()) for s in self._secrets), re.IGNORECASE)
        out = pattern.sub(REDACTED.encode(), data)
        lowered = out.lower()
        return REDACTED.encode() if any(s.encode() in lowered for s in self._needles) else out

    def _partial_tail(self, text: str) -> int:
        """How many characters at the end of `text` are the first PARTIAL_MIN or more of a secret (0: none)."""
        longest = 0
        for needle in (_fold(secret) for secret in self._secrets):  # all: a prefix is not a substring
            for size in range(min(len(needle), len(text)), max(PARTIAL_MIN, longest + 1) - 1, -1):
                if _fold(text[-size:]) == needle[:size]:
                    longest = size
                    break
        return longest


def _fewest(needles: Iterable[str]) -> tuple[str, ...]:
    """The needles that hold no other one: finding none of these is finding none at all."""
    unique = sorted(set(needles), key=len)
    return tuple(n for i, n in enumerate(unique) if not any(shorter in n for shorter in unique[:i]))


def _fold(text: str) -> str:
    """`text` with case folded (str.lower is the same and faster on ASCII)."""
    return text.lower() if text.isascii() else text.casefold()


def _found(needles: Iterable[str], lowered: str) -> bool:
    """True when any needle occurs in `lowered`."""
    for needle in needles:  # noqa: SIM110 - any() over a generator costs more than the checks, per frame
        if needle in lowered:
            return True
    return False


def _cut(text: str, limit: int) -> str:
    """`text` cut to at most `limit` bytes of UTF-8, never inside a character."""
    raw = text.encode("utf-8", "replace")
    return text if len(raw) <= limit and raw.decode() == text else raw[:limit].decode("utf-8", "ignore")


def _orjson_dumps(event: Any) -> str:
    return orjson.dumps(event).decode()


def _json_dumps(event: Any) -> str:
    # ASCII escapes: a lone surrogate (which UTF-8 cannot carry) goes out escaped, as it came.
    return json.dumps(event, ensure_ascii=True, separators=(",", ":"))


def _withheld() -> str:
    """What the client gets instead of an upstream event that could not be checked (too deep to rewrite)."""
    return protocol.error_event(
        "upstream_event_withheld",
        "An upstream event could not be checked for secrets and was withheld.",
        error_type="server_error",
    )
