"""create_app(settings, ...) -> Starlette. The lifespan owns every resource and closes it.

Only this module and cli.py choose concrete implementations; tests pass their own (a key client on a
fake LiteLLM, a dialer, a publisher, a Redis client) through `create_app`'s keyword arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING

import httpx
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketState

from sidecar import admin, captions, client_secrets
from sidecar.auth import KeyChecker, MasterKeyCheck, Principal, authorize, credentials, hash_key, litellm_client
from sidecar.bodies import BodyLimit
from sidecar.calls import endpoints as call_endpoints
from sidecar.calls.http11 import HTTP11Pool
from sidecar.calls.offer import new_session_id
from sidecar.calls.orphans import RedisCallRecords
from sidecar.calls.passthrough import client_sideband
from sidecar.calls.passthrough import routes as sideband_routes
from sidecar.calls.provider import hangup_call
from sidecar.calls.tasks import Calls
from sidecar.catalog import (
    LIVE_ENDPOINT,
    REALTIME_ENDPOINT,
    TRANSLATION_ENDPOINT,
    Catalog,
    Deployment,
    RealtimeModel,
    describe,
)
from sidecar.catalog import Route as SessionRoute
from sidecar.catalog_reload import CatalogReloader
from sidecar.cli import check_prices
from sidecar.client_secrets import ClientSecrets, Grant, MemoryClaims, RedisClaims, Signer, is_client_secret
from sidecar.config import Settings
from sidecar.control import ControlStore, MemoryStore, RedisStore, Supervisor, budget_windows
from sidecar.errors import (
    Ending,
    InvalidApiKey,
    KeyCheckError,
    ModelNotFound,
    ModelNotTranscription,
    Refusal,
    ServiceUnavailable,
    SidecarError,
    UpstreamError,
    ending,
    refused,
)
from sidecar.metering import Rounding, SessionMeter
from sidecar.metrics import CONTENT_TYPE_LATEST, Metrics, multiprocess_dir
from sidecar.pinning import Pin
from sidecar.publisher import SpoolingPublisher, UsagePublisher
from sidecar.redis_conn import connect_redis
from sidecar.relay import Relay
from sidecar.scrub import REDACTED, Scrubber
from sidecar.session import Session
from sidecar.surfaces.account import Account
from sidecar.surfaces.core import SurfaceCore
from sidecar.surfaces.live import INVALID_START, LiveSession, LiveStart, parse_start
from sidecar.surfaces.live import error_event as live_error_event
from sidecar.surfaces.translation import TranslationSession
from sidecar.surfaces.xai import XaiSession
from sidecar.upstream import OPENAI_HOSTS, Dialer, connect_any, websocket_dialer

if TYPE_CHECKING:  # the billing DB stack (SQLAlchemy, ~25 MB) is imported only in embedded mode
    from sidecar.billing.writer import BillingWriter
    from sidecar.model_source import ModelSource

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
    supervisor: Supervisor
    store: ControlStore
    metrics: Metrics
    client_secrets: ClientSecrets
    #: The WebRTC calls being watched (sidecar/calls/tasks.py: `calls.start(watch)`).
    calls: Calls
    #: Whether LiteLLM accepts the master key (None: no LiteLLM URL, or a key client passed in).
    master_key_check: MasterKeyCheck | None = None
    #: The relay driver's monotonic clock in nanoseconds (GPT-Live's session seconds); tests pass their own.
    clock_ns: Callable[[], int] = time.monotonic_ns
    #: Rebuilds `catalog` (POST /admin/models/reload, every SIDECAR_MODELS_REFRESH_S with LiteLLM's database).
    models: CatalogReloader | None = None
    #: The provider HTTP client of WebRTC calls (create and hangup: sidecar/calls/provider.py).
    http: HTTP11Pool | None = None


def create_app(
    settings: Settings,
    *,
    catalog: Catalog | None = None,
    key_client: httpx.AsyncClient | None = None,
    publisher: UsagePublisher | None = None,
    dialer: Dialer | None = None,
    redis: aioredis.Redis | None = None,
    openai_hosts: Sequence[str] = OPENAI_HOSTS,
    environ: Mapping[str, str] | None = None,
    replica: str | None = None,
    clock_ns: Callable[[], int] = time.monotonic_ns,
    model_source: ModelSource | None = None,
) -> Starlette:
    """The sidecar's ASGI app. Anything not passed in is built from `settings` in the lifespan; `clock_ns` is
    the monotonic clock the relay driver meters session time by; `model_source` rebuilds the catalog (default:
    config.yaml and LiteLLM's DB-stored models, priced as the proxy prices them; sidecar/model_source.py) and
    says which source priced each model."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            env = dict(os.environ if environ is None else environ)
            source, refresh_prices = await _prices(stack, settings, env, model_source, catalog)
            if catalog is None:
                await refresh_prices()
            cat = catalog if catalog is not None else await asyncio.to_thread(source)
            client = recheck_client = key_client
            if client is None and settings.litellm_url:  # admission and re-checks: a connection pool each
                client = await stack.enter_async_context(litellm_client(settings.litellm_url, settings.key_lookups))
                recheck_client = await stack.enter_async_context(
                    litellm_client(settings.litellm_url, settings.key_rechecks)
                )
            shared = redis
            if shared is None and settings.redis_target is not None:
                shared = connect_redis(settings.redis_target, socket_timeout=10, socket_connect_timeout=5)
                stack.push_async_callback(shared.aclose)
            pub: UsagePublisher = (
                publisher
                if publisher is not None
                else await stack.enter_async_context(_default_publisher(settings, shared))
            )
            store: ControlStore = (
                RedisStore(
                    shared,
                    channel=settings.control_channel,
                    prefix=settings.control_prefix,
                    wait_replicas=settings.redis_target.wait_replicas if settings.redis_target is not None else 0,
                )
                if shared is not None
                else MemoryStore()
            )
            checker = KeyChecker(
                master_key=cat.master_key,
                client=client,
                recheck_client=recheck_client,
                cache_s=settings.key_cache_s,
                negative_cache_s=settings.key_negative_cache_s,
                lookups=settings.key_lookups,
                lookup_backlog=settings.key_lookup_backlog,
                rechecks=settings.key_rechecks,
            )
            stack.push_async_callback(checker.aclose)  # before the clients close (the stack unwinds in reverse)
            metrics = Metrics(multiprocess=multiprocess_dir())  # every worker's figures under serve --workers N
            supervisor = Supervisor(
                store=store,
                checker=checker,
                metrics=metrics,
                replica=replica or f"{socket.gethostname()}-{os.getpid()}",
                key_recheck_s=settings.key_recheck_s,
                max_sessions=settings.max_sessions,
                max_sessions_per_key=settings.max_sessions_per_key,
            )
            if isinstance(pub, SpoolingPublisher):
                metrics.spool_foreign_files.set(pub.foreign_spool_files)
            metrics.watch(
                live=lambda: len(supervisor.live),
                failures=lambda: pub.publish_failures,
                spool=lambda: pub.spool_depth,
            )
            app.state.services = Services(
                settings=settings,
                catalog=cat,
                checker=checker,
                publisher=pub,
                dialer=dialer
                or websocket_dialer(
                    max_frame_bytes=settings.max_frame_bytes, connect_timeout_s=settings.connect_timeout_s
                ),
                openai_hosts=openai_hosts,
                supervisor=supervisor,
                store=store,
                metrics=metrics,
                client_secrets=_client_secrets(settings, shared),
                calls=Calls(
                    supervisor,
                    records=RedisCallRecords(shared, prefix=settings.control_prefix) if shared is not None else None,
                ),
                master_key_check=await _check_master_key(stack, recheck_client, cat.master_key, settings)
                if key_client is None
                else None,
                clock_ns=clock_ns,
            )
            services = app.state.services
            services.http = await stack.enter_async_context(HTTP11Pool())  # closed after the calls end
            metrics.show_price_sources(source.sources)

            def put_in_force(fresh: Catalog) -> None:
                services.catalog = fresh  # request handlers read it per request; open sessions keep theirs
                metrics.show_price_sources(source.sources)

            services.models = reloader = CatalogReloader(
                source,
                cat,
                check=partial(check_prices, allow_unpriced=settings.allow_unpriced),
                on_change=put_in_force,
                prepare=refresh_prices,
            )
            tasks = {asyncio.create_task(supervisor.run(), name="supervisor")}
            supervisor.on_reload = partial(_reload_in_background, reloader, tasks)
            if settings.litellm_database_url:  # UI-added models are served or refused without a restart
                tasks.add(asyncio.create_task(reloader.run(settings.models_refresh_s), name="models refresh"))
            if shared is not None and services.http is not None:  # the calls of replicas that died are hung up
                sweeper = services.calls.sweep_forever(lambda: services.catalog, partial(hangup_call, services.http))
                tasks.add(asyncio.create_task(sweeper, name="call sweep"))
            try:
                yield
            finally:
                # Sessions still open here (a forced shutdown) end now and are billed before the publisher closes.
                await supervisor.drain(0)
                await services.calls.aclose()  # calls too: hung up and billed before the publisher closes
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    # Each voice route under every path LiteLLM serves it at (litellm/proxy/proxy_server.py's @app.websocket
    # paths, litellm/types/utils.py's route table): a client moved from the proxy keeps its URL.
    realtime, translation, live = RealtimeEndpoint(), RealtimeEndpoint(TRANSLATION_ENDPOINT), LiveEndpoint()
    routes = [
        *(WebSocketRoute(path, realtime) for path in ("/v1/realtime", "/realtime", "/openai/v1/realtime")),
        *(WebSocketRoute(path, translation) for path in (TRANSLATION_ENDPOINT, "/realtime/translations")),
        *(WebSocketRoute(path, live) for path in (LIVE_ENDPOINT, "/live/sessions", "/openai/v1/live/sessions")),
        Route("/v1/realtime/models", models_endpoint),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
        *admin.routes(),
        *client_secrets.routes(),
        *call_endpoints.routes(),
        *sideband_routes(),
        *captions.routes(settings),
    ]
    # Every HTTP body is capped while it streams in (sidecar/bodies.py); WebSockets pass straight through.
    body_limit = Middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return Starlette(routes=routes, lifespan=lifespan, middleware=[body_limit])


def _client_secrets(settings: Settings, redis: aioredis.Redis | None) -> ClientSecrets:
    """Claims in Redis when replicas share one, else in memory. Without SIDECAR_CLIENT_SECRET_KEY, embedded mode
    (one process) signs with a random key and Redis mode (several replicas) refuses to mint."""
    key = settings.client_secret_key
    if key is None and redis is None:
        key = secrets.token_urlsafe(32)
    return ClientSecrets(
        signer=Signer(key) if key is not None else None,
        claims=RedisClaims(redis, prefix=settings.control_prefix) if redis is not None else MemoryClaims(),
    )


@asynccontextmanager
async def _default_publisher(settings: Settings, redis: aioredis.Redis | None) -> AsyncIterator[UsagePublisher]:
    """Redis when SIDECAR_REDIS_URL is set, else the embedded writer straight into the billing DB."""
    from sidecar.publisher import EmbeddedPublisher, RedisPublisher, database_sink, redis_sink
    from sidecar.spool import Spool

    # The spool adopts only what a dead process spooled for this same sink (docs/billing.md).
    pub: UsagePublisher
    if redis is not None:
        spool = Spool(settings.spool_dir, sink=redis_sink(redis, stream=settings.usage_stream))
        target = settings.redis_target
        wait = target.wait_replicas if target is not None else 0
        pub = RedisPublisher(redis, stream=settings.usage_stream, spool=spool, wait_replicas=wait)
    else:
        from sidecar.billing.writer import BillingWriter, make_engine, upgrade

        engine = make_engine(settings.database_url, timeout_s=settings.db_timeout_s)
        upgrade(engine)
        writer = BillingWriter(engine, timeout_s=settings.db_timeout_s)
        spool = Spool(settings.spool_dir, sink=database_sink(settings.database_url))
        pub = EmbeddedPublisher(lambda events: writer.write_or_dead_letter(events, now=datetime.now(UTC)), spool=spool)
    await pub.start()
    # Embedded mode has no `sidecar consume`: this process closes crashed sessions as `lost` itself.
    sweeper = None if redis is not None else asyncio.create_task(_sweep_lost(writer, settings.lost_after_s))
    try:
        yield pub
    finally:
        if sweeper is not None:
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
        await pub.aclose()
        spool.close()


async def _prices(
    stack: AsyncExitStack,
    settings: Settings,
    environ: Mapping[str, str],
    source: ModelSource | None,
    catalog: Catalog | None,
) -> tuple[ModelSource, Callable[[], Awaitable[None]]]:
    """The model source (psycopg and the proxy's crypto are imported only here) and the coroutine function that
    refreshes its prices before each rebuild (the proxy's /model/info, else the price map, proxy_prices.py)."""
    from sidecar.model_source import ModelSource
    from sidecar.proxy_prices import PriceRefresher

    models = source if source is not None else ModelSource(settings, environ=environ)
    master = catalog.master_key if catalog is not None else await asyncio.to_thread(models.master_key)
    client = await stack.enter_async_context(httpx.AsyncClient())
    refresher = PriceRefresher(
        client, master_key=master, proxy_url=settings.litellm_url, environ=environ, bundled=models.bundled
    )

    async def refresh() -> None:
        fresh = await refresher.refresh()
        # A proxy that stops answering keeps its last prices, those `sidecar serve` started with included.
        if fresh.proxy is not None or models.prices is None or models.prices.proxy is None:
            models.prices = fresh

    return models, refresh


def _reload_in_background(reloader: CatalogReloader, tasks: set[asyncio.Task[None]]) -> None:
    """Another replica's `POST /admin/models/reload` (a control message): reload here too, without waiting."""

    async def reload() -> None:
        try:
            result = await reloader.reload()
        except SidecarError as exc:
            log.warning("models: reload asked by another replica failed, keeping the catalog in force: %s", exc)
            return
        log.info("models: reloaded as another replica asked: %s", result.to_json())

    task = asyncio.create_task(reload(), name="models reload")
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def _check_master_key(
    stack: AsyncExitStack, client: httpx.AsyncClient | None, master_key: str | None, settings: Settings
) -> MasterKeyCheck | None:
    """Start asking LiteLLM whether it accepts the master key, in the background (cancelled at shutdown)."""
    if client is None or master_key is None:
        return None
    check = MasterKeyCheck(client, master_key, url=settings.litellm_url or "")
    task = asyncio.create_task(check.run(), name="master key check")

    async def stop() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    stack.push_async_callback(stop)
    return check


async def _sweep_lost(writer: BillingWriter, horizon_s: float, *, every_s: float = 5.0) -> None:
    """Close sessions whose last checkpoint is older than the horizon (a crashed sidecar's), forever."""
    from sidecar.errors import SidecarError

    while True:
        try:
            await asyncio.to_thread(writer.close_lost, now=datetime.now(UTC), horizon_s=horizon_s)
        except SidecarError as exc:
            log.warning("lost-session sweep failed", extra={"reason": type(exc).__name__})
        await asyncio.sleep(every_s)


async def models_endpoint(request: Request) -> Response:
    """GET /v1/realtime/models: the realtime models, their kind, unit and price."""
    services: Services = request.app.state.services
    return JSONResponse({"object": "list", "data": describe(services.catalog)})


async def healthz(request: Request) -> Response:
    """Liveness: the process answers."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Readiness: this replica can serve (started, not draining).

    Redis is not asked: admission is fail-open, so an outage of the shared Redis would otherwise take every
    replica out of the Service at once; it shows in `sidecar_redis_up` and a warning instead."""
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    if services.supervisor.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    check = services.master_key_check
    if check is not None and (check.rejected or not check.checked.is_set()):
        status = "litellm rejects the master key" if check.rejected else "starting"
        return JSONResponse({"status": status}, status_code=503)
    return JSONResponse({"status": "ready", "models": len(services.catalog.models)})


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus exposition."""
    services: Services = request.app.state.services
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _model_label(websocket: WebSocket, catalog: Catalog, route: SessionRoute = REALTIME_ENDPOINT) -> str:
    """A refused session's model as a metric label: a model of the config, else "" (never a name a client
    made up: the label's values stay bounded by the config)."""
    params = websocket.query_params
    transcription = route == REALTIME_ENDPOINT and params.get("intent") == "transcription"
    name = params.get("model") or (catalog.default_transcription_model if transcription else "")
    return name if name in catalog.served(route) else ""


def _model_name(websocket: WebSocket, catalog: Catalog, route: SessionRoute) -> tuple[str, bool]:
    """(the model the connect names, whether it is a transcription session) from the query."""
    params = websocket.query_params
    transcription = route == REALTIME_ENDPOINT and params.get("intent") == "transcription"
    name = params.get("model") or ""
    if not name:
        if route != REALTIME_ENDPOINT:
            raise ModelNotFound("A model query parameter is required.")
        if not transcription:
            raise ModelNotFound("A model query parameter is required (or intent=transcription).")
        name = catalog.default_transcription_model
    return name, transcription


class RealtimeEndpoint:
    """/v1/realtime (or /v1/realtime/translations: the model in the query too) as a plain ASGI app (Starlette
    routes a class instance to it as is): the handshake and closing go through Starlette's WebSocket, the
    relayed frames through the ASGI receive and send themselves, without Starlette's per-message state checks
    (docs/performance.md)."""

    def __init__(self, route: SessionRoute = REALTIME_ENDPOINT) -> None:
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await realtime_endpoint(WebSocket(scope, receive=receive, send=send), receive, send, route=self.route)


class LiveEndpoint:
    """/v1/live/sessions as a plain ASGI app (see RealtimeEndpoint)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await live_endpoint(WebSocket(scope, receive=receive, send=send), receive, send)


async def realtime_endpoint(
    websocket: WebSocket, receive: Receive, send: Send, *, route: SessionRoute = REALTIME_ENDPOINT
) -> None:
    """/v1/realtime and /v1/realtime/translations: authenticate, resolve, admit, connect upstream, then relay
    (docs/api.md, endpoint). Every refusal is an HTTP answer before the upgrade."""
    call_id = websocket.query_params.get("call_id") if route == REALTIME_ENDPOINT else None
    if call_id is not None:  # a client's own sideband of its WebRTC call (sidecar/calls/passthrough.py)
        await client_sideband(websocket, REALTIME_ENDPOINT, call_id)
        return
    services: Services = websocket.app.state.services
    try:
        relay, subprotocol = await _open(websocket, services, receive, send, route)
    except Refusal as refusal:
        services.metrics.refusals.labels(refusal.code, _model_label(websocket, services.catalog, route)).inc()
        await websocket.send_denial_response(JSONResponse(refusal.body(), status_code=refusal.status))
        return
    await _run(websocket, services, relay, accept=True, subprotocol=subprotocol)


async def live_endpoint(websocket: WebSocket, receive: Receive, send: Send) -> None:
    """/v1/live/sessions: authenticate before the upgrade; after it, the first message must be a session.start
    naming the model (within SIDECAR_HANDSHAKE_TIMEOUT_S); then resolve, authorize, admit, connect and relay.
    A refusal after the upgrade is an error event and a close (docs/api.md, "/v1/live/sessions")."""
    services: Services = websocket.app.state.services
    metrics = services.metrics
    try:
        principal, grant, subprotocol = await _authenticate(websocket, services)
    except Refusal as refusal:
        metrics.refusals.labels(refusal.code, "").inc()
        await websocket.send_denial_response(JSONResponse(refusal.body(), status_code=refusal.status))
        return
    await websocket.accept(subprotocol=subprotocol)
    start = await _session_start(
        websocket, receive, services.settings.handshake_timeout_s, draining=services.supervisor.drain_started
    )
    if start is None:
        return
    if isinstance(start, Ending):
        metrics.refusals.labels(start.code, "").inc()
        await _refuse_live(websocket, start)
        return
    label = start.model if start.model in services.catalog.served(LIVE_ENDPOINT) else ""
    try:
        name = client_secrets.bound_model(grant, start.model) if grant is not None else start.model
        model = services.catalog.resolve(name, route=LIVE_ENDPOINT)
        relay = await _admit((websocket, receive, send), services, model, principal, grant=grant, start=start)
    except Refusal as refusal:
        metrics.refusals.labels(refusal.code, label).inc()
        await _refuse_live(websocket, refused(refusal))
        return
    await _run(websocket, services, relay, accept=False, subprotocol=None)


async def _session_start(
    websocket: WebSocket, receive: Receive, timeout_s: float, *, draining: asyncio.Event
) -> LiveStart | Ending | None:
    """The client's first message as a LiveStart, the Ending that refuses it (not a session.start, none within
    `timeout_s`, or the drain started first: `service_unavailable`, 1013, at once), or None when the client left
    first."""
    first = asyncio.ensure_future(receive())
    drained = asyncio.ensure_future(draining.wait())
    try:
        done, _ = await asyncio.wait((first, drained), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        drained.cancel()
        if not first.done():
            first.cancel()
    if first not in done:
        if drained in done:
            return refused(ServiceUnavailable("The server is draining; reconnect to another replica."))
        return ending("session_start_timeout")
    message = first.result()
    if message["type"] == "websocket.disconnect":
        websocket.client_state = WebSocketState.DISCONNECTED  # as Starlette's receive would record
        return None
    text = message.get("text")
    start = parse_start(text if isinstance(text, str) else "")  # GPT-Live defines no binary frames
    return start if isinstance(start, LiveStart) else ending(start.ending or INVALID_START)


async def _refuse_live(websocket: WebSocket, how: Ending) -> None:
    """A GPT-Live error event for a refusal after the upgrade, then the close (never raises)."""
    log.info("refused after the upgrade", extra={"reason": how.code})
    with contextlib.suppress(Exception):
        await websocket.send_text(live_error_event(how.code, how.message, error_type=how.error_type))
        await websocket.close(code=how.close_code, reason=how.code)


async def _run(
    websocket: WebSocket, services: Services, relay: Relay, *, accept: bool, subprotocol: str | None
) -> None:
    """Watch, upgrade (unless done), send the core's opening frames upstream, relay; bill exactly once."""
    supervisor = services.supervisor
    supervisor.attach(relay)
    try:
        await supervisor.register(relay)
        if accept:
            await websocket.accept(subprotocol=subprotocol)
        for frame in relay.session.core.opening():
            await relay.upstream.send(frame)
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
        await relay.abandon("client_abort")  # no-op unless the upgrade itself failed
        await supervisor.detach(relay)


async def _authenticate(connection: HTTPConnection, services: Services) -> tuple[Principal, Grant | None, str | None]:
    """(the principal, the client secret's grant if one was used, the subprotocol to select) of a WebSocket
    connect or an HTTP request (a WebRTC call's create or hangup). Raises InvalidApiKey or ServiceUnavailable."""
    subprotocols = connection.scope.get("subprotocols") or []
    creds = credentials(connection.headers, subprotocols)
    if creds is None:
        raise InvalidApiKey("You didn't provide an API key.")
    # A client secret (client_secrets.py) stands for the key that minted it, re-checked fresh by hash.
    grant = services.client_secrets.verify(creds.key) if is_client_secret(creds.key) else None
    try:
        if grant is not None:
            principal = await services.checker.lookup(grant.key_hash, fresh=True)
        else:
            principal = await services.checker.principal(creds.key)
    except KeyCheckError as exc:
        key_hash = grant.key_hash if grant is not None else hash_key(creds.key)
        log.warning("refused with 503: the key check failed", extra={"reason": str(exc), "key_hash": key_hash})
        raise ServiceUnavailable("The key service is unavailable; try again.") from exc
    return principal, grant, creds.subprotocol


async def _open(
    websocket: WebSocket, services: Services, receive: Receive, send: Send, route: SessionRoute
) -> tuple[Relay, str | None]:
    """Everything before the upgrade. Raises a Refusal for each row of the contract's table."""
    principal, grant, subprotocol = await _authenticate(websocket, services)
    if grant is not None:
        name = client_secrets.bound_model(grant, websocket.query_params.get("model"))
        transcription = grant.transcription
    else:
        name, transcription = _model_name(websocket, services.catalog, route)
    model = services.catalog.resolve(name, route=route)
    if transcription and model.kind != "realtime-transcription":
        raise ModelNotTranscription(
            f"The model `{model.name}` is a conversation model; a transcription session needs a transcription model."
        )
    relay = await _admit(
        (websocket, receive, send), services, model, principal, grant=grant, transcription=transcription
    )
    return relay, subprotocol


async def _admit(
    client: tuple[WebSocket, Receive, Send],
    services: Services,
    model: RealtimeModel,
    principal: Principal,
    *,
    grant: Grant | None = None,
    transcription: bool = False,
    start: LiveStart | None = None,
) -> Relay:
    """Authorize, claim the client secret, take a lease, connect. Raises a Refusal."""
    session_id = await admit_session(services, model, principal, grant=grant)
    try:
        return await _connect(client, services, model, principal, session_id, transcription, grant=grant, start=start)
    except BaseException:
        await services.supervisor.release(principal, session_id)
        raise


async def admit_session(services: Services, model: RealtimeModel, principal: Principal, *, grant: Grant | None) -> str:
    """Authorize, claim the client secret, take a lease (budgets checked): the new session's id (a WebSocket
    session's or a WebRTC call's). Raises a Refusal; the caller releases the lease if the session never starts."""
    authorize(principal, model.name, now=datetime.now(UTC))
    if grant is not None:
        await services.client_secrets.claim(grant)
    session_id = new_session_id()
    await services.supervisor.admit(principal, session_id)
    return session_id


async def _connect(
    client: tuple[WebSocket, Receive, Send],
    services: Services,
    model: RealtimeModel,
    principal: Principal,
    session_id: str,
    transcription: bool,
    *,
    grant: Grant | None = None,
    start: LiveStart | None = None,
) -> Relay:
    """Open the first deployment that answers (failover) and build the session's core, account and relay."""
    settings = services.settings
    metrics = services.metrics
    route = _route_of(model)

    def failed(deployment: Deployment, error: UpstreamError) -> None:
        metrics.connect_failures.labels(model.name, deployment.deployment_id or deployment.model).inc()

    started = time.perf_counter()
    connected = await connect_any(
        model.deployments,
        services.dialer,
        transcription=transcription or model.kind == "realtime-transcription",
        openai_hosts=services.openai_hosts,
        on_failure=failed,
        route=route,
    )
    metrics.connect_seconds.observe(time.perf_counter() - started)
    deployment = connected.target.deployment
    account = _account(
        services,
        model,
        deployment,
        principal,
        session_id,
        transcription=transcription,
        grant=grant,
        start=start,
        inject_model=connected.target.inject_model,
        minted=connected.secrets,
    )
    websocket, receive, send = client
    return Relay(
        client=websocket,
        receive=receive,
        send=send,
        upstream=connected.connection,
        session=account,
        publisher=services.publisher,
        checkpoint_s=settings.checkpoint_s,
        idle_timeout_s=settings.idle_timeout_s,
        max_session_s=settings.max_session_s,
        walkout_wait_s=settings.walkout_wait_s,
        clock_ns=services.clock_ns,
    )


def _route_of(model: RealtimeModel) -> SessionRoute:
    """The route a resolved model was resolved on, from its kind (catalog._route_kind)."""
    if model.kind == "live-session":
        return LIVE_ENDPOINT
    if model.kind == "realtime-translation":
        return TRANSLATION_ENDPOINT
    return REALTIME_ENDPOINT


def _account(
    services: Services,
    model: RealtimeModel,
    deployment: Deployment,
    principal: Principal,
    session_id: str,
    *,
    transcription: bool,
    grant: Grant | None,
    start: LiveStart | None,
    inject_model: bool,
    minted: Sequence[str] = (),
) -> Account:
    """The session's core for its protocol, in the Account the relay bills through. `minted`: credentials
    minted to open the upstream (an Azure `ek_...`), scrubbed from its frames like the deployment's key."""
    settings = services.settings
    rounding: Rounding = settings.rounding  # type: ignore[assignment]
    increment = settings.rounding_increment
    windows = budget_windows(principal)
    started_at = datetime.now(UTC)
    core: SurfaceCore
    meter: SessionMeter | None
    if model.kind == "live-session" or model.kind == "realtime-translation":
        scrubber = Scrubber.for_deployment(deployment, public_model=model.name)
        for secret in minted:
            scrubber = scrubber.adding(secret, REDACTED)
        current: Callable[[], Scrubber] = lambda: scrubber  # noqa: E731 (the scrubber never changes)
        if start is not None:  # the live route always has the client's session.start
            core = LiveSession(
                start,
                upstream_model=deployment.model,
                price=model.price,
                scrub=scrubber.text,
                rounding=rounding,
                increment=increment,
            )
            meter = None
        else:
            translation = TranslationSession(
                public_model=model.name,
                upstream_model=deployment.model,
                price=model.price,
                scrub=scrubber.text,
                rounding=rounding,
                increment=increment,
            )
            core, meter = translation, translation.meter
    else:
        # An xAI model (kind realtime-session) bills session seconds and text messages (surfaces/xai.py).
        xai = model.kind == "realtime-session"
        session = (XaiSession if xai else Session)(
            session_id=session_id,
            model=model,
            deployment=deployment,
            principal=principal,
            meter=SessionMeter(model.price, rounding=rounding, increment=increment),
            started_at=started_at,
            transcription=transcription,
            pinned=Pin(grant.session) if grant is not None else None,
            transcribers=services.catalog.transcribers,
            default_transcriber=services.catalog.default_transcription_model,
            budget_windows=windows,
        )
        for secret in minted:
            session.hide(secret)
        # The bound settings go upstream first (they name the model where one is needed).
        session.prepare_opening(
            inject_model=inject_model, bound=client_secrets.session_update(grant) if grant is not None else None
        )
        core, meter, current = session, None if xai else session.meter, lambda: session.scrubber
    return Account(
        core,
        session_id=session_id,
        model=model,
        deployment=deployment,
        principal=principal,
        started_at=started_at,
        scrubber=current,
        meter=meter,
        budget_windows=windows,
    )
