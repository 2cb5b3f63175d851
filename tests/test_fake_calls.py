"""The fake provider's WebRTC side (sidecar/testing/fake_calls.py): the SDK's calls, sideband and hangup
against it, the Azure paths, the faults, and plain HTTP for misuse. The SDP answer builder and the request
parsers are pure and tested first."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import openai
import orjson
import pytest
import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import AsyncOpenAI
from websockets.exceptions import ConnectionClosed, InvalidStatus

from sidecar.catalog import LIVE_ENDPOINT, REALTIME_ENDPOINT
from sidecar.testing.fake_call_protocol import (
    BadRequest,
    LiveCallProtocol,
    RealtimeCallProtocol,
    parse_live_create,
    parse_realtime_create,
)
from sidecar.testing.fake_calls import DEFAULT_API_KEY, FakeCall, FakeCallProvider
from sidecar.testing.fake_provider import response_usage
from sidecar.testing.fake_sdp import BROWSER_OFFER, AnswerIdentity, SdpError, answer_sdp, check_offer, parse_offer
from sidecar.testing.fake_wire import Event

IDENTITY = AnswerIdentity(ice_ufrag="abcd1234", ice_pwd="p" * 24, fingerprint="sha-256 AA:BB", session_id=42)
REALTIME_SESSION: dict[str, Any] = {"type": "realtime", "model": "gpt-realtime"}
LIVE_SESSION: dict[str, Any] = {"model": "gpt-live-1"}


# ---- the SDP answer (pure) -------------------------------------------------------------------------------


def _lines(sdp: str) -> list[str]:
    return sdp.split("\r\n")


def test_answer_mirrors_the_offers_m_lines_with_its_own_ice_and_dtls() -> None:
    """Each offered m-line is answered in order with its mid, the answerer's ICE/DTLS, setup:active."""
    answer = answer_sdp(BROWSER_OFFER, IDENTITY)
    parsed = parse_offer(answer)
    assert [(m.kind, m.proto, m.get("mid")) for m in parsed.media] == [
        ("audio", "UDP/TLS/RTP/SAVPF", "0"),
        ("application", "UDP/DTLS/SCTP", "1"),
    ]
    for media in parsed.media:
        assert media.get("ice-ufrag") == "abcd1234"
        assert media.get("ice-pwd") == "p" * 24
        assert media.get("fingerprint") == "sha-256 AA:BB"
        assert media.get("setup") == "active"
    assert parsed.session_get("group") == "BUNDLE 0 1"
    assert answer.endswith("\r\n") and "\n" not in answer.replace("\r\n", "")


def test_answer_keeps_opus_rtcp_mux_and_answers_the_data_channel() -> None:
    """Audio keeps Opus only (its rtpmap/fmtp), rtcp-mux, sendrecv; the data channel gets sctp-port 5000."""
    audio, data = parse_offer(answer_sdp(BROWSER_OFFER, IDENTITY)).media
    assert audio.formats == ["111"]
    assert audio.get("rtpmap") == "111 opus/48000/2"
    assert audio.get("fmtp") == "111 minptime=10;useinbandfec=1"
    assert audio.has("rtcp-mux") and audio.has("sendrecv")
    assert data.formats == ["webrtc-datachannel"]
    assert data.get("sctp-port") == "5000"


def test_answer_inverts_direction_and_keeps_a_rejected_m_line_rejected() -> None:
    """sendonly is answered recvonly; a port-0 m-line stays port 0; setup:active offer -> passive."""
    offer = (
        BROWSER_OFFER.replace("a=sendrecv", "a=sendonly")
        .replace("m=application 9", "m=application 0")
        .replace("a=setup:actpass\r\na=mid:0", "a=setup:active\r\na=mid:0")
    )
    audio, data = parse_offer(answer_sdp(offer, IDENTITY)).media
    assert audio.has("recvonly") and not audio.has("sendrecv")
    assert audio.get("setup") == "passive"
    assert data.port == "0" and data.get("ice-ufrag") is None
    assert parse_offer(answer_sdp(offer, IDENTITY)).session_get("group") == "BUNDLE 0"


def test_answer_without_opus_keeps_the_first_payload_and_accepts_lf_and_session_level_ice() -> None:
    """An LF-only offer with session-level ICE/DTLS and no Opus: answered with its first payload type."""
    offer = "\n".join(
        [
            "v=0",
            "o=- 1 1 IN IP4 0.0.0.0",
            "s=-",
            "t=0 0",
            "a=ice-ufrag:u",
            "a=ice-pwd:pppppppppppppppppppppp",
            "a=fingerprint:sha-256 00:11",
            "m=audio 9 UDP/TLS/RTP/SAVPF 0 8",
            "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:8 PCMA/8000",
        ]
    )
    (audio,) = parse_offer(answer_sdp(offer, IDENTITY)).media
    assert audio.formats == ["0"]
    assert audio.get("rtpmap") == "0 PCMU/8000"


@pytest.mark.parametrize(
    ("offer", "why"),
    [
        ("", "v=0"),
        ("hello", "v=0"),
        ("v=0\r\ns=-\r\nm=audio 9 RTP/AVP 0", "origin"),
        ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0", "no media"),
        ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\nm=audio 9", "m-line"),
        ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\nbad line\r\nm=audio 9 RTP/AVP 0", "<type>=<value>"),
        (BROWSER_OFFER.replace("a=fingerprint", "a=x-fingerprint"), "a=fingerprint"),
        (BROWSER_OFFER.replace("a=ice-pwd", "a=x-ice-pwd"), "a=ice-pwd"),
    ],
)
def test_unusable_offers_are_refused_with_the_reason(offer: str, why: str) -> None:
    """Not SDP, no origin, no media, a short m-line, a malformed line, no ICE or DTLS -> SdpError."""
    with pytest.raises(SdpError, match=why):
        check_offer(offer)


async def test_a_real_webrtc_stack_accepts_the_answer_to_its_own_offer() -> None:
    """aiortc's offer (audio + data channel) passes check_offer, and aiortc takes answer_sdp's answer as its
    remote description (signaling state stable)."""
    pc = RTCPeerConnection()
    try:
        pc.addTransceiver("audio", direction="sendrecv")
        pc.createDataChannel("oai-events")
        await pc.setLocalDescription(await pc.createOffer())
        offer = pc.localDescription.sdp
        assert [m.kind for m in check_offer(offer).media] == ["audio", "application"]
        await pc.setRemoteDescription(RTCSessionDescription(answer_sdp(offer, AnswerIdentity.random()), "answer"))
        assert pc.signalingState == "stable"
    finally:
        await pc.close()


_MEDIA = st.tuples(
    st.sampled_from(["audio", "video", "application"]),
    st.booleans(),  # rejected (port 0)
    st.sampled_from(["sendrecv", "sendonly", "recvonly", "inactive"]),
    st.sampled_from(["actpass", "active", "passive"]),
)


@settings(max_examples=60, deadline=None)
@given(media=st.lists(_MEDIA, min_size=1, max_size=5), crlf=st.booleans())
def test_any_offer_is_answered_line_for_line(media: list[tuple[str, bool, str, str]], crlf: bool) -> None:
    """For any offer: one answer m-line per offered m-line, same kind and mid, rejected ones rejected, the
    direction inverted, setup never the offerer's own active, BUNDLE only the accepted mids."""
    lines = ["v=0", "o=- 1 1 IN IP4 0.0.0.0", "s=-", "t=0 0", f"a=group:BUNDLE {' '.join(map(str, range(len(media))))}"]
    for mid, (kind, rejected, direction, setup) in enumerate(media):
        proto, fmt = ("UDP/DTLS/SCTP", "webrtc-datachannel") if kind == "application" else ("UDP/TLS/RTP/SAVPF", "96")
        lines += [f"m={kind} {0 if rejected else 9} {proto} {fmt}", f"a=mid:{mid}", "a=ice-ufrag:u", "a=ice-pwd:p"]
        lines += ["a=fingerprint:sha-256 00", f"a=setup:{setup}", f"a={direction}", "a=rtpmap:96 opus/48000/2"]
    answer = parse_offer(answer_sdp(("\r\n" if crlf else "\n").join(lines), IDENTITY))
    inverse = {"sendrecv": "sendrecv", "sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}
    assert [(m.kind, m.get("mid")) for m in answer.media] == [(kind, str(i)) for i, (kind, *_) in enumerate(media)]
    for answered, (kind, rejected, direction, setup) in zip(answer.media, media, strict=True):
        assert (answered.port == "0") == rejected
        if not rejected:
            assert answered.get("setup") == ("passive" if setup == "active" else "active")
            assert kind == "application" or answered.has(inverse[direction])
    accepted = [str(i) for i, (_, rejected, *_) in enumerate(media) if not rejected]
    assert answer.session_get("group") == (f"BUNDLE {' '.join(accepted)}" if accepted else None)


def test_random_identities_differ() -> None:
    """Every answer gets its own ICE credentials and fingerprint."""
    first, second = AnswerIdentity.random(), AnswerIdentity.random()
    assert first.ice_ufrag != second.ice_ufrag and first.fingerprint != second.fingerprint
    assert len(first.fingerprint.split()[1].split(":")) == 32


# ---- the create requests (pure) --------------------------------------------------------------------------


def _multipart(parts: dict[str, tuple[str, bytes]]) -> tuple[str, bytes]:
    boundary = "----hc0123456789"
    body = b""
    for name, (kind, payload) in parts.items():
        body += (
            (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\nContent-Type: {kind}\r\n\r\n').encode()
            + payload
            + b"\r\n"
        )
    return f"multipart/form-data; boundary={boundary}", body + f"--{boundary}--\r\n".encode()


def test_realtime_create_reads_multipart_and_plain_sdp() -> None:
    """Multipart sdp + session (model from the session), or application/sdp (model from the query)."""
    content_type, body = _multipart(
        {"sdp": ("application/sdp", BROWSER_OFFER.encode()), "session": ("application/json", b'{"model": "m1"}')}
    )
    created = parse_realtime_create(content_type, body, query_model="ignored")
    assert (created.sdp, created.session, created.model) == (BROWSER_OFFER, {"model": "m1"}, "m1")
    plain = parse_realtime_create("application/sdp", BROWSER_OFFER.encode(), query_model="m2")
    assert (plain.session, plain.model) == ({}, "m2")


def test_realtime_create_takes_a_transcription_calls_model_from_its_transcription() -> None:
    """A transcription session names its model under audio.input.transcription."""
    session = {"type": "transcription", "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}}}
    content_type, body = _multipart(
        {"sdp": ("application/sdp", BROWSER_OFFER.encode()), "session": ("application/json", orjson.dumps(session))}
    )
    assert parse_realtime_create(content_type, body, query_model=None).model == "gpt-4o-transcribe"


@pytest.mark.parametrize(
    ("content_type", "body", "code"),
    [
        ("application/json", b"{}", "unsupported_content_type"),
        ("application/sdp", b"  ", "missing_required_parameter"),
        ("application/sdp", b"\xff\xfe", "invalid_value"),
        (*_multipart({"session": ("application/json", b"{}")}), "missing_required_parameter"),
        (*_multipart({"sdp": ("application/sdp", b"v=0"), "session": ("application/json", b"{")}), "invalid_json"),
        (*_multipart({"sdp": ("application/sdp", b"v=0"), "session": ("application/json", b"[]")}), "invalid_type"),
        ("multipart/form-data", b"garbage", "invalid_multipart"),
    ],
)
def test_bad_realtime_creates_are_400(content_type: str, body: bytes, code: str) -> None:
    """Wrong content type, no SDP, bad session JSON, unreadable multipart -> BadRequest 400 with a code."""
    with pytest.raises(BadRequest) as caught:
        parse_realtime_create(content_type, body, query_model=None)
    assert (caught.value.status, caught.value.code) == (400, code)
    assert caught.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"[]", "body"),
        (b"{}", "session"),
        (b'{"session": {}, "transport": {"type": "webrtc", "sdp": "v=0"}}', "session.model"),
        (b'{"session": {"model": "gpt-live-1"}, "transport": {"type": "websocket"}}', "transport.type"),
        (b'{"session": {"model": "gpt-live-1"}, "transport": {"type": "webrtc"}}', "sdp"),
    ],
)
def test_bad_live_creates_are_400(body: bytes, param: str) -> None:
    """GPT-Live create needs session.model and a webrtc transport with an SDP."""
    with pytest.raises(BadRequest) as caught:
        parse_live_create(body)
    assert caught.value.param == param


# ---- the sideband protocols (pure) ------------------------------------------------------------------------


def test_realtime_protocol_answers_client_events_and_errors_to_the_sender() -> None:
    """response.create -> created + done with usage (broadcast); bad input -> an error for the sender only."""
    protocol = RealtimeCallProtocol(model="gpt-realtime", session=REALTIME_SESSION)
    (created,) = protocol.opening()
    assert created["type"] == "session.created" and created["session"]["model"] == "gpt-realtime"
    reply = protocol.receive('{"type": "response.create"}')
    assert [e["type"] for e in reply.broadcast] == ["response.created", "response.done"]
    assert reply.broadcast[1]["response"]["usage"] == response_usage()
    updated = protocol.receive('{"type": "session.update", "session": {"instructions": "hi"}}').broadcast[0]
    assert updated["session"]["instructions"] == "hi" and updated["session"]["model"] == "gpt-realtime"
    received = {"type": "realtime", "turn_detection": {"type": "server_vad"}}
    nested = RealtimeCallProtocol(model="m", session=received)
    nested.receive('{"type": "session.update", "session": {"turn_detection": {"type": "semantic_vad"}}}')
    assert received == {"type": "realtime", "turn_detection": {"type": "server_vad"}}  # what was received stays
    for bad in (b"\x00", "{", "[]", '{"type": "nope", "event_id": "e1"}', '{"type": "session.update"}'):
        answered = protocol.receive(bad)
        assert answered.broadcast == [] and [e["type"] for e in answered.direct] == ["error"]
    assert protocol.receive('{"type": "nope", "event_id": "e1"}').direct[0]["error"]["event_id"] == "e1"


def test_live_protocol_closes_the_session_and_refuses_a_model_change() -> None:
    """session.close -> session.closed with the last usage and the call ends; session.model is immutable."""
    protocol = LiveCallProtocol(call_id="sess_1", session=LIVE_SESSION, created_at=1000.0, transcript="a b c d")
    (started,) = protocol.opening()
    assert started["session"] | {} == {
        "model": "gpt-live-1",
        "id": "sess_1",
        "object": "live.session",
        "status": "active",
        "expires_at": 4600,
    }
    received = {"model": "gpt-live-1", "audio": {"output": {"voice": "marin"}}}
    nested = LiveCallProtocol(call_id="sess_2", session=received, created_at=0.0, transcript="")
    nested.receive('{"type": "session.update", "session": {"audio": {"output": {"voice": "cedar"}}}}')
    assert received["audio"] == {"output": {"voice": "marin"}}
    refused = protocol.receive('{"type": "session.update", "session": {"model": "x"}, "event_id": "c1"}')
    assert refused.direct[0]["error"]["code"] == "immutable_parameter"
    assert refused.direct[0]["client_event_id"] == "c1"
    protocol.usage_updated({"seconds": 7})
    closed = protocol.receive('{"type": "session.close", "event_id": "c2"}')
    assert closed.end and closed.broadcast[0]["usage"] == {"seconds": 7}
    assert closed.broadcast[0]["client_event_id"] == "c2"
    deltas = protocol.receive('{"type": "response.create"}').broadcast
    assert "".join(e["delta"] for e in deltas) == "a b c d"


def test_every_server_event_has_a_unique_event_id() -> None:
    """Openings, replies and helpers each get a fresh event_id."""
    protocol = RealtimeCallProtocol(model="m", session={})
    events = protocol.opening() + protocol.receive('{"type": "response.create"}').broadcast
    events.append(protocol.response_done({}))
    events.append(protocol.transcription_completed(seconds=1.0, text="x", usage=None))
    ids = [e["event_id"] for e in events]
    assert len(set(ids)) == len(ids) == 5


# ---- the server, with the SDK -----------------------------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeCallProvider]:
    async with FakeCallProvider() as provider:
        yield provider


SdkFactory = Callable[..., AsyncOpenAI]


@pytest.fixture
async def sdk(fake: FakeCallProvider) -> AsyncIterator[SdkFactory]:
    """`sdk(key=..., azure=...)`: an SDK client of the fake (closed after the test). Azure: the v1 paths,
    the key in `api-key` (its Bearer carries something else)."""
    made: list[AsyncOpenAI] = []

    def make(*, key: str = DEFAULT_API_KEY, azure: bool = False) -> AsyncOpenAI:
        if azure:
            client = AsyncOpenAI(
                base_url=f"{fake.url}/openai/v1", api_key="not-the-key", default_headers={"api-key": key}, max_retries=0
            )
        else:
            client = AsyncOpenAI(base_url=f"{fake.url}/v1", api_key=key, max_retries=0)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


async def _next(connection: Any, kind: str) -> Any:
    async for event in connection:
        if event.type == kind:
            return event
    raise AssertionError(f"connection ended before {kind}")


async def test_sdk_creates_a_realtime_call_and_gets_the_answer_and_location(
    fake: FakeCallProvider, sdk: SdkFactory
) -> None:
    """calls.create (multipart sdp + session) -> 201, an SDP answer to the offer, Location naming the call."""
    client = sdk()
    raw = await client.realtime.calls.with_raw_response.create(sdp=BROWSER_OFFER, session=REALTIME_SESSION)
    call = await fake.wait_for_call()
    assert raw.http_response.status_code == 201
    assert raw.headers["location"] == f"/v1/realtime/calls/{call.call_id}"
    assert call.call_id.startswith("rtc_")
    assert raw.http_response.text == call.answer_sdp
    assert [m.get("mid") for m in check_offer(call.answer_sdp).media] == ["0", "1"]
    assert (call.route, call.model, call.azure) == (REALTIME_ENDPOINT, "gpt-realtime", False)
    assert call.session == REALTIME_SESSION
    assert call.offer_sdp == BROWSER_OFFER
    assert call.auth == f"Bearer {DEFAULT_API_KEY}"
    assert fake.offer_attempts == 1


async def test_sideband_sees_session_created_and_every_emitted_event(fake: FakeCallProvider, sdk: SdkFactory) -> None:
    """The SDK's connect(call_id=) attaches; it gets session.created, then response.done and transcription
    usage as emitted, with the given usage."""
    client = sdk()
    await client.realtime.calls.create(sdp=BROWSER_OFFER, session=REALTIME_SESSION)
    call = await fake.wait_for_call()
    async with client.realtime.connect(call_id=call.call_id) as connection:
        created = await connection.recv()
        assert created.type == "session.created" and created.session.model == "gpt-realtime"
        sideband = await call.wait_for_sideband()
        assert sideband.query["call_id"] == call.call_id and call.sideband_count == 1
        assert (fake.requests[-1].method, fake.requests[-1].query) == ("WEBSOCKET", {"call_id": call.call_id})
        usage = {"total_tokens": 3, "input_tokens": 2, "output_tokens": 1}
        await call.response_done(usage=usage)
        done = await connection.recv()
        assert done.type == "response.done" and done.response.usage.total_tokens == 3
        await call.transcription_completed(seconds=2.5, text="hello")
        completed = await connection.recv()
        assert completed.type == "conversation.item.input_audio_transcription.completed"
        assert completed.transcript == "hello" and completed.usage.seconds == 2.5
    await sideband.closed.wait()
    assert call.sideband_count == 0 and not call.ended.is_set()


async def test_a_sideband_response_create_reaches_every_sideband(fake: FakeCallProvider, sdk: SdkFactory) -> None:
    """A client event on one sideband: its replies (response.created/done with usage) go to both sidebands."""
    client = sdk()
    await client.realtime.calls.create(sdp=BROWSER_OFFER, session=REALTIME_SESSION)
    call = await fake.wait_for_call()
    async with client.realtime.connect(call_id=call.call_id) as first:
        async with client.realtime.connect(call_id=call.call_id) as second:
            await call.wait_for_sideband(2)
            await second.response.create()
            for connection in (first, second):
                done = await _next(connection, "response.done")
                assert done.response.usage.total_tokens == response_usage()["total_tokens"]
    assert call.sidebands[1].events == [{"type": "response.create"}]


async def test_hangup_ends_the_call_and_closes_its_sidebands_with_1000(fake: FakeCallProvider, sdk: SdkFactory) -> None:
    """calls.hangup -> 200; the sideband closes with 1000 (the SDK's iteration ends); hung_up, hangups == 1;
    a second hangup and a new sideband are 404."""
    client = sdk()
    await client.realtime.calls.create(sdp=BROWSER_OFFER, session=REALTIME_SESSION)
    call = await fake.wait_for_call()
    async with client.realtime.connect(call_id=call.call_id) as connection:
        await connection.recv()
        await client.realtime.calls.hangup(call.call_id)
        assert [event.type async for event in connection] == []
    sideband = await call.wait_for_sideband()
    await sideband.closed.wait()
    assert sideband.close_code == 1000
    assert call.hung_up.is_set() and call.ended.is_set() and call.end_reason == "hangup"
    assert fake.hangups == 1
    with pytest.raises(openai.NotFoundError):
        await client.realtime.calls.hangup(call.call_id)
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(
            f"{fake.url.replace('http', 'ws')}/v1/realtime?call_id={call.call_id}",
            additional_headers={"Authorization": f"Bearer {DEFAULT_API_KEY}"},
        )
    assert refused.value.response.status_code == 404
    assert fake.hangups == 1


async def test_azure_paths_take_the_api_key_header(fake: FakeCallProvider, sdk: SdkFactory) -> None:
    """/openai/v1/realtime/calls, its sideband and hangup with `api-key`; Location on the Azure path."""
    client = sdk(azure=True)
    raw = await client.realtime.calls.with_raw_response.create(sdp=BROWSER_OFFER, session=REALTIME_SESSION)
    call = await fake.wait_for_call()
    assert raw.headers["location"] == f"/openai/v1/realtime/calls/{call.call_id}"
    assert call.azure and call.auth == DEFAULT_API_KEY
    async with client.realtime.connect(call_id=call.call_id) as connection:
        assert (await connection.recv()).type == "session.created"
        assert (await call.wait_for_sideband()).path == "/openai/v1/realtime"
        await client.realtime.calls.hangup(call.call_id)
        assert [event.type async for event in connection] == []
    assert call.hung_up.is_set()


async def test_a_bearer_key_does_not_open_an_azure_path_nor_an_api_key_an_openai_path(fake: FakeCallProvider) -> None:
    """Each path family takes its own credential header only: 401 invalid_api_key otherwise."""
    async with httpx.AsyncClient(base_url=fake.url) as http:
        azure = await http.post(
            "/openai/v1/realtime/calls",
            content=BROWSER_OFFER,
            headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {DEFAULT_API_KEY}"},
        )
        openai_path = await http.post(
            "/v1/realtime/calls",
            content=BROWSER_OFFER,
            headers={"Content-Type": "application/sdp", "api-key": DEFAULT_API_KEY},
        )
    for response in (azure, openai_path):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert fake.calls == [] and fake.offer_attempts == 0
    assert [(r.method, r.path, r.headers.get("api-key")) for r in fake.requests] == [
        ("POST", "/openai/v1/realtime/calls", None),
        ("POST", "/v1/realtime/calls", DEFAULT_API_KEY),
    ]


# ---- misuse, with plain HTTP -------------------------------------------------------------------------------


async def test_a_wrong_key_is_401_with_the_key_masked(fake: FakeCallProvider, sdk: SdkFactory) -> None:
    """calls.create with another key -> 401 invalid_api_key naming only the key's ends; no call kept; a hangup
    with another key (either path) -> 401, the call goes on."""
    with pytest.raises(openai.AuthenticationError) as refused:
        await sdk(key="sk-wrong-key-0123456789").realtime.calls.create(sdp=BROWSER_OFFER)
    body = refused.value.response.json()
    assert body["error"]["code"] == "invalid_api_key"
    assert "wrong-key" not in body["error"]["message"] and body["error"]["message"].endswith("6789.")
    assert fake.calls == []
    await sdk().realtime.calls.create(sdp=BROWSER_OFFER, session=REALTIME_SESSION)
    call = await fake.wait_for_call()
    for client in (sdk(key="sk-wrong-key-0123456789"), sdk(key="sk-wrong-key-0123456789", azure=True)):
        with pytest.raises(openai.AuthenticationError):
            await client.realtime.calls.hangup(call.call_id)
    assert not call.ended.is_set() and fake.hangups == 0


async def test_plain_sdp_create_takes_the_model_from_the_query(fake: FakeCallProvider) -> None:
    """POST application/sdp ?model= -> 201 with an application/sdp answer; the call's model is the query's."""
    async with httpx.AsyncClient(base_url=fake.url) as http:
        response = await http.post(
            "/v1/realtime/calls?model=gpt-realtime-mini",
            content=BROWSER_OFFER,
            headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {DEFAULT_API_KEY}"},
        )
    assert response.status_code == 201
    assert response.headers["content-type"].startswith("application/sdp")
    call = await fake.wait_for_call()
    assert (call.model, call.session) == ("gpt-realtime-mini", {})


@pytest.mark.parametrize(
    ("content", "code"),
    [
        ("", "missing_required_parameter"),
        ("not sdp", "invalid_offer"),
        ("v=0\r\no=- 1 1 IN IP4 0.0.0.0", "invalid_offer"),
    ],
)
async def test_a_missing_or_invalid_sdp_is_400(fake: FakeCallProvider, content: str, code: str) -> None:
    """An empty or unusable offer -> 400 with an OpenAI-shaped error; no call kept."""
    async with httpx.AsyncClient(base_url=fake.url) as http:
        response = await http.post(
            "/v1/realtime/calls",
            content=content,
            headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {DEFAULT_API_KEY}"},
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == code and response.json()["error"]["type"] == "invalid_request_error"
    assert fake.calls == []


async def test_an_unknown_call_is_404_for_sideband_and_hangup(fake: FakeCallProvider, sdk: SdkFactory) -> None:
    """A sideband or hangup naming no call -> 404 before any upgrade; a sideband without call_id -> 400."""
    headers = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}
    ws = fake.url.replace("http", "ws")
    for query, status in (("?call_id=rtc_nope", 404), ("", 400)):
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(f"{ws}/v1/realtime{query}", additional_headers=headers)
        assert refused.value.response.status_code == status
        assert orjson.loads(refused.value.response.body)["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        await sdk().realtime.calls.hangup("rtc_nope")
    async with httpx.AsyncClient(base_url=fake.url) as http:
        unknown = await http.get("/v1/elsewhere", headers=headers)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"


async def test_a_sideband_with_a_wrong_key_is_401(fake: FakeCallProvider, sdk: SdkFactory) -> None:
    """The sideband upgrade checks the key like the create."""
    await sdk().realtime.calls.create(sdp=BROWSER_OFFER, session=REALTIME_SESSION)
    call = await fake.wait_for_call()
    with pytest.raises(InvalidStatus) as refused:
        async with sdk(key="sk-other-key-000000000").realtime.connect(call_id=call.call_id):
            pass
    assert refused.value.response.status_code == 401
    assert call.attach_attempts == 0 and call.sidebands == []


async def test_bad_client_events_on_a_sideband_get_errors_and_the_sideband_lives(
    fake: FakeCallProvider, sdk: SdkFactory
) -> None:
    """Malformed JSON, a binary frame, an unknown type: an error each, to the sender; the sideband stays up."""
    await sdk().realtime.calls.create(sdp=BROWSER_OFFER, session=REALTIME_SESSION)
    call = await fake.wait_for_call()
    url = f"{fake.url.replace('http', 'ws')}/v1/realtime?call_id={call.call_id}"
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {DEFAULT_API_KEY}"}) as ws:
        assert orjson.loads(await ws.recv())["type"] == "session.created"
        for frame in ("{", b"\x01", '{"type": "nope"}'):
            await ws.send(frame)
            assert orjson.loads(await ws.recv())["type"] == "error"
        await ws.send('{"type": "response.create"}')
        assert orjson.loads(await ws.recv())["type"] == "response.created"
    sideband = await call.wait_for_sideband()
    assert sideband.events == [{"type": "nope"}, {"type": "response.create"}]


# ---- faults ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "kind"), [(503, openai.InternalServerError), (429, openai.RateLimitError)])
async def test_refuse_offer_status_refuses_creates(
    fake: FakeCallProvider, sdk: SdkFactory, status: int, kind: type[Exception]
) -> None:
    """refuse_offer_status -> that status with an OpenAI-shaped error; counted in offer_attempts; no call."""
    fake.refuse_offer_status = status
    with pytest.raises(kind):
        await sdk().realtime.calls.create(sdp=BROWSER_OFFER, session=REALTIME_SESSION)
    assert fake.offer_attempts == 1 and fake.calls == []
    fake.refuse_offer_status = None
    await sdk().realtime.calls.create(sdp=BROWSER_OFFER, session=REALTIME_SESSION)
    assert len(fake.calls) == 1 and fake.offer_attempts == 2


async def test_refuse_sideband_status_refuses_attaches_until_cleared(fake: FakeCallProvider, sdk: SdkFactory) -> None:
    """refuse_sideband_status -> the upgrade is refused with it (counted as an attempt); cleared -> attaches."""
    client = sdk()
    await client.realtime.calls.create(sdp=BROWSER_OFFER, session=REALTIME_SESSION)
    call = await fake.wait_for_call()
    fake.refuse_sideband_status = 503
    with pytest.raises(InvalidStatus) as refused:
        async with client.realtime.connect(call_id=call.call_id):
            pass
    assert refused.value.response.status_code == 503
    assert call.attach_attempts == 1 and call.sidebands == []
    fake.refuse_sideband_status = None
    async with client.realtime.connect(call_id=call.call_id) as connection:
        assert (await connection.recv()).type == "session.created"
    assert call.attach_attempts == 2


async def test_drop_sideband_after_aborts_without_a_close_frame(fake: FakeCallProvider, sdk: SdkFactory) -> None:
    """drop_sideband_after=2: session.created and one emitted event arrive, then the TCP connection is
    aborted (no close frame either way); the call goes on and a new sideband attaches."""
    client = sdk()
    await client.realtime.calls.create(sdp=BROWSER_OFFER, session=REALTIME_SESSION)
    call = await fake.wait_for_call()
    fake.drop_sideband_after = 2
    url = f"{fake.url.replace('http', 'ws')}/v1/realtime?call_id={call.call_id}"
    headers = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}
    async with websockets.connect(url, additional_headers=headers) as ws:
        assert orjson.loads(await ws.recv())["type"] == "session.created"
        await call.response_done()
        assert orjson.loads(await ws.recv())["type"] == "response.done"
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is None  # no close frame
    sideband = await call.wait_for_sideband()
    await sideband.closed.wait()
    assert sideband.close_code is None and sideband.sent == 2 and not call.ended.is_set()
    fake.drop_sideband_after = None
    async with client.realtime.connect(call_id=call.call_id) as connection:
        assert (await connection.recv()).type == "session.created"
    assert len(call.sidebands) == 2


async def test_hangup_status_refuses_hangups_and_the_call_goes_on(fake: FakeCallProvider, sdk: SdkFactory) -> None:
    """hangup_status=500 -> the hangup fails; the call and its sideband go on; cleared -> it ends."""
    client = sdk()
    await client.realtime.calls.create(sdp=BROWSER_OFFER, session=REALTIME_SESSION)
    call = await fake.wait_for_call()
    fake.hangup_status = 500
    async with client.realtime.connect(call_id=call.call_id) as connection:
        await connection.recv()
        with pytest.raises(openai.InternalServerError):
            await client.realtime.calls.hangup(call.call_id)
        assert not call.ended.is_set() and fake.hangups == 0
        await call.response_done()
        assert (await connection.recv()).type == "response.done"
        fake.hangup_status = None
        await client.realtime.calls.hangup(call.call_id)
        assert [event.type async for event in connection] == []
    assert fake.hangups == 1


async def test_drop_and_close_sidebands_leave_the_call_running(fake: FakeCallProvider, sdk: SdkFactory) -> None:
    """drop_sidebands aborts (no close code), close_sidebands(4000) closes cleanly; the call is not ended."""
    client = sdk()
    await client.realtime.calls.create(sdp=BROWSER_OFFER, session=REALTIME_SESSION)
    call = await fake.wait_for_call()
    url = f"{fake.url.replace('http', 'ws')}/v1/realtime?call_id={call.call_id}"
    headers = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}
    async with websockets.connect(url, additional_headers=headers) as ws:
        await ws.recv()
        await call.drop_sidebands()
        with pytest.raises(ConnectionClosed) as dropped:
            await ws.recv()
        assert dropped.value.rcvd is None
    async with websockets.connect(url, additional_headers=headers) as ws:
        await ws.recv()
        await call.close_sidebands(4000, "bye")
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4000
    assert [s.close_code for s in call.sidebands] == [None, 4000]
    assert call.sideband_count == 0 and not call.ended.is_set()


# ---- GPT-Live -------------------------------------------------------------------------------------------


async def _live_call(fake: FakeCallProvider, client: AsyncOpenAI) -> tuple[Any, FakeCall]:
    created = await client.live.create(session=LIVE_SESSION, transport={"type": "webrtc", "sdp": BROWSER_OFFER})
    return created, await fake.wait_for_call()


async def test_sdk_creates_a_live_session_with_the_answer(fake: FakeCallProvider, sdk: SdkFactory) -> None:
    """live.create -> 200 {session.id, transport webrtc + the SDP answer}; the call records the session."""
    created, call = await _live_call(fake, sdk())
    assert created.session.id == call.call_id and call.call_id.startswith("sess_")
    assert created.transport.type == "webrtc" and created.transport.sdp == call.answer_sdp
    assert (call.route, call.model, call.session, call.offer_sdp) == (
        LIVE_ENDPOINT,
        "gpt-live-1",
        LIVE_SESSION,
        BROWSER_OFFER,
    )


async def test_live_sideband_sees_session_started_and_usage(fake: FakeCallProvider, sdk: SdkFactory) -> None:
    """live.sideband.connect(session_id=) gets session.started (the call's session), then usage_updated's
    cumulative seconds (SessionUsage, with the breakdown when given)."""
    client = sdk()
    _, call = await _live_call(fake, client)
    async with client.live.sideband.connect(session_id=call.call_id) as connection:
        started = await connection.recv()
        assert started.type == "session.started"
        assert (started.session.id, started.session.model, started.session.status) == (
            call.call_id,
            "gpt-live-1",
            "active",
        )
        await call.usage_updated(12, active_seconds=10, paused_seconds=2)
        usage = await connection.recv()
        assert usage.type == "session.usage.updated"
        assert (usage.usage.seconds, usage.usage.active_seconds, usage.usage.paused_seconds) == (12, 10, 2)
    assert (await call.wait_for_sideband()).path == f"/v1/live/sessions/{call.call_id}/attach"


async def test_live_hangup_closes_the_sideband(fake: FakeCallProvider, sdk: SdkFactory) -> None:
    """live.sessions.hangup -> session.closed, then the sideband closes with 1000; the call is hung up; again -> 404."""
    client = sdk()
    _, call = await _live_call(fake, client)
    async with client.live.sideband.connect(session_id=call.call_id) as connection:
        await connection.recv()
        await client.live.sessions.hangup(call.call_id)
        assert [event.type async for event in connection] == ["session.closed"]
    assert call.hung_up.is_set() and fake.hangups == 1
    assert (await call.wait_for_sideband()).close_code == 1000
    with pytest.raises(openai.NotFoundError):
        await client.live.sessions.hangup(call.call_id)


async def test_live_session_close_on_a_sideband_ends_the_call(fake: FakeCallProvider, sdk: SdkFactory) -> None:
    """session.close on one sideband: every sideband gets session.closed with the last usage, then 1000."""
    client = sdk()
    _, call = await _live_call(fake, client)
    async with client.live.sideband.connect(session_id=call.call_id) as watcher:
        await watcher.recv()
        async with client.live.sideband.connect(session_id=call.call_id) as closer:
            await closer.recv()
            await call.usage_updated(5)
            await closer.session.close(event_id="c1")
            remaining = [event async for event in closer]
        assert [e.type for e in remaining] == ["session.usage.updated", "session.closed"]
        assert remaining[1].usage.seconds == 5 and remaining[1].client_event_id == "c1"
        assert [event.type async for event in watcher] == ["session.usage.updated", "session.closed"]
    assert call.ended.is_set() and call.end_reason == "session_close" and not call.hung_up.is_set()


async def test_live_paths_on_azure_and_live_misuse(fake: FakeCallProvider, sdk: SdkFactory) -> None:
    """Azure /openai/v1/live/sessions with api-key; a realtime call id on the live paths is 404; a model
    change on the sideband is refused to the sender only."""
    client = sdk(azure=True)
    created, call = await _live_call(fake, client)
    assert call.azure and created.session.id == call.call_id
    async with client.live.sideband.connect(session_id=call.call_id) as connection:
        await connection.recv()
        await connection.session.update(session={"model": "gpt-live-2"}, event_id="u1")
        refused = await connection.recv()
        assert refused.type == "error" and refused.error.code == "immutable_parameter"
    rtc = await sdk().realtime.calls.create(sdp=BROWSER_OFFER, session=REALTIME_SESSION)
    assert rtc.text.startswith("v=0")
    realtime = await fake.wait_for_call(1)
    with pytest.raises(openai.NotFoundError):
        await sdk().live.sessions.hangup(realtime.call_id)
    with pytest.raises(TypeError):
        await realtime.usage_updated(1)
    with pytest.raises(TypeError):
        await call.response_done()


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"session": {"model": "gpt-live-1"}, "transport": {"type": "webrtc", "sdp": "nope"}}, 400),
        ({"session": {}, "transport": {"type": "webrtc", "sdp": BROWSER_OFFER}}, 400),
    ],
)
async def test_bad_live_creates_are_refused_over_http(fake: FakeCallProvider, body: Any, status: int) -> None:
    """An invalid SDP or no session.model -> 400 invalid_request_error; no call kept."""
    async with httpx.AsyncClient(base_url=fake.url) as http:
        response = await http.post(
            "/v1/live/sessions", json=body, headers={"Authorization": f"Bearer {DEFAULT_API_KEY}"}
        )
    assert response.status_code == status
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert fake.calls == []


# ---- a media peer as the answerer ------------------------------------------------------------------------


async def test_an_answerer_answers_and_its_data_channel_gets_the_calls_events() -> None:
    """With answerer=, its SDP is the answer; its data channel gets emitted events and the replies to its
    own client events (errors too), and sidebands see the replies."""
    channel: list[Event] = []

    async def answerer(offer: str, call: FakeCall) -> str:
        assert offer == BROWSER_OFFER
        call.data_channel = _append_to(channel)
        return "v=0\r\no=- 7 2 IN IP4 127.0.0.1\r\ns=peer\r\n"

    async with (
        FakeCallProvider(answerer=answerer) as fake,
        AsyncOpenAI(base_url=f"{fake.url}/v1", api_key=DEFAULT_API_KEY, max_retries=0) as client,
    ):
        answer = await client.realtime.calls.create(sdp=BROWSER_OFFER, session=REALTIME_SESSION)
        assert answer.text.endswith("s=peer\r\n")
        call = await fake.wait_for_call()
        async with client.realtime.connect(call_id=call.call_id) as connection:
            await connection.recv()
            await call.wait_for_sideband()
            await call.emit({"type": "conversation.item.input_audio_transcription.delta", "delta": "hi"})
            assert (await connection.recv()).type == "conversation.item.input_audio_transcription.delta"
            await call.client_event('{"type": "response.create"}')
            await call.client_event("{")
            assert (await _next(connection, "response.done")).response.usage is not None
    assert [e["type"] for e in channel] == [
        "conversation.item.input_audio_transcription.delta",
        "response.created",
        "response.done",
        "error",
    ]
    assert len({e["event_id"] for e in channel}) == 4


async def test_an_answerer_that_fails_is_a_500_and_keeps_no_call() -> None:
    """A media peer that raises: the create is 500 server_error, no call is kept."""

    async def broken(offer: str, call: FakeCall) -> str:
        raise RuntimeError("no media")

    async with FakeCallProvider(answerer=broken) as fake:
        async with httpx.AsyncClient(base_url=fake.url) as http:
            response = await http.post(
                "/v1/realtime/calls",
                content=BROWSER_OFFER,
                headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {DEFAULT_API_KEY}"},
            )
        assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
        assert fake.calls == []


def _append_to(sink: list[Event]) -> Callable[[Event], Any]:
    async def append(event: Event) -> None:
        sink.append(event)

    return append


async def test_closing_the_provider_ends_calls_with_1001() -> None:
    """aclose(): every call ends (provider_shutdown) and its sidebands close with 1001."""
    fake = FakeCallProvider(api_key="sk-another-fake-key")
    await fake.start()
    async with AsyncOpenAI(base_url=f"{fake.url}/v1", api_key="sk-another-fake-key", max_retries=0) as client:
        await client.realtime.calls.create(sdp=BROWSER_OFFER, session=REALTIME_SESSION)
        call = await fake.wait_for_call()
        async with client.realtime.connect(call_id=call.call_id) as connection:
            await connection.recv()
            await fake.aclose()
            with pytest.raises(ConnectionClosed):
                await connection.recv()
    assert call.end_reason == "provider_shutdown" and call.sidebands[0].close_code == 1001
    await fake.aclose()  # idempotent
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ConnectError):  # the URL is still known; nothing listens there
            await http.post(f"{fake.url}/v1/realtime/calls")


async def test_a_live_hangup_sends_session_closed_with_the_last_usage_first(
    fake: FakeCallProvider, sdk: SdkFactory
) -> None:
    """Hangup of a GPT-Live call: session.closed (close_requested, the last usage), then the close."""
    client = sdk()
    _, call = await _live_call(fake, client)
    async with client.live.sideband.connect(session_id=call.call_id) as connection:
        await connection.recv()
        await call.usage_updated(42)
        await client.live.sessions.hangup(call.call_id)
        events = [event async for event in connection]
    assert [e.type for e in events] == ["session.usage.updated", "session.closed"]
    assert (events[1].reason, events[1].usage.seconds) == ("close_requested", 42)


@pytest.mark.parametrize(
    ("route", "reason", "live_reason"),
    [
        (REALTIME_ENDPOINT, "remote_hangup", None),
        (LIVE_ENDPOINT, "expired", "expired"),
        (LIVE_ENDPOINT, "media_closed", "remote_hangup"),
    ],
)
async def test_the_provider_ending_a_call_closes_its_sidebands(
    fake: FakeCallProvider, sdk: SdkFactory, route: str, reason: str, live_reason: str | None
) -> None:
    """call.end(reason): the sidebands close with 1000 (GPT-Live: after session.closed with that reason, or
    remote_hangup for a reason Live has not); no hangup is counted; the call refuses new sidebands."""
    client = sdk()
    headers = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}
    ws = fake.url.replace("http", "ws")
    if route == LIVE_ENDPOINT:
        _, call = await _live_call(fake, client)
        url = f"{ws}/v1/live/sessions/{call.call_id}/attach"
    else:
        await client.realtime.calls.create(sdp=BROWSER_OFFER, session=REALTIME_SESSION)
        call = await fake.wait_for_call()
        url = f"{ws}/v1/realtime?call_id={call.call_id}"
    async with websockets.connect(url, additional_headers=headers) as connection:
        await connection.recv()
        await call.end(reason)
        rest = [orjson.loads(message) async for message in connection]
        assert connection.close_code == 1000
    assert [e["type"] for e in rest] == (["session.closed"] if route == LIVE_ENDPOINT else [])
    assert all(e["reason"] == live_reason for e in rest)
    assert call.end_reason == reason and not call.hung_up.is_set() and fake.hangups == 0
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(url, additional_headers=headers)
    assert refused.value.response.status_code == 404


async def test_a_transcription_call_announces_itself_and_reports_token_usage(
    fake: FakeCallProvider, sdk: SdkFactory
) -> None:
    """A `type: transcription` call: its model is the transcription model, session.created says
    transcription, and transcription_completed reports tokens for a `*-transcribe` model."""
    client = sdk()
    session = {"type": "transcription", "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}}}
    await client.realtime.calls.create(sdp=BROWSER_OFFER, session=session)  # type: ignore[arg-type]
    call = await fake.wait_for_call()
    assert call.model == "gpt-4o-transcribe"
    async with client.realtime.connect(call_id=call.call_id) as connection:
        created = await connection.recv()
        assert created.type == "session.created" and created.session.type == "transcription"
        await call.wait_for_sideband()
        sent = await call.transcription_completed(seconds=3.0, text="three seconds")
        completed = await connection.recv()
    assert completed.usage.type == "tokens" and completed.usage.input_tokens == 30
    assert sent["usage"]["input_token_details"]["audio_tokens"] == 30
