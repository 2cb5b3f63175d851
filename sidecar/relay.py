"""The asyncio driver of one session, for every protocol: a direct path, two pumps, a ticker, one way out.

    client WebSocket --direct or pump_client--> core.on_client_text --> upstream
    client WebSocket <--direct or pump_upstream-- core.on_upstream_text <-- upstream
    Supervisor (control.py, one task for all sessions) --poll()--> checkpoints, idle and length limits

The core is the session's protocol (surfaces.core.SurfaceCore: /v1/realtime's session.Session, GPT-Live's
surfaces.live.LiveSession, translation's surfaces.translation.TranslationSession); the driver knows no event
name. It passes each core its monotonic clock (`clock_ns`, injectable), and builds every usage event through
the session's Account (surfaces.account): one driver, one billing path.

Direct path: when both connections offer it (sidecar.wsserver's protocol, sidecar.upstream_conn's
connection), a data frame is relayed inside the read callback that received it, with no task switch, as
long as the receiving side's pump is idle with nothing queued and the sending side's transport is
writable. Otherwise the frame is queued for the pump, so frames keep their order and a paused transport
always goes through the pumps' back-pressure.

Back-pressure: each pump awaits its send before reading the next frame, so a slow reader on either side
stops the other side's reads (websockets' `max_queue` then TCP flow control), never an unbounded buffer.
Whatever ends the session (either side closing or failing, a limit, an `end()` from control), every task
is cancelled, both sockets are closed, and exactly one `final` usage event is submitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from starlette.types import Receive, Send
from starlette.websockets import WebSocket, WebSocketState
from websockets.exceptions import ConnectionClosed

from sidecar.errors import Ending, ending
from sidecar.publisher import UsagePublisher
from sidecar.supervised import Supervised
from sidecar.surfaces.account import Account
from sidecar.surfaces.core import WalkoutOutcome
from sidecar.upstream import Upstream
from sidecar.upstream_conn import UpstreamConnection
from sidecar.wsserver import DIRECT, RelayWebSocketProtocol

log = logging.getLogger("sidecar.relay")

# Close codes a peer may send on the wire (RFC 6455 7.4: 1005, 1006 and 1015 are never sent).
_UNSENDABLE: Final = frozenset({1005, 1006, 1015})


def sendable(code: int | None, *, default: int = 1000) -> int:
    """A close code that can go on the wire."""
    if code is None or code in _UNSENDABLE or not (1000 <= code <= 4999):
        return default
    return code


def _aborted(message: Mapping[str, Any]) -> bool:
    """True when the client vanished without a close frame.

    uvicorn reports a lost connection as 1006 (before the handshake completed) or 1005 without a `reason`
    key; a received close frame always carries its `reason` (1005 only when the frame had no code).
    """
    code = message.get("code", 1000)
    return code == 1006 or (code == 1005 and "reason" not in message)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Relay(Supervised):
    """Relays one accepted client WebSocket to one open upstream connection (a control.Watched)."""

    #: The client's audio passes through here: metered audio is reconciled against the provider's report.
    meters_audio = True

    def __init__(
        self,
        *,
        client: WebSocket,
        receive: Receive,
        send: Send,
        upstream: Upstream,
        session: Account,
        publisher: UsagePublisher,
        checkpoint_s: float,
        idle_timeout_s: float,
        max_session_s: float,
        walkout_wait_s: float = 5.0,
        clock: Callable[[], datetime] = utcnow,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        """`clock` is the wall clock of the usage events' timestamps; `clock_ns` the monotonic clock the core
        meters by (GPT-Live's session seconds). `walkout_wait_s` bounds a walk-out's wait for the provider's
        answer (SIDECAR_WALKOUT_WAIT_S; see `_walk_out`)."""
        self.client = client
        # The relayed frames use the ASGI channel itself; `client` (Starlette) does the handshake and closing.
        self._receive = receive
        self._send = send
        self.upstream = upstream
        #: Who the session belongs to and its usage events (the control path reads it).
        self.session = session
        self._core = session.core
        self.clock_ns = clock_ns
        self.publisher = publisher
        self.checkpoint_s = checkpoint_s
        self.idle_timeout_s = idle_timeout_s
        self.max_session_s = max_session_s
        self.walkout_wait_s = walkout_wait_s
        #: The client left while the core awaited usage (a response in progress): `run` waits for it.
        self._walking_out = False
        self.clock = clock
        self.close_reason = ""
        self._loop = asyncio.get_running_loop()
        self._start_supervision(self._loop)  # ending, billing, limits and checkpoints (supervised.Supervised)
        # Per-session counters, folded into the Prometheus counters by the supervisor (not per frame).
        self.frames_in = self.frames_out = self.bytes_in = self.bytes_out = 0
        # A pump holds a frame it has not finished sending: the direct path waits (frame order).
        self._client_busy = self._upstream_busy = False
        self._direct: tuple[RelayWebSocketProtocol, UpstreamConnection] | None = None

    # ---- the session ------------------------------------------------------------------------------

    async def run(self) -> str:
        """Relay until something ends the session; returns the close reason. Bills exactly once.

        A first checkpoint (seq 1) is published at once, so a session whose process dies before its first
        interval still leaves a record for the consumer to close as `lost`.
        """
        self.publisher.submit(self.session.usage_event("checkpoint", now=self.clock(), mono=self.clock_ns()))
        self._open_direct()
        tasks: set[asyncio.Future[object]] = {
            asyncio.create_task(self._pump_client(), name="pump_client"),
            asyncio.create_task(self._pump_upstream(), name="pump_upstream"),
        }
        try:
            waiting: list[asyncio.Future[object]] = [*tasks, self._ended]  # type: ignore[list-item]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if self._walking_out:
                await self._walk_out(tasks)
            self._core.on_end(now=self.clock_ns())  # metering stops when the session does, not when billed
            if self._ended.done() and not self.close_reason:
                await self._finish(self._ended.result())
        finally:
            self._close_direct()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._close_quietly()
            self._bill(self.close_reason or "server_shutdown")
        return self.close_reason

    async def abandon(self, reason: str) -> None:
        """End a relay that never ran (its client upgrade failed): close the upstream and bill it once."""
        if not self.done.done():
            await self._close_quietly()
            self._bill(reason)

    # ---- the direct path ----------------------------------------------------------------------------

    def _open_direct(self) -> None:
        """Hand both connections a sink, when both offer the direct path (see the module docstring)."""
        extensions = self.client.scope.get("extensions") or {}
        client, upstream = extensions.get(DIRECT), self.upstream
        if not isinstance(client, RelayWebSocketProtocol) or not isinstance(upstream, UpstreamConnection):
            return
        self._direct = client, upstream
        client.sink = self._from_client
        upstream.sink = self._from_upstream

    def _close_direct(self) -> None:
        if self._direct is not None:
            client, upstream = self._direct
            client.sink = upstream.sink = None
            self._direct = None

    def _from_client(self, message: str | bytes) -> bool:
        """A client data frame, in the client's read callback: relayed now, or False to queue it."""
        direct = self._direct
        if direct is None or self._client_busy or self.close_reason:
            return False
        client, upstream = direct
        if not (upstream.writable_now and client.writable_now):
            return False
        to_client, to_upstream = self._client_frame(message)
        if to_client is not None:
            client.write_now(to_client)
        if to_upstream is not None:
            upstream.write_now(to_upstream)
        return True

    def _from_upstream(self, message: str | bytes) -> bool:
        """An upstream data frame, in the upstream's read callback: relayed now, or False to queue it."""
        direct = self._direct
        if direct is None or self._upstream_busy or self.close_reason:
            return False
        client = direct[0]
        if not client.writable_now:
            return False
        client.write_now(self._upstream_frame(message))
        return True

    # ---- one frame, either path -----------------------------------------------------------------------

    def _client_frame(self, message: str | bytes) -> tuple[str | None, str | bytes | None]:
        """Count one client data frame and decide it: (text for the client, message for the upstream)."""
        self._last_activity = self._loop.time()
        self.frames_in += 1
        self.bytes_in += len(message)
        if isinstance(message, str):
            reply = self._core.on_client_text(message, now=self.clock_ns())
            if reply.ending is not None:
                self.end(reply.ending)
            return reply.client, reply.upstream
        # No voice API defines binary client frames: refused, not forwarded unmetered (docs/billing.md).
        return self._core.error("binary_not_supported", "Send events as JSON text frames, not binary."), None

    def _upstream_frame(self, message: str | bytes) -> str | bytes:
        """Count one upstream data frame and return what the client gets (metered, scrubbed)."""
        self.frames_out += 1
        self.bytes_out += len(message)
        if isinstance(message, str):
            return self._core.on_upstream_text(message, now=self.clock_ns())
        return self.session.scrubber.data(message)

    # ---- the pumps ----------------------------------------------------------------------------------

    async def _send_text(self, text: str) -> None:
        await self._send({"type": "websocket.send", "text": text})

    async def _pump_client(self) -> None:
        receive = self._receive
        send_client = self._send_text
        send_up = self.upstream.send
        while True:
            self._client_busy = False
            message = await receive()
            self._client_busy = True
            if message["type"] == "websocket.disconnect":
                self.client.client_state = WebSocketState.DISCONNECTED  # as Starlette's receive would record
                code = message.get("code", 1000)
                if self.close_reason:  # the sidecar or the upstream ended it; this is the echo
                    return
                self.close_reason = (
                    "client_abort" if _aborted(message) else "frame_too_large" if code == 1009 else "client_close"
                )
                if self._core.awaiting:  # a response in progress: `run` asks for its usage first
                    self._walking_out = True
                    return
                with contextlib.suppress(Exception):
                    await self.upstream.close(sendable(code))
                return
            data = message.get("text")
            if data is None:
                data = message.get("bytes")
                if data is None:
                    continue
            to_client, to_upstream = self._client_frame(data)
            if to_client is not None:
                await send_client(to_client)
            if to_upstream is not None:
                await send_up(to_upstream)

    async def _pump_upstream(self) -> None:
        recv = self.upstream.recv
        send = self._send
        try:
            while True:
                self._upstream_busy = False
                frame = await recv()
                self._upstream_busy = True
                out = self._upstream_frame(frame)
                if isinstance(out, str):
                    await send({"type": "websocket.send", "text": out})
                else:
                    await send({"type": "websocket.send", "bytes": out})
        except ConnectionClosed as exc:
            if self.close_reason:
                return
            received = exc.rcvd
            if received is not None:
                self.close_reason = "client_close" if self._core.client_closing else "upstream_close"
                # Never the provider's reason as it came: it may name the key, host or deployment.
                await self._close_client(sendable(received.code), self.session.scrubber.reason(received.reason))
            else:
                await self._finish(ending("upstream_error"))

    # ---- walk-outs ---------------------------------------------------------------------------------

    async def _walk_out(self, tasks: set[asyncio.Future[object]]) -> None:
        """The client is gone while usage is still to come (a response in progress, whose usage only its
        `response.done` carries): send the core's `walkout()` frames (`response.cancel`) and feed upstream
        frames to the core, relaying none, until it awaits nothing more, the upstream closes, or
        `walkout_wait_s` passes. How it ended goes into the final event (docs/billing.md, "Walk-outs")."""
        self._close_direct()
        for task in tasks:  # the upstream pump stops: from here every upstream frame is the walk-out's
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        outcome: WalkoutOutcome = "response_done"
        try:
            async with asyncio.timeout(self.walkout_wait_s):
                for cancel in self._core.walkout():
                    await self.upstream.send(cancel)
                while self._core.awaiting:
                    frame = await self.upstream.recv()
                    if isinstance(frame, str):
                        self._core.on_upstream_text(frame, now=self.clock_ns())
        except TimeoutError:
            outcome = "timed_out"
        except Exception:  # the upstream closed or failed before answering: bill what is known
            outcome = "upstream_closed"
        self._core.on_walkout_end(outcome)
        session = self.session
        extra = {"session_id": session.session_id, "key_hash": session.principal.key_hash, "reason": outcome}
        log.info("walk-out: waited for the response in progress", extra=extra)  # reason: the outcome

    # ---- endings ----------------------------------------------------------------------------------

    async def _finish(self, how: Ending) -> None:
        """Send the error event, then close the client with the ending's code."""
        self.close_reason = how.close_reason
        with contextlib.suppress(Exception):
            await self._send_text(self._core.error(how.code, how.message, error_type=how.error_type))
        await self._close_client(how.close_code, how.code)

    async def _close_client(self, code: int, reason: str) -> None:
        if self.client.client_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.client.close(code=code, reason=reason)

    async def _close_quietly(self) -> None:
        with contextlib.suppress(Exception):
            await self.upstream.close()
        if self.client.client_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.client.close(code=1001 if not self.close_reason else 1000)
