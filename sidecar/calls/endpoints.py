"""The WebRTC call routes (docs/api.md, "WebRTC calls"): create a call, hang one up.

    POST /v1/realtime/calls                 (/realtime/calls, /openai/v1/realtime/calls)
    POST /v1/realtime/calls/{call_id}/hangup
    POST /v1/live/sessions                  (/live/sessions, /openai/v1/live/sessions; the same paths are the
                                             GPT-Live WebSocket route: Starlette matches http and websocket
                                             scopes apart, so both are served)
    POST /v1/live/sessions/{session_id}/hangup

Create: authenticate as the WebSocket routes do (app._authenticate), parse (offer.py), resolve, authorize, claim
the secret and take the lease (app.admit_session), create on the first deployment that answers
(provider.create_call), build the Account (app._account) and hand the call to its CallWatch
(`services.calls.start`) before answering. A call the provider answered is never left unwatched: if anything
fails after the answer, it is hung up. Every refusal is an OpenAI error body, counted in `sidecar_refusals_total`.

Hangup: the caller must be the call's owner (or the master key), else 404; the call is ended, on whichever
replica watches it, by a control message (`Supervisor.terminate(..., reason="client_hangup")`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from sidecar import app as app_module
from sidecar import protocol
from sidecar.admin import NotFound
from sidecar.auth import Principal, may_use
from sidecar.calls import sideband
from sidecar.calls.guard import SettingsGuard
from sidecar.calls.offer import (
    CallRequest,
    client_answer,
    merged,
    model_name,
    parse_live,
    parse_realtime,
    provider_request,
    provider_session,
)
from sidecar.calls.provider import Created, create_call, hangup_call
from sidecar.calls.watch import CallWatch
from sidecar.catalog import LIVE_ENDPOINT, REALTIME_ENDPOINT, Deployment, RealtimeModel
from sidecar.catalog import Route as SessionRoute
from sidecar.client_secrets import Grant
from sidecar.control import ControlError
from sidecar.errors import ModelNotTranscription, Refusal, ServiceUnavailable, UpstreamError
from sidecar.session import Session
from sidecar.surfaces.account import Account
from sidecar.surfaces.live import LiveStart

if TYPE_CHECKING:
    from sidecar.app import Services

log = logging.getLogger("sidecar.calls")

REALTIME_PATHS: Final = ("/v1/realtime/calls", "/realtime/calls", "/openai/v1/realtime/calls")
LIVE_PATHS: Final = ("/v1/live/sessions", "/live/sessions", "/openai/v1/live/sessions")
NO_STORE: Final = {"Cache-Control": "no-store"}


def routes() -> list[BaseRoute]:
    """The create and hangup routes under every path the WebSocket routes use."""
    kinds: tuple[tuple[tuple[str, ...], SessionRoute, str], ...] = (
        (REALTIME_PATHS, REALTIME_ENDPOINT, "call_id"),
        (LIVE_PATHS, LIVE_ENDPOINT, "session_id"),
    )
    found: list[BaseRoute] = []
    for paths, route, key in kinds:
        create = partial(create_endpoint, route=route)
        hangup = partial(hangup_endpoint, key=key, route=route)
        for path in paths:
            found.append(Route(path, create, methods=["POST"]))
            found.append(Route(f"{path}/{{{key}}}/hangup", hangup, methods=["POST"]))
    return found


# ---- create ------------------------------------------------------------------------------------------------


async def create_endpoint(request: Request, *, route: SessionRoute) -> Response:
    """POST /v1/realtime/calls, POST /v1/live/sessions."""
    services: Services = request.app.state.services
    model: RealtimeModel | None = None
    try:
        if services.supervisor.draining:  # before the secret is claimed or anything is parsed
            raise ServiceUnavailable("The server is draining; reconnect to another replica.")
        principal, grant, _ = await app_module._authenticate(request, services)
        call = await _parse(request, route)
        name, transcription = model_name(
            call, grant, default_transcription_model=services.catalog.default_transcription_model
        )
        model = services.catalog.resolve(name, route=route)
        if transcription and model.kind != "realtime-transcription":
            raise ModelNotTranscription(
                f"The model `{model.name}` is a conversation model; a transcription call needs a transcription model."
            )
        session_id, created = await _create(services, call, model, principal, grant, transcription=transcription)
    except Refusal as refusal:
        label = model.name if model is not None else ""
        services.metrics.refusals.labels(refusal.code, label).inc()
        log.info("call refused", extra={"reason": refusal.code})
        return JSONResponse(refusal.body(), status_code=refusal.status, headers=NO_STORE)
    answer = client_answer(route, session_id, created.sdp)
    return Response(answer.body, status_code=answer.status, media_type=answer.media_type, headers=dict(answer.headers))


async def _parse(request: Request, route: SessionRoute) -> CallRequest:
    body = await request.body()
    if route == LIVE_ENDPOINT:
        return parse_live(body)
    return parse_realtime(request.headers.get("content-type"), body, query_model=request.query_params.get("model"))


async def _create(
    services: Services,
    call: CallRequest,
    model: RealtimeModel,
    principal: Principal,
    grant: Grant | None,
    *,
    transcription: bool,
    start: Callable[[CallWatch], object] | None = None,
) -> tuple[str, Created]:
    """Admit, create on the first deployment that answers, start watching (`start`, default
    `services.calls.start`). Raises a Refusal, or whatever starting the watch raised (the lease released, any
    call the provider answered hung up)."""

    def body_for(deployment: Deployment) -> Any:
        session = provider_session(
            call,
            public_model=model.name,
            deployment=deployment,
            transcription=transcription,
            grant=grant,
            transcribers=services.catalog.transcribers,
            may_use=partial(may_use, principal),
        )
        return provider_request(call, session)

    def failed(deployment: Deployment, error: UpstreamError) -> None:
        services.metrics.connect_failures.labels(model.name, deployment.deployment_id or deployment.model).inc()

    body_for(model.deployments[0])  # the request's own refusals before the secret is used up
    session_id = await app_module.admit_session(services, model, principal, grant=grant)
    created: Created | None = None
    http = _http(services)
    try:
        created = await create_call(
            http, model, call.route, body_for, timeout_s=services.settings.connect_timeout_s, on_failure=failed
        )
        watch = _watch(services, created, model, principal, session_id, call, grant=grant, transcription=transcription)
        (start or services.calls.start)(watch)
    except BaseException:
        if created is not None:  # answered but not watched: never leave it running
            with contextlib.suppress(Exception):
                await hangup_call(http, created.call)
        await services.supervisor.release(principal, session_id)
        raise
    log.info(
        "call created",
        extra={"session_id": session_id, "key_hash": principal.key_hash, "model": model.name},
    )
    return session_id, created


def _http(services: Services) -> Any:
    if services.http is None:
        raise ServiceUnavailable("The server is starting; try again.")
    return services.http


def _watch(
    services: Services,
    created: Created,
    model: RealtimeModel,
    principal: Principal,
    session_id: str,
    call: CallRequest,
    *,
    grant: Grant | None,
    transcription: bool,
) -> CallWatch:
    """The call's Account and its CallWatch, ready to start."""
    settings = services.settings
    start = (
        LiveStart(model.name, {"type": "session.start", "session": call.session})
        if call.route == LIVE_ENDPOINT
        else None
    )
    account = app_module._account(
        services,
        model,
        created.call.deployment,
        principal,
        session_id,
        transcription=transcription,
        grant=grant,
        start=start,
        inject_model=False,  # the create's session part named the model; nothing is sent on the sideband first
    )
    watch = CallWatch(
        session=account,
        call=created.call,
        hangup=partial(hangup_call, _http(services), created.call),
        attach=partial(sideband.attach, created.call, services.dialer),
        publisher=services.publisher,
        checkpoint_s=settings.checkpoint_s,
        idle_timeout_s=settings.idle_timeout_s,
        max_session_s=settings.max_session_s,
        reattach_s=settings.sideband_reattach_s,
        clock_ns=services.clock_ns,
        guard=_guard(services, account, grant),
    )
    if call.route == REALTIME_ENDPOINT and not transcription:
        _tell_transcriber(account, call, grant, now=services.clock_ns())
    return watch


def _guard(services: Services, account: Account, grant: Grant | None) -> SettingsGuard | None:
    """A realtime call's settings guard (calls/guard.py): its transcriber followed, its secret's settings kept."""
    core = account.core
    if not isinstance(core, Session):  # GPT-Live: priced by session time, its secret binds its model alone
        return None
    bound = grant.session if grant is not None else None
    return SettingsGuard(core, transcribers=services.catalog.transcribers, bound=bound)


def _tell_transcriber(account: Account, call: CallRequest, grant: Grant | None, *, now: int) -> None:
    """A conversation call's core learns the input transcription model its create named (the client's or the
    secret's), as a client `session.update` would tell a WebSocket session's: the transcription usage the
    sideband reports is then priced as that model's, not the default transcriber's. The reply is for nobody."""
    settings = merged(call.session, grant.session) if grant is not None else call.session
    name = protocol.dig(settings, "audio", "input", "transcription", "model")
    if isinstance(name, str):
        update = {"type": "session.update", "session": {"audio": {"input": {"transcription": {"model": name}}}}}
        account.core.on_client_text(protocol.dumps(update), now=now)


# ---- hangup ------------------------------------------------------------------------------------------------


async def hangup_endpoint(request: Request, *, key: str, route: SessionRoute) -> Response:
    """POST /v1/realtime/calls/{call_id}/hangup, POST /v1/live/sessions/{session_id}/hangup."""
    services: Services = request.app.state.services
    session_id = request.path_params[key]
    try:
        principal, _, _ = await app_module._authenticate(request, services)
        await _hang_up(services, principal, session_id, route)
    except Refusal as refusal:
        return JSONResponse(refusal.body(), status_code=refusal.status, headers=NO_STORE)
    except ControlError:
        unreachable = ServiceUnavailable("The control store is unreachable; try again.")
        return JSONResponse(unreachable.body(), status_code=unreachable.status, headers=NO_STORE)
    return Response(status_code=200, headers=NO_STORE)


async def _hang_up(services: Services, principal: Principal, session_id: str, route: SessionRoute) -> None:
    """End the call `session_id` of `principal` on `route` wherever it is watched. Raises NotFound (no such live
    call on this route, a WebSocket session, or another key's call: not told apart) or ControlError.

    A call watched here is looked up here (its watch exists from the answer on, before its shared record); one
    watched elsewhere by the shared registry (its owner) and its call record (its route)."""
    supervisor = services.supervisor
    local = supervisor.live.get(session_id)
    if local is not None:
        watched = local.relay
        found = isinstance(watched, CallWatch) and watched.call.route == route
        owner = watched.session.principal.key_hash
    else:
        infos = await services.store.sessions(now=supervisor.wall())
        record = await services.calls.records.get(session_id)
        info = next((i for i in infos if i.session_id == session_id), None)
        found = info is not None and record is not None and record.route == route
        owner = info.key_hash if info is not None else ""
    if not found or not (principal.is_master or owner == principal.key_hash):
        raise NotFound(f"No live call {session_id}.")
    await supervisor.terminate(session_id, reason="client_hangup")
    log.info("call hangup asked", extra={"session_id": session_id, "key_hash": principal.key_hash})
