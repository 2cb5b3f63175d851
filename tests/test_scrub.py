"""The scrubber, pure: what a client decodes from an upstream frame or close reason never holds a secret
of the deployment (its key, its host with and without port, its deployment name), however it is spelled."""

from __future__ import annotations

import base64
import json
import random
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.catalog import Deployment
from sidecar.scrub import MAX_REASON_BYTES, PARTIAL_MIN, REDACTED, Scrubber

KEY = "az-secret-key-0123456789abcdef"
HOST, HOST_PORT = "res.openai.azure.com", "res.openai.azure.com:8443"
DEPLOY = "acme/my-deploy"
PUBLIC = "captions"
DEPLOYMENT = Deployment(provider="azure", model=DEPLOY, api_base=f"https://{HOST_PORT}", api_key=KEY)
SECRETS = (KEY, HOST_PORT, HOST, DEPLOY)
SCRUBBER = Scrubber.for_deployment(DEPLOYMENT, public_model=PUBLIC)
AUDIO_TYPES = ("response.output_audio.delta", "response.audio.delta")


def strings(value: Any, *, audio_exempt: bool = True) -> list[str]:
    """Every string a client decodes as text from an event: keys and values at any depth (not the base64
    audio of an audio delta, which it decodes as audio)."""
    found: list[str] = []
    if isinstance(value, dict):
        skip = audio_exempt and value.get("type") in AUDIO_TYPES
        for key, item in value.items():
            found.append(key)
            if not (skip and key == "delta"):
                found += strings(item, audio_exempt=False)
    elif isinstance(value, list):
        for item in value:
            found += strings(item, audio_exempt=False)
    elif isinstance(value, str):
        found.append(value)
    return found


def leaks(decoded: Any, secrets: tuple[str, ...] = SECRETS) -> list[str]:
    """The secrets (ignoring case) found in what a client decodes."""
    text = "\n".join(strings(decoded)).lower()
    return [secret for secret in secrets if secret.lower() in text]


def spell(text: str, rng: random.Random) -> str:
    """`text` as a JSON string literal, each character spelled at random: as itself, with its short
    escape, or as \\uXXXX in upper- or lower-case hex (surrogate pairs beyond the BMP)."""
    out = ['"']
    for char in text:
        options = []
        if char not in '"\\' and ord(char) >= 0x20:
            options.append(char)
        short = {'"': '\\"', "\\": "\\\\", "/": "\\/", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
        if char in short:
            options.append(short[char])
        units = [ord(char)] if ord(char) < 0x10000 else list(divmod(ord(char) - 0x10000, 0x400))
        if ord(char) >= 0x10000:
            units = [0xD800 + units[0], 0xDC00 + units[1]]
        hex_form = "".join(f"\\u{unit:04x}" for unit in units)
        options += [hex_form, hex_form.upper().replace("\\U", "\\u")]
        out.append(rng.choice(options))
    out.append('"')
    return "".join(out)


def serialise(value: Any, rng: random.Random) -> str:
    """`value` as JSON, every string (keys too) spelled at random by `spell`."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{spell(k, rng)}:{serialise(v, rng)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(serialise(v, rng) for v in value) + "]"
    if isinstance(value, str):
        return spell(value, rng)
    return json.dumps(value)


def scrambled_case(text: str, rng: random.Random) -> str:
    return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in text)


# ---- the hot path: frames that need nothing --------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"conversation.item.input_audio_transcription.delta","delta":"hello"}',
        '{"type":"response.output_text.delta","delta":"a \\"quoted\\" line\\nand a tab\\t"}',
        '{"type":"response.output_audio_transcript.delta","delta":"caf\\u00e9 \\/ na\\u00EFve"}',
        '{"type":"response.output_audio.delta","event_id":"e","delta":"' + base64.b64encode(bytes(960)).decode() + '"}',
    ],
)
def test_frames_without_secrets_are_relayed_as_the_same_string(frame: str) -> None:
    """A frame that spells no secret comes back as the very same object, escapes or not."""
    assert SCRUBBER.text(frame) is frame


# ---- escapes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelled", "secret"),
    [
        ("az\\u002dsecret-key-0123456789abcdef", KEY),
        ("az\\u002Dsecret\\u002Dkey-0123456789abcdef", KEY),
        ("".join(f"\\u{ord(c):04X}" for c in KEY), KEY),
        ("res.openai.azure.com\\u003a8443", HOST_PORT),
        ("RES.OpenAI.Azure.COM", HOST),
        ("acme\\/my-deploy", DEPLOY),
        ("ACME\\/My\\u002DDeploy", DEPLOY),
    ],
)
def test_escaped_spellings_of_a_secret_are_scrubbed(spelled: str, secret: str) -> None:
    """Unicode escapes in either hex case, an escaped slash and any letter case do not hide a secret."""
    frame = '{"type":"error","error":{"message":"failed: ' + spelled + '"}}'
    assert secret.lower() in json.loads(frame)["error"]["message"].lower()  # what the client would decode
    out = json.loads(SCRUBBER.text(frame))
    assert leaks(out) == []
    assert out["error"]["message"] in (f"failed: {REDACTED}", f"failed: {PUBLIC}")


@pytest.mark.parametrize(
    "event",
    [
        {"type": "response.output_audio_transcript.delta", "delta": f"I run on {DEPLOY}"},
        {"type": "conversation.item.input_audio_transcription.delta", "delta": f"say {DEPLOY}"},
        {"type": "conversation.item.input_audio_transcription.completed", "transcript": f"{DEPLOY} and {HOST}"},
        {"type": "response.done", "response": {"output": [{"content": [{"transcript": f"I am {DEPLOY}"}]}]}},
        {"type": "session.updated", "session": {"model": DEPLOY, "tools": [{"name": f"via {KEY}"}]}},
        {"type": "rate_limits.updated", "rate_limits": [{"name": HOST_PORT}]},
        {"type": "x.unknown", DEPLOY: {KEY: [HOST]}},
    ],
)
def test_every_event_type_is_scrubbed_keys_and_values(event: dict[str, Any]) -> None:
    """The deployment name becomes the public model name and keys and hosts become [redacted], in any event,
    at any depth, in keys as in values."""
    out = orjson.loads(SCRUBBER.text(orjson.dumps(event).decode()))
    assert leaks(out) == []
    assert out["type"] == event["type"]
    assert PUBLIC in "".join(strings(out)) or REDACTED in "".join(strings(out))


def test_the_deployment_name_is_replaced_by_the_public_name() -> None:
    """A transcript naming the deployment reads the public model name instead, the rest unchanged."""
    frame = '{"type":"response.output_audio_transcript.delta","delta":"I am ACME/my-deploy, hi"}'
    assert orjson.loads(SCRUBBER.text(frame))["delta"] == f"I am {PUBLIC}, hi"


def test_unicode_case_folding_never_raises_nor_leaks() -> None:
    """A host spelled with a long s or a Kelvin sign (the same letters, folded) is scrubbed, in a frame and a
    close reason, alone or next to another secret."""
    for host in ("re\u017f.openai.azure.com", "RES.openai.azure.com".replace("S", "\u017f")):
        frame = '{"type":"error","m":"' + host + " and " + KEY + '"}'
        out = json.loads(SCRUBBER.text(frame))
        assert "openai.azure" not in out["m"] and KEY not in out["m"]
        alone = '{"type":"error","m":"at ' + host + '"}'
        assert "openai.azure" not in json.loads(SCRUBBER.text(alone))["m"]
        assert "openai.azure" not in SCRUBBER.reason(f"{json.loads(chr(34) + host + chr(34))} {KEY}")
    kelvin = "\u212a".join(KEY.split("k"))  # every k of the key as U+212A KELVIN SIGN
    assert leaks(json.loads(SCRUBBER.text('{"type":"error","m":"' + kelvin + '"}'))) == []
    assert "0123456789" not in json.loads(SCRUBBER.text('{"type":"error","m":"' + kelvin + '"}'))["m"]


# ---- audio -------------------------------------------------------------------------------------------------


def test_audio_base64_is_never_changed_even_when_it_spells_the_deployment() -> None:
    """An audio delta's base64 that happens to spell the deployment name (any case) is relayed untouched;
    its other fields are scrubbed, on the cheap path and on the parsed one (escaped slashes)."""
    scrubber = Scrubber.for_deployment(Deployment(provider="azure", model="gpt4o", api_base=None), public_model="voice")
    audio = "AAAAGPT4oAAA/GpT4OAA"
    plain = '{"type":"response.output_audio.delta","event_id":"e1","delta":"' + audio + '"}'
    assert scrubber.text(plain) is plain
    named = '{"type":"response.output_audio.delta","item_id":"gpt4o","delta":"' + audio + '"}'
    assert orjson.loads(scrubber.text(named)) == {
        "type": "response.output_audio.delta",
        "item_id": "voice",
        "delta": audio,
    }
    escaped = '{"type":"response.audio.delta","item_id":"gpt4o","delta":"' + audio.replace("/", "\\/") + '"}'
    assert orjson.loads(scrubber.text(escaped))["delta"] == audio


# ---- binary frames, odd JSON -------------------------------------------------------------------------------


def test_binary_frames_are_scrubbed_as_the_text_they_decode_to() -> None:
    """A UTF-8 binary frame is scrubbed like text (escapes included); other bytes have the raw secret redacted."""
    frame = b'{"type":"error","error":{"message":"key az\\u002dsecret-key-0123456789abcdef"}}'
    assert leaks(json.loads(SCRUBBER.data(frame))) == []
    assert SCRUBBER.data(b"\xff\xfe AZ-SECRET-key-0123456789abcdef") == b"\xff\xfe " + REDACTED.encode()
    clean = b'{"type":"response.done"}'
    assert SCRUBBER.data(clean) is clean


def test_json_that_orjson_refuses_is_still_scrubbed() -> None:
    """NaN, a huge integer and a lone surrogate (which a lenient client parser takes) do not let a secret by."""
    for extra in ("NaN", "1" * 40, '"\\ud800"'):
        frame = '{"type":"error","x":' + extra + ',"m":"key az\\u002dsecret-key-0123456789abcdef"}'
        assert leaks(json.loads(SCRUBBER.text(frame))) == [], extra


def test_text_that_is_not_json_is_scrubbed_raw() -> None:
    """A frame that is not JSON has its raw secrets replaced."""
    assert SCRUBBER.text(f"oops {KEY.upper()} at {HOST_PORT}") == f"oops {REDACTED} at {REDACTED}"


def test_deep_nesting_never_raises_nor_leaks() -> None:
    """Nesting too deep to serialise again is withheld as an error event; deeper than any parser takes,
    it is scrubbed raw when it has no escapes."""
    for depth in (300, 3000):
        frame = "[" * depth + '"az\\u002dsecret-key-0123456789abcdef"' + "]" * depth
        out = orjson.loads(SCRUBBER.text(frame))
        assert out["error"]["code"] == "upstream_event_withheld"
    raw = "[" * 3000 + f'"{KEY}"' + "]" * 3000
    assert KEY not in SCRUBBER.text(raw)


# ---- close reasons -----------------------------------------------------------------------------------------


def test_close_reason_is_scrubbed() -> None:
    """Key, host:port and deployment in a close reason are replaced; the rest of the reason stays."""
    reason = f"bye: key {KEY} at {HOST_PORT.upper()} for {DEPLOY}"
    assert SCRUBBER.reason(reason) == f"bye: key {REDACTED} at {REDACTED} for {PUBLIC}"


def test_close_reason_with_a_secret_cut_short_at_its_end() -> None:
    """A reason the provider cut inside a secret ends [redacted] instead of the secret's first characters."""
    assert SCRUBBER.reason(f"invalid key {KEY[:17]}") == f"invalid key {REDACTED}"
    assert SCRUBBER.reason(f"at {HOST[: PARTIAL_MIN - 1]}") == f"at {HOST[: PARTIAL_MIN - 1]}"  # too short to tell


def test_close_reason_grown_by_scrubbing_is_cut_on_a_character_boundary() -> None:
    """Replacements that grow a reason past 123 bytes are cut to fit, never inside a UTF-8 character."""
    scrubber = Scrubber.for_deployment(Deployment(provider="openai", model="m", api_base="ws://h.io"), public_model="m")
    reason = "h.io " * 4 + "€" * 34  # 20 + 102 = 122 bytes; each h.io becomes [redacted] (+6 bytes each)
    out = scrubber.reason(reason)
    assert len(out.encode()) <= MAX_REASON_BYTES
    assert out == f"{REDACTED} " * 4 + "€" * 26  # 44 + 78 bytes: a 27th euro sign would need 125


# ---- which secrets --------------------------------------------------------------------------------------------


def test_secrets_of_a_deployment() -> None:
    """Key and host forms are secret; a deployment name is secret unless the public name holds it."""
    assert set(SCRUBBER.secrets) == set(SECRETS)
    inside = Deployment(provider="openai", model="gpt-realtime", api_base=None, api_key="sk-1")
    assert Scrubber.for_deployment(inside, public_model="GPT-Realtime-2025").secrets == ("sk-1",)
    assert (
        Scrubber.for_deployment(Deployment(provider="openai", model="m", api_base=None), public_model="m").secrets == ()
    )


# ---- properties ---------------------------------------------------------------------------------------------

_TYPES = (
    "error",
    "session.updated",
    "response.done",
    "response.output_audio_transcript.delta",
    "response.output_text.delta",
    "conversation.item.input_audio_transcription.delta",
    "conversation.item.input_audio_transcription.completed",
    *AUDIO_TYPES,
)


@st.composite
def secret_events(draw: st.DrawFn) -> tuple[Scrubber, tuple[str, ...], str, Any]:
    """A deployment with random secrets, and a random event holding them, serialised with random escapes."""
    alnum = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    key = "sk-" + draw(st.text(alnum + "-_", min_size=8, max_size=40))
    host = draw(st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)) + ".example.com"
    port = draw(st.integers(1, 65535))
    deploy = draw(st.text(alnum + "-_./", min_size=1, max_size=10)) + "7"
    deployment = Deployment(provider="openai", model=deploy, api_base=f"https://{host}:{port}", api_key=key)
    scrubber = Scrubber.for_deployment(deployment, public_model=PUBLIC)
    secrets = (key, f"{host}:{port}", host, deploy)
    rng = draw(st.randoms(use_true_random=False))
    holding = st.builds(
        lambda before, secret, after: before + scrambled_case(secret, rng) + after,
        st.text(max_size=8),
        st.sampled_from(secrets),
        st.text(max_size=8),
    )
    leaf_strings = st.one_of(st.text(max_size=12), holding)
    values = st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), leaf_strings),
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(leaf_strings, inner, max_size=4)),
        max_leaves=12,
    )
    event = {"type": draw(st.sampled_from(_TYPES)), **draw(st.dictionaries(leaf_strings, values, max_size=5))}
    return scrubber, secrets, serialise(event, rng), event


@settings(max_examples=400, deadline=None)
@given(secret_events())
def test_property_a_client_never_decodes_a_secret(case: tuple[Scrubber, tuple[str, ...], str, Any]) -> None:
    """For random events holding random secrets in random case with random escapes, what the client decodes
    from the relayed frame (as text or as a binary frame) holds no secret."""
    scrubber, secrets, frame, event = case
    assert json.loads(frame) == event  # the spelling is faithful: the client would decode the event
    assert leaks(json.loads(scrubber.text(frame)), secrets) == []
    assert leaks(json.loads(scrubber.data(frame.encode())), secrets) == []


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=120),
    st.sampled_from(SECRETS),
    st.integers(0, len(KEY)),
    st.randoms(use_true_random=False),
)
def test_property_a_close_reason_fits_and_holds_no_secret(
    before: str, secret: str, cut: int, rng: random.Random
) -> None:
    """Any reason with a secret in any case, possibly cut short at the end: at most 123 bytes of valid UTF-8,
    no whole secret, and no end that is the first PARTIAL_MIN or more characters of one."""
    out = SCRUBBER.reason(before + scrambled_case(secret, rng)[:cut])
    raw = out.encode()  # raises if a character was cut in half (a lone surrogate)
    assert len(raw) <= MAX_REASON_BYTES
    assert all(s.lower() not in out.lower() for s in SECRETS)
    assert all(not out.lower().endswith(s.lower()[:size]) for s in SECRETS for size in range(PARTIAL_MIN, len(s) + 1))
