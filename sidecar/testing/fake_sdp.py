"""The fake provider's SDP side (sans-I/O): check a WebRTC offer and build the answer a provider would give.

`answer_sdp(offer, identity)` is pure: it mirrors the offer's m-lines (same order, media, protocol and mid;
a rejected m-line stays rejected), answers ICE with the identity's ufrag/pwd, DTLS with its fingerprint and
`setup:active` (RFC 8842: the answerer takes `active` unless the offerer already did), keeps `rtcp-mux` and the
BUNDLE group when offered (less its rejected mids), inverts the direction (sendonly <-> recvonly), keeps Opus
(else the first payload type) on audio, and answers a data channel with `sctp-port:5000`. It offers no ICE
candidates: the fake has no media (HD's aiortc peer, plugged in as the answerer, answers for real).

`check_offer` is what makes an offer acceptable at all (else `SdpError`, the provider's 400): it starts with
`v=0`, has an `o=` line and at least one `m=` line, each m-line has ICE credentials and a DTLS fingerprint
(its own or the session's). Lines may end with CRLF or LF; the answer always uses CRLF.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Final

CRLF: Final = "\r\n"
#: The SCTP port every WebRTC data channel answer names (RFC 8841; browsers use 5000).
SCTP_PORT: Final = 5000
_DIRECTIONS: Final = {"sendrecv": "sendrecv", "sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}
#: Media-level attributes the answer copies as they are, for the payload it keeps.
_PAYLOAD_ATTRIBUTES: Final = ("rtpmap", "fmtp", "rtcp-fb")


class SdpError(ValueError):
    """The offer is not a usable WebRTC offer (the message says why; it names no line content)."""


@dataclass(frozen=True, slots=True)
class AnswerIdentity:
    """The answerer's own ICE credentials, DTLS fingerprint and SDP session id."""

    ice_ufrag: str
    ice_pwd: str
    #: `sha-256 AB:CD:...` (the `a=fingerprint:` value).
    fingerprint: str
    session_id: int

    @classmethod
    def random(cls) -> AnswerIdentity:
        """A fresh identity (ufrag 8 characters, pwd 24, a random SHA-256-shaped fingerprint)."""
        fingerprint = ":".join(f"{byte:02X}" for byte in secrets.token_bytes(32))
        return cls(
            ice_ufrag=secrets.token_hex(4),
            ice_pwd=secrets.token_hex(12),
            fingerprint=f"sha-256 {fingerprint}",
            session_id=secrets.randbits(62),
        )


@dataclass
class Media:
    """One m-line of the offer and its attributes (`a=name:value`, or `a=flag` with value None)."""

    kind: str
    port: str
    proto: str
    formats: list[str]
    attributes: list[tuple[str, str | None]] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        """The first value of attribute `name` (None when absent or a flag)."""
        return next((value for key, value in self.attributes if key == name), None)

    def has(self, name: str) -> bool:
        return any(key == name for key, _ in self.attributes)


@dataclass
class Offer:
    """A parsed offer: its session-level attributes and its media sections, in order."""

    attributes: list[tuple[str, str | None]]
    media: list[Media]

    def session_get(self, name: str) -> str | None:
        return next((value for key, value in self.attributes if key == name), None)


def _attribute(line: str) -> tuple[str, str | None]:
    name, sep, value = line[2:].partition(":")
    return (name, value if sep else None)


def parse_offer(offer: str) -> Offer:
    """Split an SDP offer into session attributes and media sections. Raises SdpError when it is not SDP."""
    if not isinstance(offer, str):
        raise SdpError("The SDP offer must be text.")
    lines = [line.rstrip("\r") for line in offer.strip().split("\n") if line.strip()]
    if not lines or lines[0].strip() != "v=0":
        raise SdpError("The SDP offer must start with v=0.")
    if not any(line.startswith("o=") for line in lines):
        raise SdpError("The SDP offer has no origin (o=) line.")
    session: list[tuple[str, str | None]] = []
    media: list[Media] = []
    for line in lines:
        if len(line) < 2 or line[1] != "=":
            raise SdpError("The SDP offer has a line that is not `<type>=<value>`.")
        if line.startswith("m="):
            media.append(_media_line(line))
        elif line.startswith("a="):
            (media[-1].attributes if media else session).append(_attribute(line))
    if not media:
        raise SdpError("The SDP offer has no media (m=) section.")
    return Offer(attributes=session, media=media)


def _media_line(line: str) -> Media:
    parts = line[2:].split()
    if len(parts) < 4:
        raise SdpError("The SDP offer has an m-line without media, port, protocol and formats.")
    return Media(kind=parts[0], port=parts[1], proto=parts[2], formats=parts[3:])


def check_offer(offer: str) -> Offer:
    """The parsed offer when it is a usable WebRTC offer. Raises SdpError saying what is missing."""
    parsed = parse_offer(offer)
    for index, media in enumerate(parsed.media):
        for name in ("ice-ufrag", "ice-pwd", "fingerprint"):
            if media.get(name) is None and parsed.session_get(name) is None:
                raise SdpError(f"The SDP offer's m-line {index} has no a={name}.")
    return parsed


def _setup(offer: Offer, media: Media) -> str:
    """`active`, unless the offerer insists on being active itself."""
    offered = media.get("setup") or offer.session_get("setup") or "actpass"
    return "passive" if offered == "active" else "active"


def _kept_format(media: Media) -> list[str]:
    """Opus when offered (by its rtpmap), else the first payload type; a data channel keeps its format."""
    if media.kind != "audio":
        return media.formats[:1]
    for key, value in media.attributes:
        if key == "rtpmap" and value is not None and value.split(" ", 1)[-1].lower().startswith("opus/"):
            return [value.split(" ", 1)[0]]
    return media.formats[:1]


def _answer_media(offer: Offer, media: Media, identity: AnswerIdentity) -> list[str]:
    if media.port == "0":  # rejected in the offer: rejected in the answer
        lines = [f"m={media.kind} 0 {media.proto} {' '.join(media.formats)}"]
        mid = media.get("mid")
        return lines + ([f"a=mid:{mid}"] if mid is not None else [])
    formats = _kept_format(media)
    lines = [f"m={media.kind} 9 {media.proto} {' '.join(formats)}", "c=IN IP4 0.0.0.0"]
    if (mid := media.get("mid")) is not None:
        lines.append(f"a=mid:{mid}")
    lines += [
        f"a=ice-ufrag:{identity.ice_ufrag}",
        f"a=ice-pwd:{identity.ice_pwd}",
        f"a=fingerprint:{identity.fingerprint}",
        f"a=setup:{_setup(offer, media)}",
    ]
    if media.kind == "application":
        return [*lines, f"a=sctp-port:{SCTP_PORT}", "a=max-message-size:262144"]
    direction = next((d for d in _DIRECTIONS if media.has(d)), "sendrecv")
    lines.append(f"a={_DIRECTIONS[direction]}")
    if media.has("rtcp-mux"):
        lines.append("a=rtcp-mux")
    for key, value in media.attributes:
        if key in _PAYLOAD_ATTRIBUTES and value is not None and value.split(" ", 1)[0] in formats:
            lines.append(f"a={key}:{value}")
    return lines


def answer_sdp(offer: str, identity: AnswerIdentity) -> str:
    """The SDP answer to `offer` (module docstring). Pure. Raises SdpError when the offer is not usable."""
    parsed = check_offer(offer)
    lines = ["v=0", f"o=- {identity.session_id} 2 IN IP4 127.0.0.1", "s=-", "t=0 0"]
    bundle = parsed.session_get("group")
    if bundle is not None and bundle.split()[:1] == ["BUNDLE"]:
        rejected = {media.get("mid") for media in parsed.media if media.port == "0"}
        mids = [mid for mid in bundle.split()[1:] if mid not in rejected]
        if mids:
            lines.append(f"a=group:BUNDLE {' '.join(mids)}")
    lines.append("a=msid-semantic: WMS")
    for media in parsed.media:
        lines += _answer_media(parsed, media, identity)
    return CRLF.join(lines) + CRLF


_OFFER_FINGERPRINT: Final = (
    "sha-256 3C:4A:1F:86:0B:9E:27:D1:55:C8:6A:F0:12:7B:E4:93:AA:0D:5E:61:B8:2C:97:F3:40:1E:6D:C5:8A:72:09:BF"
)
#: A browser's offer (Chromium's shape: one Opus audio m-line, one data channel, BUNDLE, actpass), for tests
#: that need a valid offer without a browser (the sidecar's and the fake's create tests).
BROWSER_OFFER: Final = (
    CRLF.join(
        [
            "v=0",
            "o=- 4611731400430051336 2 IN IP4 127.0.0.1",
            "s=-",
            "t=0 0",
            "a=group:BUNDLE 0 1",
            "a=extmap-allow-mixed",
            "a=msid-semantic: WMS 9a7e1b7c-2f2b-4d4f-8c51-1f0e2f9b6c11",
            "m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126",
            "c=IN IP4 0.0.0.0",
            "a=rtcp:9 IN IP4 0.0.0.0",
            "a=ice-ufrag:Qm3x",
            "a=ice-pwd:b2Vw4k8n1XoQ7rT5yZ0aLc6d",
            "a=ice-options:trickle",
            f"a=fingerprint:{_OFFER_FINGERPRINT}",
            "a=setup:actpass",
            "a=mid:0",
            "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
            "a=sendrecv",
            "a=msid:9a7e1b7c-2f2b-4d4f-8c51-1f0e2f9b6c11 0b6c3a8e-7d41-4a2f-9e35-5c1d2b8f4e60",
            "a=rtcp-mux",
            "a=rtcp-rsize",
            "a=rtpmap:111 opus/48000/2",
            "a=rtcp-fb:111 transport-cc",
            "a=fmtp:111 minptime=10;useinbandfec=1",
            "a=rtpmap:63 red/48000/2",
            "a=fmtp:63 111/111",
            "a=rtpmap:9 G722/8000",
            "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:8 PCMA/8000",
            "a=rtpmap:13 CN/8000",
            "a=rtpmap:110 telephone-event/48000",
            "a=rtpmap:126 telephone-event/8000",
            "a=ssrc:3735928559 cname:Yq2pW8rT1vX5zB3n",
            "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
            "c=IN IP4 0.0.0.0",
            "a=ice-ufrag:Qm3x",
            "a=ice-pwd:b2Vw4k8n1XoQ7rT5yZ0aLc6d",
            "a=ice-options:trickle",
            f"a=fingerprint:{_OFFER_FINGERPRINT}",
            "a=setup:actpass",
            "a=mid:1",
            "a=sctp-port:5000",
            "a=max-message-size:262144",
        ]
    )
    + CRLF
)
