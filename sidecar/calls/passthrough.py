"""A client's own sideband of its WebRTC call, through the sidecar: the owner's key only, relayed scrubbed, never
billed (the call's CallWatch bills every usage event of the call, whichever sideband asked for it).

    client --wss <sidecar>/v1/realtime?call_id=<session id>  |  /v1/live/sessions/{session id}/attach-->  sidecar
    sidecar --sideband.attach (the deployment's credential; any replica: the call's shared record)--> provider

The call is found by its session id in the live registry (its owner: the key it is billed to; the master key
too) and in the call records (orphans.py: the deployment and the provider's call id), so any replica serves it.
Frames go through a fresh core of the call's protocol (surfaces: the same checks as a WebSocket session: a
`session.update` naming another model is refused, the deployment's names and key are scrubbed from what the
client gets); that core's figures are never published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.responses import JSONResponse
from starlette.routing import WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketState
from websockets.exceptions import ConnectionClosed

from sidecar import app as app_module
from sidecar.admin import NotFound
from sidecar.auth import Principal
from sidecar.calls import sideband
from sidecar.catalog import LIVE_ENDPOINT
from sidecar.catalog import Route as SessionRoute
from sidecar.control import ControlError
from sidecar.errors import Refusal, ServiceUnavailable, UpstreamError
from sidecar.relay import sendable
from sidecar.surfaces.account import Account
from sidecar.surfaces.live import LiveStart
from sidecar.upstream import Upstream

if TYPE_CHECKING:
    from sidecar.app import Services

log = logging.getLogger("sidecar.calls")

LIVE_ATTACH_PATHS = tuple(f"{base}/{{session_id}}/attach" for base in ("/v1/live/sessions", "/live/sessions"))


def routes() -> list[WebSocketRoute]:
    """GPT-Live's client sideband routes (the realtime one is `/v1/realtime?call_id=`: app.realtime_endpoint)."""
    paths = (*LIVE_ATTACH_PATHS, "/openai/v1/live/sessions/{session_id}/attach")
    return [WebSocketRoute(path, LiveAttach()) for path in paths]


class LiveAttach:
    """/v1/live/sessions/{session_id}/attach as a plain ASGI app."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        websocket = WebSocket(scope, receive=receive, send=send)
        await client_sideband(websocket, LIVE_ENDPOINT, websocket.path_params["session_id"])


async def client_sideband(websocket: WebSocket, route: SessionRoute, session_id: str) -> None:
    """Authenticate, find the caller's live call, attach to the provider's sideband, relay until either side
    closes. Every refusal is an HTTP answer before the upgrade (404 `session_not_found` for an unknown call or
    another key's, not told apart)."""
    services: Services = websocket.app.state.services
    try:
        principal, _, subprotocol = await app_module._authenticate(websocket, services)
        account, upstream = await _attach(services, principal, route, session_id)
    except Refusal as refusal:
        services.metrics.refusals.labels(refusal.code, "").inc()
        await websocket.send_denial_response(JSONResponse(refusal.body(), status_code=refusal.status))
        return
    try:
        await websocket.accept(subprotocol=subprotocol)
        extra = {"session_id": session_id, "key_hash": principal.key_hash}
        log.info("client sideband attached", extra=extra)
        await _relay(websocket, upstream, account, services.clock_ns)
    finally:
        with contextlib.suppress(Exception):
            await upstream.close()


async def _attach(
    services: Services, principal: Principal, route: SessionRoute, session_id: str
) -> tuple[Account, Upstream]:
    """The core the frames go through and the provider's sideband. Raises NotFound or ServiceUnavailable."""
    try:
        await services.supervisor.heartbeat()  # this replica's calls are in the registry before it is read
        infos = await services.store.sessions(now=services.supervisor.wall())
        record = await services.calls.records.get(session_id)
    except ControlError as exc:
        raise ServiceUnavailable("The control store is unreachable; try again.") from exc
    info = next((i for i in infos if i.session_id == session_id), None)
    if info is None or record is None or record.route != route:
        raise NotFound(f"No live call {session_id}.")
    if not (principal.is_master or info.key_hash == principal.key_hash):
        raise NotFound(f"No live call {session_id}.")
    call = record.provider_call(services.catalog)
    model = services.catalog.served(route).get(record.model)
    if call is None or model is None:
        raise NotFound(f"No live call {session_id}.")
    start = LiveStart(model.name, {"type": "session.start", "session": {"model": model.name}})
    account = app_module._account(
        services,
        model,
        call.deployment,
        principal,
        session_id,
        transcription=model.kind == "realtime-transcription",
        grant=None,
        start=start if route == LIVE_ENDPOINT else None,
        inject_model=False,
    )
    try:
        upstream = await sideband.attach(call, services.dialer)
    except UpstreamError as exc:
        log.warning("client sideband: the provider refused", extra={"session_id": session_id, "reason": str(exc)})
        raise ServiceUnavailable("The call's sideband could not be opened; try again.") from exc
    return account, upstream


async def _relay(websocket: WebSocket, upstream: Upstream, account: Account, clock_ns: Callable[[], int]) -> None:
    """Both directions through the core until either side closes; then the other is closed."""
    core = account.core
    closed: list[tuple[int, str]] = []  # the provider's close, relayed to the client (scrubbed)

    async def from_client() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                websocket.client_state = WebSocketState.DISCONNECTED
                return
            text = message.get("text")
            if text is None:
                await websocket.send_text(core.error("binary_not_supported", "Send events as JSON text frames."))
                continue
            reply = core.on_client_text(text, now=clock_ns())
            if reply.client is not None:
                await websocket.send_text(reply.client)
            if reply.upstream is not None:
                await upstream.send(reply.upstream)

    async def from_provider() -> None:
        try:
            while True:
                frame = await upstream.recv()
                if isinstance(frame, str):
                    await websocket.send_text(core.on_upstream_text(frame, now=clock_ns()))
                else:
                    await websocket.send_bytes(account.scrubber.data(frame))
        except ConnectionClosed as exc:
            received = exc.rcvd
            code = sendable(received.code if received is not None else None)
            closed.append((code, account.scrubber.reason(received.reason) if received is not None else ""))

    tasks = [asyncio.create_task(from_client()), asyncio.create_task(from_provider())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if websocket.client_state == WebSocketState.CONNECTED:
        code, reason = closed[0] if closed else (1000, "")
        with contextlib.suppress(Exception):
            await websocket.close(code=code, reason=reason)
