"""create_app(settings, ...) -> Starlette. The lifespan owns every resource and closes it.

Only this module and cli.py choose concrete implementations; tests pass their own (a key client on a
fake LiteLLM, a dialer, a publisher) through `create_app`'s keyword arguments.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from sidecar.auth import KeyChecker, authorize, credentials
from sidecar.catalog import Catalog, RealtimeModel, describe, load_catalog
from sidecar.config import Settings
from sidecar.errors import InvalidApiKey, KeyCheckError, ModelNotFound, Refusal, ServiceUnavailable
from sidecar.metering import SessionMeter
from sidecar.publisher import UsagePublisher
from sidecar.relay import Relay
from sidecar.session import Session
from sidecar.upstream import OPENAI_HOSTS, Dialer, connect_any, websocket_dialer

log = logging.getLogger("sidecar.app")


@dataclass
class Services:
    """Everything a request needs, built by the lifespan."""

    settings: Settings
    catalog: Catalog
    checker: KeyChecker
    publisher: UsagePublisher
    dialer: Dialer
    openai_hosts: Sequence[str]
    live: dict[str, Relay] = field(default_factory=dict)


def _refuse_response(refusal: Refusal) -> JSONResponse:
    return JSONResponse(refusal.body(), status_code=refusal.status)


def create_app(
    settings: Settings,
    *,
    catalog: Catalog | None = None,
    key_client: httpx.AsyncClient | None = None,
    publisher: UsagePublisher | None = None,
    dialer: Dialer | None = None,
    openai_hosts: Sequence[str] = OPENAI_HOSTS,
    environ: dict[str, str] | None = None,
) -> Starlette:
    """The sidecar's ASGI app. Anything not passed in is built from `settings` in the lifespan."""
    import os

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            cat = catalog or load_catalog(
                settings.litellm_config,
                environ=dict(os.environ if environ is None else environ),
                default_transcription_model=settings.default_transcription_model,
            )
            client = key_client
            if client is None and settings.litellm_url:
                client = await stack.enter_async_context(httpx.AsyncClient(base_url=settings.litellm_url, timeout=5.0))
            pub: UsagePublisher = (
                publisher if publisher is not None else await stack.enter_async_context(_default_publisher(settings))
            )
            services = Services(
                settings=settings,
                catalog=cat,
                checker=KeyChecker(master_key=cat.master_key, client=client, cache_s=settings.key_cache_s),
                publisher=pub,
                dialer=dialer
                or websocket_dialer(
                    max_frame_bytes=settings.max_frame_bytes, connect_timeout_s=settings.connect_timeout_s
                ),
                openai_hosts=openai_hosts,
            )
            app.state.services = services
            try:
                yield
            finally:
                for relay in list(services.live.values()):
                    relay.end("server_shutdown")

    routes = [
        WebSocketRoute("/v1/realtime", realtime_endpoint),
        WebSocketRoute("/realtime", realtime_endpoint),
        Route("/v1/realtime/models", models_endpoint),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


@asynccontextmanager
async def _default_publisher(settings: Settings) -> AsyncIterator[UsagePublisher]:
    """Redis when SIDECAR_REDIS_URL is set, else the embedded writer straight into the billing DB."""
    from sidecar.publisher import EmbeddedPublisher, RedisPublisher
    from sidecar.spool import Spool

    spool = Spool(settings.spool_dir)
    pub: UsagePublisher
    if settings.redis_url:
        import redis.asyncio as aioredis

        redis = aioredis.Redis.from_url(settings.redis_url)
        pub = RedisPublisher(redis, stream=settings.usage_stream, spool=spool)
    else:
        from sidecar.billing.writer import BillingWriter, make_engine, upgrade

        engine = make_engine(settings.database_url)
        upgrade(engine)
        writer = BillingWriter(engine)
        pub = EmbeddedPublisher(lambda events: writer.write(events, now=datetime.now(UTC)), spool=spool)
    await pub.start()
    try:
        yield pub
    finally:
        await pub.aclose()
        spool.close()
        if settings.redis_url:
            await redis.aclose()


async def models_endpoint(request: Request) -> Response:
    """GET /v1/realtime/models: the realtime models, their kind, unit and price."""
    services: Services = request.app.state.services
    return JSONResponse({"object": "list", "data": describe(services.catalog)})


async def healthz(request: Request) -> Response:
    """Liveness: the process answers."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Readiness: the catalog is loaded."""
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    return JSONResponse({"status": "ready", "models": len(services.catalog.models)})


def _model_name(websocket: WebSocket, catalog: Catalog) -> tuple[str, bool]:
    params = websocket.query_params
    transcription = params.get("intent") == "transcription"
    name = params.get("model") or ""
    if not name:
        if not transcription:
            raise ModelNotFound("A model query parameter is required (or intent=transcription).")
        name = catalog.default_transcription_model
    return name, transcription


async def realtime_endpoint(websocket: WebSocket) -> None:
    """/v1/realtime: authenticate, resolve, connect upstream, then relay (CONTRACT.md, endpoint)."""
    services: Services = websocket.app.state.services
    try:
        opened = await _open(websocket, services)
    except Refusal as refusal:
        await websocket.send_denial_response(_refuse_response(refusal))
        return
    relay, subprotocol, injection = opened
    await websocket.accept(subprotocol=subprotocol)
    services.live[relay.session.session_id] = relay
    try:
        if injection is not None:
            await relay.upstream.send(injection)
        reason = await relay.run()
        log.info(
            "session ended",
            extra={
                "session_id": relay.session.session_id,
                "key_hash": relay.session.principal.key_hash,
                "close_reason": reason,
            },
        )
    finally:
        services.live.pop(relay.session.session_id, None)


async def _open(websocket: WebSocket, services: Services) -> tuple[Relay, str | None, str | None]:
    """Everything before the upgrade. Raises a Refusal for each row of the contract's table."""
    subprotocols = websocket.scope.get("subprotocols") or []
    creds = credentials(websocket.headers, subprotocols)
    if creds is None:
        raise InvalidApiKey("You didn't provide an API key.")
    try:
        principal = await services.checker.principal(creds.key)
    except KeyCheckError as exc:
        raise ServiceUnavailable("The key service is unavailable; try again.") from exc
    name, transcription = _model_name(websocket, services.catalog)
    model = services.catalog.resolve(name)
    authorize(principal, model.name, now=datetime.now(UTC))
    settings = services.settings
    connected = await connect_any(
        model.deployments,
        services.dialer,
        transcription=transcription or model.kind == "realtime-transcription",
        openai_hosts=services.openai_hosts,
    )
    session = _new_session(model, connected.target.deployment, principal, settings, transcription)
    relay = Relay(
        client=websocket,
        upstream=connected.connection,
        session=session,
        publisher=services.publisher,
        checkpoint_s=settings.checkpoint_s,
        idle_timeout_s=settings.idle_timeout_s,
        max_session_s=settings.max_session_s,
    )
    injection = session.model_injection() if connected.target.inject_model else None
    return relay, creds.subprotocol, injection


def _new_session(
    model: RealtimeModel, deployment: Any, principal: Any, settings: Settings, transcription: bool
) -> Session:
    meter = SessionMeter(
        model.price,
        rounding=settings.rounding,  # type: ignore[arg-type]
        increment=settings.rounding_increment,
    )
    return Session(
        session_id="rs_" + uuid.uuid4().hex,
        model=model,
        deployment=deployment,
        principal=principal,
        meter=meter,
        started_at=datetime.now(UTC),
        transcription=transcription,
    )
