"""WebRTC call creation as data: the client's request, the provider's request, the provider's answer and the
client's answer (docs/api.md, "WebRTC calls"). Pure: no I/O, no clock.

    realtime   POST /v1/realtime/calls[?model=]   application/sdp (the offer), or multipart/form-data with the
               parts `sdp` (the offer) and `session` (a JSON RealtimeSessionCreateRequest: `type`, `model`, ...)
               -> 201 application/sdp (the answer), `Location: /v1/realtime/calls/{session_id}`
    GPT-Live   POST /v1/live/sessions   JSON {"session": {...MediaSessionConfig, "model"}, "transport":
               {"type": "webrtc", "sdp": offer}} -> 200 JSON {"session": {"id": session_id},
               "transport": {"type": "webrtc", "sdp": answer}}

The provider is always sent the structured form (multipart with a `session` part; GPT-Live JSON) with the
session's model replaced by the deployment's model and, for a client secret, the secret's bound settings
merged in (a request that would change one is refused `session_pinned`, as a WebSocket `session.update`
is). The provider's call id and the deployment never reach the client: the client's answer carries the
sidecar's session id.
"""

from __future__ import annotations

import copy
import email.parser
import email.policy
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import orjson

from sidecar import protocol
from sidecar.bodies import BodyTooLarge
from sidecar.catalog import LIVE_ENDPOINT, REALTIME_ENDPOINT, Deployment, Transcriber
from sidecar.catalog import Route as SessionRoute
from sidecar.client_secrets import Grant, InvalidRequest
from sidecar.errors import ModelNotAllowed, ModelNotFound, Refusal, UpstreamError
from sidecar.pinning import Pin

#: The largest SDP offer taken (a browser's offer is a few KiB; the body as a whole is capped by
#: SIDECAR_MAX_BODY_BYTES before this is looked at).
MAX_SDP_BYTES: Final = 32 * 1024
SDP_TYPE: Final = "application/sdp"
MULTIPART_TYPE: Final = "multipart/form-data"
JSON_TYPE: Final = "application/json"
#: The client-facing paths of a call (the sidecar's own id, never the provider's).
REALTIME_CALLS_PATH: Final = "/v1/realtime/calls"
LIVE_SESSIONS_PATH: Final = "/v1/live/sessions"


class SessionPinned(Refusal):
    """A call created with a client secret whose `session` would change a setting the secret bound."""

    status = 400
    code = "session_pinned"
    error_type = "invalid_request_error"


class DelegationNotSupported(Refusal):
    """A GPT-Live call that delegates to a Responses or Decisions backend or sets transcript triggers."""

    status = 400
    code = "delegation_not_supported"
    error_type = "invalid_request_error"


class OfferRefused(Refusal):
    """The provider refused the offer itself (a 4xx about the request): the client's error, the provider's
    message scrubbed of the deployment's secrets."""

    status = 400
    code = "offer_refused"
    error_type = "invalid_request_error"


# ---- the client's request ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallRequest:
    """A validated create request: its route, the SDP offer, the client's session settings (a copy, `{}` when
    none) and the model it names (None: none named)."""

    route: SessionRoute
    sdp: str = field(repr=False)
    session: dict[str, Any]
    model: str | None

    @property
    def transcription(self) -> bool:
        """A realtime transcription call (`session.type` is `transcription`)."""
        return self.route == REALTIME_ENDPOINT and self.session.get("type") == "transcription"


def new_session_id() -> str:
    """The sidecar's id of a new session or call (`Location: /v1/realtime/calls/{id}`; GPT-Live `session.id`)."""
    return "rs_" + uuid.uuid4().hex


def media_type(content_type: str | None) -> str:
    """The bare media type of a Content-Type header, lower-cased (`` when absent)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse_realtime(content_type: str | None, body: bytes, *, query_model: str | None) -> CallRequest:
    """A `POST /v1/realtime/calls` body: `application/sdp` (the model in the query) or multipart `sdp` +
    `session`. Raises InvalidRequest (malformed, wrong media type, the query and the session naming two
    models) or BodyTooLarge (an offer over MAX_SDP_BYTES)."""
    kind = media_type(content_type)
    if kind == SDP_TYPE:
        sdp, session = _sdp(body), {}
    elif kind == MULTIPART_TYPE:
        parts = _multipart(content_type or "", body)
        if "sdp" not in parts:
            raise InvalidRequest("The multipart body needs an `sdp` part with the SDP offer.")
        sdp = _sdp(parts["sdp"])
        session = _session_object(parts.get("session"), "The `session` part")
    else:
        raise InvalidRequest("The body must be application/sdp (the offer) or multipart/form-data (sdp, session).")
    kind_of = session.get("type", "realtime")
    if kind_of not in ("realtime", "transcription"):
        raise InvalidRequest("session.type must be 'realtime' or 'transcription'.")
    named = _named_model(session)
    if query_model and named and query_model != named:
        raise InvalidRequest(f"The query names model {query_model} and the session names {named}.")
    return CallRequest(REALTIME_ENDPOINT, sdp, session, query_model or named)


def parse_live(body: bytes) -> CallRequest:
    """A `POST /v1/live/sessions` JSON body. Raises InvalidRequest, BodyTooLarge, DelegationNotSupported."""
    try:
        data = orjson.loads(body) if body.strip() else None
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest("The request body is not valid JSON.") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("The body must be a JSON object with `session` and `transport`.")
    transport = data.get("transport")
    if not isinstance(transport, dict) or transport.get("type") != "webrtc":
        raise InvalidRequest("transport must be {'type': 'webrtc', 'sdp': <offer>}.")
    offer = transport.get("sdp")
    if not isinstance(offer, str):
        raise InvalidRequest("transport.sdp must be the SDP offer.")
    sdp = _sdp(offer.encode())
    session = data.get("session")
    if not isinstance(session, dict):
        raise InvalidRequest("session must be an object naming the model.")
    model = session.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("session.model must name the model.")
    if _delegates(session):
        raise DelegationNotSupported(
            "GPT-Live delegation to a Responses or Decisions backend, and transcript triggers, are not supported here."
        )
    return CallRequest(LIVE_ENDPOINT, sdp, copy.deepcopy(session), model)


def _delegates(session: Mapping[str, Any]) -> bool:
    """surfaces/live.delegates, here without importing the GPT-Live core."""
    delegation = session.get("delegation")
    if delegation is not None and not (isinstance(delegation, dict) and delegation.get("type") == "client"):
        return True
    triggers = session.get("triggers")
    return triggers is not None and triggers != []


def _sdp(raw: bytes) -> str:
    """The offer as text. Raises BodyTooLarge or InvalidRequest (empty, not UTF-8, not an SDP)."""
    if len(raw) > MAX_SDP_BYTES:
        raise BodyTooLarge(f"The SDP offer is larger than the limit of {MAX_SDP_BYTES} bytes.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest("The SDP offer is not UTF-8 text.") from exc
    if not text.lstrip().startswith("v=0"):
        raise InvalidRequest("The SDP offer is missing or is not an SDP description (it must start with v=0).")
    if "\x00" in text:
        raise InvalidRequest("The SDP offer holds a NUL character.")
    return text


def _multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    """The named parts of a multipart/form-data body (the first of each name). Raises InvalidRequest."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart() or not message.get_boundary():
        raise InvalidRequest("The multipart body is malformed (no boundary or no parts).")
    parts: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or name in parts:
            continue
        payload = part.get_payload(decode=True)
        parts[name] = payload if isinstance(payload, bytes) else b""
    if not parts:
        raise InvalidRequest("The multipart body is malformed (no named parts).")
    return parts


def _session_object(raw: bytes | None, what: str) -> dict[str, Any]:
    if raw is None or not raw.strip():
        return {}
    try:
        session = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"{what} is not valid JSON.") from exc
    if not isinstance(session, dict):
        raise InvalidRequest(f"{what} must be a JSON object.")
    return session


def _named_model(session: Mapping[str, Any]) -> str | None:
    """The model a realtime session part names: a transcription session's transcription model, else `model`.
    Raises InvalidRequest when it is not a string."""
    if session.get("type") == "transcription":
        name = protocol.dig(session, "audio", "input", "transcription", "model")
    else:
        name = session.get("model")
    if name is not None and not isinstance(name, str):
        raise InvalidRequest("The session's model must be a string.")
    return name or None


# ---- the model -----------------------------------------------------------------------------------------------


def model_name(request: CallRequest, grant: Grant | None, *, default_transcription_model: str) -> tuple[str, bool]:
    """(the public model the call uses, whether it is a transcription call): the secret's binding (a request
    naming another model is refused ModelNotAllowed), else the request's model, else, for a transcription call,
    the default transcription model. Raises ModelNotAllowed, ModelNotFound, SessionPinned."""
    if grant is not None:
        if request.model and request.model != grant.model:
            raise ModelNotAllowed(f"This client secret is for model {grant.model}.")
        if "type" in request.session and request.transcription != grant.transcription:
            raise SessionPinned("This call's session.type is fixed by its client secret.")
        return grant.model, grant.transcription
    if request.model:
        return request.model, request.transcription
    if request.transcription:
        return default_transcription_model, True
    if request.route == LIVE_ENDPOINT:  # parse_live already refused it; kept for a CallRequest built by hand
        raise ModelNotFound("session.model must name the model.")
    raise ModelNotFound("A model is required: the `model` query parameter or the session's model.")


# ---- the provider's request ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """What is POSTed to a deployment's create path."""

    content_type: str
    content: bytes = field(repr=False)


def provider_session(
    request: CallRequest,
    *,
    public_model: str,
    deployment: Deployment,
    transcription: bool,
    grant: Grant | None = None,
    transcribers: Mapping[str, Transcriber] | None = None,
    may_use: Callable[[str], bool] = lambda name: True,
) -> dict[str, Any]:
    """The session settings the provider is sent for `deployment`: the client's settings with the secret's
    bound settings merged in, the model names rewritten to the deployment's (a conversation call's input
    transcription model to its name on the same provider). Raises SessionPinned, ModelNotFound (an input
    transcription model the config or the provider does not serve), ModelNotAllowed (one the key may not use).
    """
    session = copy.deepcopy(request.session)
    if grant is not None and request.route == REALTIME_ENDPOINT:  # a GPT-Live secret binds its model alone
        changed = Pin(grant.session).conflict(session)
        if changed is not None:
            raise SessionPinned(f"This call's {changed} is fixed by its client secret.")
        session = merged(session, grant.session)
    if request.route == LIVE_ENDPOINT:
        session["model"] = deployment.model
        return session
    if transcription:
        session["type"] = "transcription"
        session.pop("model", None)
        _holder(session)["model"] = deployment.model
        return session
    session["type"] = "realtime"
    session["model"] = deployment.model
    holder = protocol.dig(session, "audio", "input", "transcription")
    name = holder.get("model") if isinstance(holder, dict) else None
    if isinstance(holder, dict) and name is not None:
        known = (transcribers or {}).get(name) if isinstance(name, str) else None
        upstream = known.upstream_name(deployment) if known is not None else None
        if known is None or upstream is None:
            raise ModelNotFound(f"The transcription model `{name}` is not available here.")
        if not may_use(name):
            raise ModelNotAllowed(f"The API key is not allowed to access model {name}.")
        holder["model"] = upstream
    return session


def _holder(session: dict[str, Any]) -> dict[str, Any]:
    """session.audio.input.transcription, created (as objects) where missing. Raises InvalidRequest."""
    node = session
    for key in ("audio", "input", "transcription"):
        if node.get(key) is None:
            node[key] = {}
        if not isinstance(node[key], dict):
            raise InvalidRequest(f"session.audio.input.transcription must be an object (at `{key}`).")
        node = node[key]
    return node


def merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with every leaf of `over` set over it (objects merged key by key; copies, never aliases)."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def provider_request(
    request: CallRequest, session: Mapping[str, Any], *, boundary: str | None = None
) -> ProviderRequest:
    """The body of the provider's create: realtime multipart `sdp` + `session`, GPT-Live JSON."""
    if request.route == LIVE_ENDPOINT:
        body = {"session": session, "transport": {"type": "webrtc", "sdp": request.sdp}}
        return ProviderRequest(JSON_TYPE, orjson.dumps(body))
    mark = boundary or uuid.uuid4().hex
    parts = (("sdp", SDP_TYPE, request.sdp.encode()), ("session", JSON_TYPE, orjson.dumps(session)))
    chunks: list[bytes] = []
    for name, kind, content in parts:
        chunks.append(
            f'--{mark}\r\nContent-Disposition: form-data; name="{name}"\r\nContent-Type: {kind}\r\n\r\n'.encode()
        )
        chunks.extend((content, b"\r\n"))
    chunks.append(f"--{mark}--\r\n".encode())
    return ProviderRequest(f"{MULTIPART_TYPE}; boundary={mark}", b"".join(chunks))


# ---- the provider's answer -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderAnswer:
    """What the provider created: its call id (never shown to a client) and the SDP answer."""

    call_id: str = field(repr=False)
    sdp: str = field(repr=False)


def parse_answer(route: SessionRoute, *, location: str | None, body: bytes) -> ProviderAnswer:
    """A 2xx create answer: realtime, the call id from `Location` (its last path segment after `calls/`) and
    the SDP body; GPT-Live, JSON `session.id` and `transport.sdp`. Raises UpstreamError (no secret, no body)."""
    if route == LIVE_ENDPOINT:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise UpstreamError("the provider's answer is not JSON") from exc
        call_id = protocol.dig(data, "session", "id")
        sdp = protocol.dig(data, "transport", "sdp")
    else:
        call_id = call_id_of(location)
        try:
            sdp = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UpstreamError("the provider's SDP answer is not UTF-8") from exc
    if not isinstance(call_id, str) or not call_id or not _token(call_id):
        raise UpstreamError("the provider's answer carries no usable call id")
    if not isinstance(sdp, str) or not sdp.lstrip().startswith("v=0"):
        raise UpstreamError("the provider's answer carries no SDP answer")
    return ProviderAnswer(call_id, sdp)


def call_id_of(location: str | None) -> str | None:
    """The call id in a realtime `Location` (`/v1/realtime/calls/{id}`, Azure `/openai/v1/realtime/calls/{id}`,
    or an absolute URL), None when it names none."""
    if not location:
        return None
    path = urlsplit(location).path.rstrip("/")
    _, sep, tail = path.rpartition("/calls/")
    return tail if sep and tail and "/" not in tail else None


def _token(value: str) -> bool:
    """A call id fit for a URL path segment and a header: printable ASCII, no space, `/`, `?` or `#`."""
    return value.isascii() and value.isprintable() and not any(c in value for c in " /?#%")


# ---- the client's answer -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientAnswer:
    """The HTTP answer of a created call: status, media type, body and headers."""

    status: int
    media_type: str
    body: bytes = field(repr=False)
    headers: Mapping[str, str]


def client_answer(route: SessionRoute, session_id: str, sdp: str) -> ClientAnswer:
    """Realtime: 201, the SDP answer, `Location: /v1/realtime/calls/{session_id}`. GPT-Live: 200 JSON with
    `session.id = session_id` and the answer in `transport.sdp`."""
    if route == LIVE_ENDPOINT:
        body = {"session": {"id": session_id}, "transport": {"type": "webrtc", "sdp": sdp}}
        return ClientAnswer(200, JSON_TYPE, orjson.dumps(body), {"Cache-Control": "no-store"})
    headers = {"Location": f"{REALTIME_CALLS_PATH}/{session_id}", "Cache-Control": "no-store"}
    return ClientAnswer(201, SDP_TYPE, sdp.encode(), headers)


def provider_error_message(body: bytes, *, limit: int = 500) -> str:
    """The provider's error message (OpenAI's `error.message`, else the body as text), at most `limit`
    characters. Not scrubbed: the caller scrubs it with the deployment's scrubber."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    message = protocol.dig(data, "error", "message") if isinstance(data, dict) else None
    if not isinstance(message, str):
        message = body.decode("utf-8", "replace") if data is None else ""
    return " ".join(message.split())[:limit]
