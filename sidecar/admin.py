"""Admin HTTP API, master key only (docs/api.md, "The CLI").

    GET    /admin/sessions                live sessions on every replica
    DELETE /admin/sessions/{session_id}   end one session (close 4003) wherever it runs
    POST   /admin/revocations             {"key_hash" | "team_id" | "user_id": ...}: end every matching
                                          session on every replica (close 4001)
    POST   /admin/models/reload           rebuild the catalog (config.yaml and LiteLLM's DB-stored models)
                                          here, then on every other replica; open sessions keep theirs

Actions go to every replica over the control channel: appended to the control log `<prefix>:control:log`, then
pushed on `realtime:control`; a replica that missed the push reads the log within a heartbeat (sidecar/control.py).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Final

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sidecar.auth import credentials
from sidecar.control import ControlError, matching
from sidecar.errors import InvalidApiKey, Refusal, ServiceUnavailable, SidecarError

if TYPE_CHECKING:
    from sidecar.app import Services

log = logging.getLogger("sidecar.admin")

REVOCATION_FIELDS: Final = ("key_hash", "team_id", "user_id")


class BadRequest(Refusal):
    status = 400
    code = "invalid_request"
    error_type = "invalid_request_error"


class NotFound(Refusal):
    status = 404
    code = "session_not_found"
    error_type = "invalid_request_error"


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    creds = credentials(request.headers, ())
    if creds is None or not services.checker.is_master(creds.key):
        raise InvalidApiKey("The admin API needs the master key.")
    return services


def _guarded(handler: Any) -> Any:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request, _services(request))  # type: ignore[no-any-return]
        except ControlError as exc:
            refusal: Refusal = ServiceUnavailable("The control store is unreachable.")
            del exc
        except Refusal as exc:
            refusal = exc
        return JSONResponse(refusal.body(), status_code=refusal.status)

    return endpoint


async def list_sessions(request: Request, services: Services) -> Response:
    """Live sessions on every replica (this replica's are refreshed first)."""
    await services.supervisor.heartbeat()
    infos = await services.store.sessions(now=services.supervisor.wall())
    return JSONResponse({"object": "list", "data": [asdict(i) for i in infos]})


async def terminate_session(request: Request, services: Services) -> Response:
    """End one session wherever it runs."""
    session_id = request.path_params["session_id"]
    await services.supervisor.heartbeat()
    infos = await services.store.sessions(now=services.supervisor.wall())
    if not matching(infos, session_id=session_id):
        raise NotFound(f"No live session {session_id}.")
    await services.supervisor.terminate(session_id)
    return JSONResponse({"session_id": session_id, "status": "terminating"}, status_code=202)


async def revoke(request: Request, services: Services) -> Response:
    """End every live session of a key, team or user on every replica."""
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise BadRequest("The body must be JSON.") from exc
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object.")
    match = {f: body[f] for f in REVOCATION_FIELDS if isinstance(body.get(f), str) and body[f]}
    if len(match) != 1:
        raise BadRequest("Give exactly one of key_hash, team_id or user_id.")
    await services.supervisor.heartbeat()
    infos = await services.store.sessions(now=services.supervisor.wall())
    await services.supervisor.revoke(**match)
    return JSONResponse({"revoked": match, "sessions": len(matching(infos, **match))}, status_code=202)


async def reload_models(request: Request, services: Services) -> Response:
    """Rebuild the catalog now (a failure keeps the one in force: 503), then ask every other replica to."""
    if services.models is None:
        raise ServiceUnavailable("The models cannot be reloaded yet.")
    try:
        result = await services.models.reload()
    except ControlError:
        raise
    except SidecarError as exc:  # ConfigError, ProxyModelsUnavailable, an unpriced model: no secret in the text
        log.warning("models: reload failed, keeping the catalog in force: %s", exc)
        raise ServiceUnavailable(f"The models could not be reloaded ({exc}); the catalog in force is kept.") from exc
    body = result.to_json()
    try:
        await services.supervisor.reload_models()
        body["replicas"] = "asked"
    except ControlError:  # this replica reloaded; the others refresh on their own schedule
        log.warning("models: the control store is unreachable; other replicas were not asked to reload")
        body["replicas"] = "not asked (the control store is unreachable)"
    return JSONResponse(body)


def routes() -> list[Route]:
    """The admin routes."""
    return [
        Route("/admin/sessions", _guarded(list_sessions), methods=["GET"]),
        Route("/admin/sessions/{session_id}", _guarded(terminate_session), methods=["DELETE"]),
        Route("/admin/revocations", _guarded(revoke), methods=["POST"]),
        Route("/admin/models/reload", _guarded(reload_models), methods=["POST"]),
    ]
