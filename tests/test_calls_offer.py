"""sidecar/calls/offer.py: WebRTC create requests and answers as data (no I/O)."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import orjson
import pytest

from sidecar.bodies import BodyTooLarge
from sidecar.calls.offer import (
    MAX_SDP_BYTES,
    DelegationNotSupported,
    SessionPinned,
    call_id_of,
    client_answer,
    merged,
    model_name,
    parse_answer,
    parse_live,
    parse_realtime,
    provider_error_message,
    provider_request,
    provider_session,
)
from sidecar.catalog import LIVE_ENDPOINT, REALTIME_ENDPOINT, Deployment, Transcriber
from sidecar.client_secrets import Grant, InvalidRequest
from sidecar.errors import ModelNotAllowed, ModelNotFound, UpstreamError
from sidecar.pricing import Price

OFFER = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n"
ANSWER = "v=0\r\no=- 3 4 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=setup:active\r\n"
AZURE = Deployment(provider="azure", model="my-rt-deployment", api_base="https://res.openai.azure.com", api_key="k")
OPENAI = Deployment(provider="openai", model="gpt-realtime-2025-08-28", api_base=None, api_key="sk-x")


def sdk_request(**create: Any) -> httpx.Request:
    """The request the official SDK sends for `client.realtime.calls.create(**create)` (captured, not sent)."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, content=ANSWER.encode(), headers={"Location": "/v1/realtime/calls/rtc_1"})

    client = openai.OpenAI(
        api_key="sk-test",
        base_url="http://sidecar/v1",
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
    )
    client.realtime.calls.create(**create)
    return seen[0]


def grant(model: str, session: dict[str, Any], *, transcription: bool = False) -> Grant:
    return Grant("id", "hash", model, transcription, session, 0, 10)


def test_sdk_multipart_is_parsed() -> None:
    """The SDK's multipart body (sdp + session parts) gives the offer, the session and its model."""
    request = sdk_request(sdp=OFFER, session={"type": "realtime", "model": "gpt-realtime", "instructions": "hi"})
    call = parse_realtime(request.headers["content-type"], request.read(), query_model=None)
    assert call.sdp == OFFER
    assert call.session == {"type": "realtime", "model": "gpt-realtime", "instructions": "hi"}
    assert call.model == "gpt-realtime" and not call.transcription


def test_sdk_multipart_without_session() -> None:
    """An SDK create with the offer alone names no model (the query or a client secret must)."""
    request = sdk_request(sdp=OFFER)
    call = parse_realtime(request.headers["content-type"], request.read(), query_model="gpt-realtime")
    assert call.session == {} and call.model == "gpt-realtime"


def test_sdp_body_with_query_model() -> None:
    """application/sdp: the body is the offer, the model comes from the query."""
    call = parse_realtime("application/sdp; charset=utf-8", OFFER.encode(), query_model="gpt-realtime")
    assert (call.sdp, call.session, call.model, call.route) == (OFFER, {}, "gpt-realtime", REALTIME_ENDPOINT)


def test_transcription_session_names_its_transcription_model() -> None:
    """A transcription session part names its model at audio.input.transcription.model."""
    session = {"type": "transcription", "audio": {"input": {"transcription": {"model": "gpt-realtime-whisper"}}}}
    request = sdk_request(sdp=OFFER, session=session)
    call = parse_realtime(request.headers["content-type"], request.read(), query_model=None)
    assert call.transcription and call.model == "gpt-realtime-whisper"


@pytest.mark.parametrize(
    ("content_type", "body", "message"),
    [
        ("application/json", b"{}", "application/sdp"),
        (None, OFFER.encode(), "application/sdp"),
        ("application/sdp", b"", "v=0"),
        ("application/sdp", b"hello", "v=0"),
        ("application/sdp", b"v=0\xff\xfe", "UTF-8"),
        ("multipart/form-data", b"--x\r\n", "malformed"),
        (
            "multipart/form-data; boundary=x",
            b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--x--\r\n',
            "sdp",
        ),
    ],
)
def test_malformed_bodies_are_refused(content_type: str | None, body: bytes, message: str) -> None:
    """A body that is not an offer is a 400 invalid_request naming what is wrong."""
    with pytest.raises(InvalidRequest, match=message) as caught:
        parse_realtime(content_type, body, query_model="gpt-realtime")
    assert caught.value.status == 400 and caught.value.code == "invalid_request"


def test_session_part_must_be_a_realtime_object() -> None:
    """A session part that is not JSON, not an object or of another type is refused."""
    for session, message in ((b"{", "JSON"), (b"[1]", "object"), (b'{"type": "x"}', "session.type")):
        body = (
            b'--b\r\nContent-Disposition: form-data; name="sdp"\r\n\r\n' + OFFER.encode() + b"\r\n"
            b'--b\r\nContent-Disposition: form-data; name="session"\r\n\r\n' + session + b"\r\n--b--\r\n"
        )
        with pytest.raises(InvalidRequest, match=message):
            parse_realtime("multipart/form-data; boundary=b", body, query_model=None)


def test_query_and_session_naming_two_models_is_refused() -> None:
    """The query and the session part may not name different models."""
    request = sdk_request(sdp=OFFER, session={"type": "realtime", "model": "gpt-realtime"})
    with pytest.raises(InvalidRequest, match="names model other"):
        parse_realtime(request.headers["content-type"], request.read(), query_model="other")


def test_offer_over_the_limit_is_413() -> None:
    """An offer over MAX_SDP_BYTES is refused 413 request_too_large."""
    big = ("v=0\r\n" + "a=x\r\n" * MAX_SDP_BYTES).encode()
    with pytest.raises(BodyTooLarge) as caught:
        parse_realtime("application/sdp", big, query_model="m")
    assert caught.value.status == 413 and caught.value.code == "request_too_large"


def test_live_body() -> None:
    """GPT-Live: the JSON body's session (with its model) and transport.sdp."""
    body = orjson.dumps(
        {"session": {"model": "gpt-live-1", "instructions": "x"}, "transport": {"type": "webrtc", "sdp": OFFER}}
    )
    call = parse_live(body)
    assert (call.route, call.model, call.sdp) == (LIVE_ENDPOINT, "gpt-live-1", OFFER)
    assert call.session == {"model": "gpt-live-1", "instructions": "x"}


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[]",
        orjson.dumps({"session": {"model": "gpt-live-1"}}),
        orjson.dumps({"session": {"model": "gpt-live-1"}, "transport": {"type": "websocket", "sdp": OFFER}}),
        orjson.dumps({"session": {"model": "gpt-live-1"}, "transport": {"type": "webrtc"}}),
        orjson.dumps({"session": {}, "transport": {"type": "webrtc", "sdp": OFFER}}),
        orjson.dumps({"session": "x", "transport": {"type": "webrtc", "sdp": OFFER}}),
        orjson.dumps({"session": {"model": "gpt-live-1"}, "transport": {"type": "webrtc", "sdp": "nope"}}),
    ],
)
def test_malformed_live_bodies_are_refused(body: bytes) -> None:
    """Every malformed GPT-Live create is a 400 invalid_request."""
    with pytest.raises(InvalidRequest):
        parse_live(body)


def test_live_delegation_is_refused() -> None:
    """A GPT-Live call delegating to Responses is refused delegation_not_supported (it could not be metered)."""
    session = {"model": "gpt-live-1", "delegation": {"type": "responses", "responses": {}}}
    with pytest.raises(DelegationNotSupported) as caught:
        parse_live(orjson.dumps({"session": session, "transport": {"type": "webrtc", "sdp": OFFER}}))
    assert caught.value.status == 400 and caught.value.code == "delegation_not_supported"


def test_model_name_rules() -> None:
    """The model: the secret's (another one named is refused), else the request's, else a transcription default."""
    named = parse_realtime("application/sdp", OFFER.encode(), query_model="gpt-realtime")
    bare = parse_realtime("application/sdp", OFFER.encode(), query_model=None)
    assert model_name(named, None, default_transcription_model="w") == ("gpt-realtime", False)
    assert model_name(bare, grant("gpt-realtime", {}), default_transcription_model="w") == ("gpt-realtime", False)
    assert model_name(bare, grant("w2", {}, transcription=True), default_transcription_model="w") == ("w2", True)
    with pytest.raises(ModelNotAllowed):
        model_name(named, grant("gpt-realtime-mini", {}), default_transcription_model="w")
    with pytest.raises(ModelNotFound, match="model"):
        model_name(bare, None, default_transcription_model="w")
    transcription = parse_realtime(*_multipart({"type": "transcription"}), query_model=None)
    assert model_name(transcription, None, default_transcription_model="w") == ("w", True)
    with pytest.raises(SessionPinned):
        model_name(transcription, grant("gpt-realtime", {}), default_transcription_model="w")


def _multipart(session: dict[str, Any]) -> tuple[str, bytes]:
    request = sdk_request(sdp=OFFER, session=session)
    return request.headers["content-type"], request.read()


def test_provider_session_names_the_deployment() -> None:
    """The provider gets the deployment's model, never the public name (Azure: the deployment name)."""
    call = parse_realtime(
        *_multipart({"type": "realtime", "model": "gpt-realtime", "instructions": "x"}), query_model=None
    )
    session = provider_session(call, public_model="gpt-realtime", deployment=AZURE, transcription=False)
    assert session == {"type": "realtime", "model": "my-rt-deployment", "instructions": "x"}
    assert call.session["model"] == "gpt-realtime"  # the request itself is not changed


def test_provider_session_of_a_transcription_call() -> None:
    """A transcription call names the deployment as its transcription model and no top-level model."""
    call = parse_realtime(*_multipart({"type": "transcription", "model": "x"}), query_model=None)
    session = provider_session(call, public_model="w", deployment=OPENAI, transcription=True)
    assert session == {"type": "transcription", "audio": {"input": {"transcription": {"model": OPENAI.model}}}}


def test_bound_settings_are_merged_and_pinned() -> None:
    """A client secret's bound settings go to the provider; a request changing one is refused session_pinned."""
    bound = {
        "type": "realtime",
        "model": "gpt-realtime",
        "instructions": "bound",
        "audio": {"output": {"voice": "marin"}},
    }
    call = parse_realtime(*_multipart({"audio": {"input": {"noise_reduction": None}}}), query_model=None)
    session = provider_session(
        call, public_model="gpt-realtime", deployment=OPENAI, transcription=False, grant=grant("gpt-realtime", bound)
    )
    assert session == {
        "type": "realtime",
        "model": OPENAI.model,
        "instructions": "bound",
        "audio": {"input": {"noise_reduction": None}, "output": {"voice": "marin"}},
    }
    changing = parse_realtime(*_multipart({"instructions": "mine"}), query_model=None)
    with pytest.raises(SessionPinned, match="instructions") as caught:
        provider_session(
            changing,
            public_model="gpt-realtime",
            deployment=OPENAI,
            transcription=False,
            grant=grant("gpt-realtime", bound),
        )
    assert caught.value.code == "session_pinned" and caught.value.status == 400


def test_input_transcriber_is_checked_and_renamed() -> None:
    """A conversation call's input transcription model must be configured, served by the provider and allowed."""
    transcriber = Transcriber("whisper-1", Price("second"), (Deployment("azure", "my-whisper", AZURE.api_base, "k"),))
    call = parse_realtime(
        *_multipart({"type": "realtime", "audio": {"input": {"transcription": {"model": "whisper-1"}}}}),
        query_model="m",
    )
    session = provider_session(
        call, public_model="m", deployment=AZURE, transcription=False, transcribers={"whisper-1": transcriber}
    )
    assert session["audio"]["input"]["transcription"]["model"] == "my-whisper"
    with pytest.raises(ModelNotFound):
        provider_session(
            call, public_model="m", deployment=OPENAI, transcription=False, transcribers={"whisper-1": transcriber}
        )
    with pytest.raises(ModelNotFound):
        provider_session(call, public_model="m", deployment=AZURE, transcription=False, transcribers={})
    with pytest.raises(ModelNotAllowed):
        provider_session(
            call,
            public_model="m",
            deployment=AZURE,
            transcription=False,
            transcribers={"whisper-1": transcriber},
            may_use=lambda name: False,
        )


def test_live_provider_session() -> None:
    """GPT-Live: the session's model becomes the deployment's; the body is the JSON create."""
    call = parse_live(orjson.dumps({"session": {"model": "gpt-live-1"}, "transport": {"type": "webrtc", "sdp": OFFER}}))
    session = provider_session(call, public_model="gpt-live-1", deployment=AZURE, transcription=False)
    body = provider_request(call, session)
    assert body.content_type == "application/json"
    assert orjson.loads(body.content) == {
        "session": {"model": "my-rt-deployment"},
        "transport": {"type": "webrtc", "sdp": OFFER},
    }


def test_provider_multipart_round_trips() -> None:
    """The multipart body sent to the provider parses back to the same offer and session."""
    call = parse_realtime("application/sdp", OFFER.encode(), query_model="gpt-realtime")
    session = provider_session(call, public_model="gpt-realtime", deployment=OPENAI, transcription=False)
    body = provider_request(call, session)
    back = parse_realtime(body.content_type, body.content, query_model=None)
    assert back.sdp == OFFER and back.session == {"type": "realtime", "model": OPENAI.model}


def test_merged_never_aliases() -> None:
    """merged() copies: changing the result leaves both inputs as they were."""
    base, over = {"a": {"b": 1}}, {"a": {"c": [1]}}
    out = merged(base, over)
    out["a"]["c"].append(2)
    out["a"]["b"] = 5
    assert base == {"a": {"b": 1}} and over == {"a": {"c": [1]}}


def test_provider_answers() -> None:
    """The provider's call id from Location (any form) or GPT-Live JSON; a 2xx without one is an UpstreamError."""
    assert (
        parse_answer(REALTIME_ENDPOINT, location="/v1/realtime/calls/rtc_abc", body=ANSWER.encode()).call_id
        == "rtc_abc"
    )
    azure = parse_answer(REALTIME_ENDPOINT, location="https://h/openai/v1/realtime/calls/rtc_z", body=ANSWER.encode())
    assert (azure.call_id, azure.sdp) == ("rtc_z", ANSWER)
    live = orjson.dumps({"session": {"id": "ls_1"}, "transport": {"type": "webrtc", "sdp": ANSWER}})
    assert parse_answer(LIVE_ENDPOINT, location=None, body=live).call_id == "ls_1"
    for route, location, body in (
        (REALTIME_ENDPOINT, None, ANSWER.encode()),
        (REALTIME_ENDPOINT, "/v1/realtime/calls/", ANSWER.encode()),
        (REALTIME_ENDPOINT, "/v1/realtime/calls/rtc_1", b"not sdp"),
        (LIVE_ENDPOINT, None, b"{"),
        (LIVE_ENDPOINT, None, orjson.dumps({"session": {"id": "a b"}, "transport": {"sdp": ANSWER}})),
    ):
        with pytest.raises(UpstreamError):
            parse_answer(route, location=location, body=body)
    assert call_id_of("/v1/realtime/calls/a/b") is None and call_id_of(None) is None


def test_client_answers_carry_the_sidecars_id() -> None:
    """Realtime: 201, SDP, Location on the sidecar's path; GPT-Live: 200 JSON with session.id."""
    realtime = client_answer(REALTIME_ENDPOINT, "rs_1", ANSWER)
    assert (realtime.status, realtime.media_type, realtime.body) == (201, "application/sdp", ANSWER.encode())
    assert realtime.headers["Location"] == "/v1/realtime/calls/rs_1"
    live = client_answer(LIVE_ENDPOINT, "rs_2", ANSWER)
    assert live.status == 200 and orjson.loads(live.body) == {
        "session": {"id": "rs_2"},
        "transport": {"type": "webrtc", "sdp": ANSWER},
    }


def test_provider_error_message() -> None:
    """The provider's OpenAI-shaped error message, else its text, cut short; never the raw JSON."""
    assert provider_error_message(b'{"error": {"message": "bad  sdp\\n"}}') == "bad sdp"
    assert provider_error_message(b"plain text") == "plain text"
    assert provider_error_message(b'{"x": 1}') == ""
    assert len(provider_error_message(b"x" * 2000)) == 500


def test_live_secret_binds_its_model_alone() -> None:
    """A GPT-Live client secret binds only its model: nothing of its realtime-shaped settings reaches the call."""
    call = parse_live(orjson.dumps({"session": {"model": "gpt-live-1"}, "transport": {"type": "webrtc", "sdp": OFFER}}))
    bound = grant("gpt-live-1", {"type": "realtime", "model": "gpt-live-1"})
    session = provider_session(call, public_model="gpt-live-1", deployment=AZURE, transcription=False, grant=bound)
    assert session == {"model": "my-rt-deployment"}
