"""The live-captions page (docs/browser.md): served only when SIDECAR_CAPTIONS_PAGE is on.

    GET  /captions/                 the page (static/captions.html) and its assets under /captions/<name>
    POST /captions/token            a client secret minted with SIDECAR_CAPTIONS_KEY for a transcription
                                    session of the default transcription model, plus that model's price

Nothing here checks who calls: the operator puts /captions/ behind their own login at the ingress (the
token endpoint mints secrets billed to the captions key). The page commits its audio itself every 2 s
(the bound session turns server VAD off), so captions appear while it streams. With `?transport=webrtc` the
same token creates a WebRTC call through POST /v1/realtime/calls instead (docs/browser.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from sidecar import client_secrets
from sidecar.catalog import describe
from sidecar.config import Settings
from sidecar.errors import Refusal, ServiceUnavailable

if TYPE_CHECKING:
    from sidecar.app import Services

STATIC: Final = Path(__file__).parent / "static"
PAGE: Final = "captions.html"
ASSETS: Final[dict[str, str]] = {
    "captions.js": "text/javascript",
    "captions-worklet.js": "text/javascript",
    "captions.css": "text/css",
}
TOKEN_TTL_S: Final = 60
# Same-origin everything: the page's scripts, styles, the token fetch and the WebSocket ('self' covers ws/wss).
HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def captions_session(model: str) -> dict[str, Any]:
    """The settings a captions secret pins: PCM16 24 kHz in, transcription by `model`, no server VAD."""
    return {
        "type": "transcription",
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": {"model": model},
                "turn_detection": None,
            }
        },
    }


async def page(request: Request) -> Response:
    """GET /captions/: the page."""
    return FileResponse(STATIC / PAGE, media_type="text/html; charset=utf-8", headers=HEADERS)


async def asset(request: Request) -> Response:
    """GET /captions/<name>: one of the page's own files, nothing else."""
    name = request.path_params["name"]
    media_type = ASSETS.get(name)
    if media_type is None:
        return JSONResponse({"error": {"message": "Not found.", "type": "invalid_request_error"}}, status_code=404)
    return FileResponse(STATIC / name, media_type=media_type, headers=HEADERS)


async def token(request: Request) -> Response:
    """POST /captions/token: a client secret for one captions session, and the model's price for the page."""
    services: Services = request.app.state.services
    try:
        key = services.settings.captions_key
        if key is None:
            raise ServiceUnavailable("The captions page has no key: set SIDECAR_CAPTIONS_KEY.")
        model = services.catalog.default_transcription_model
        body = {
            "expires_after": {"anchor": "created_at", "seconds": TOKEN_TTL_S},
            "session": captions_session(model),
        }
        principal = await client_secrets.principal_of(services, key)
        answer = client_secrets.mint(services, principal, body)
    except Refusal as refusal:
        return JSONResponse(refusal.body(), status_code=refusal.status, headers=client_secrets.NO_STORE)
    answer["model"] = _price_row(services, model)
    return JSONResponse(answer, headers=client_secrets.NO_STORE)


def _price_row(services: Services, model: str) -> dict[str, Any]:
    """The model's public row from GET /v1/realtime/models (id, kind, unit, pricing)."""
    row = next(r for r in describe(services.catalog) if r["id"] == services.catalog.resolve(model).name)
    return {"id": row["id"], "kind": row["kind"], "unit": row["unit"], "pricing": row["pricing"]}


async def to_page(request: Request) -> Response:
    """GET /captions: to /captions/ (so the page's relative URLs resolve under it)."""
    return RedirectResponse("captions/", status_code=308)


def routes(settings: Settings) -> list[BaseRoute]:
    """The page's routes, or none when SIDECAR_CAPTIONS_PAGE is off."""
    if not settings.captions_page:
        return []
    return [
        Route("/captions", to_page, methods=["GET"]),
        Route("/captions/", page, methods=["GET"]),
        Route("/captions/token", token, methods=["POST"]),
        Route("/captions/{name}", asset, methods=["GET"]),
    ]
