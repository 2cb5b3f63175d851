"""CallWatch: watches, bills and controls one WebRTC call through its sideband, for the call's whole life.

    provider --sideband (server events)--> CallWatch --core.on_upstream_text--> the session's core (bills)
    Supervisor (control.py) --poll()--> checkpoints, idle and length limits; --end(code)--> hangup
    CallWatch --hangup()--> provider: the call ends, its sidebands close, the call is billed once

For the Supervisor a CallWatch is what a relay.Relay is (control.Watched): the Account, `end`, `poll`,
`figures`, `cost`, `done`, `close_reason`. Nobody is on the other end of the sideband: the core's output is
discarded, the core only meters (/v1/realtime's session.Session from `response.done` and transcription usage;
GPT-Live's surfaces.live.LiveSession from session seconds on the sidecar's clock, started at the answer).

The rules (docs/api.md, "WebRTC calls: watching and billing"):
- idle: no server event on the sideband for `idle_timeout_s` (a call nobody speaks in sends none) ends the
  call as `idle_timeout`; `max_session_s` from the answer ends it as `max_duration`.
- a sideband that closes (whatever its close code: a provider may close one while the call goes on), aborts or
  fails is re-attached at once, with back-off, for at most `reattach_s` from the drop (the first attach too).
  A re-attach the provider answers 404 or 410 means the call is over (`upstream_close`: the client left, the
  provider ended it). No sideband within the bound: the call is hung up and billed with what was seen
  (`sideband_lost`). What a drop can leave unbilled: usage the provider reported only while no sideband was
  attached.
- every other ending asks the provider to hang the call up (at most once; a failure is logged, never
  raised), waits at most `close_wait_s` for the sideband to close (usage that arrives meanwhile is billed),
  then submits exactly one final usage event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TypeVar

from websockets.exceptions import ConnectionClosed

from sidecar.calls.call import ProviderCall
from sidecar.calls.guard import Hangup, Restore, SettingsGuard
from sidecar.errors import UpstreamError
from sidecar.publisher import UsagePublisher
from sidecar.supervised import Supervised
from sidecar.surfaces.account import Account
from sidecar.surfaces.live import LiveSession
from sidecar.upstream import Upstream

if TYPE_CHECKING:
    from sidecar.surfaces.core import SurfaceCore

log = logging.getLogger("sidecar.calls")

#: Back-off between sideband attach attempts: doubled from the first up to the last, within `reattach_s`.
FIRST_BACKOFF_S: Final = 0.05
MAX_BACKOFF_S: Final = 1.0
#: The provider's answers to a sideband upgrade that mean the call is over (not a drop to retry).
CALL_GONE: Final = frozenset({404, 410})
#: Default bound on the wait for the sideband to close after the hangup (usage still arriving is billed).
CLOSE_WAIT_S: Final = 5.0

T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


def start_clock(core: SurfaceCore, now: int) -> None:
    """A session-priced core bills the call's wall-clock time from the answer (`now`), not from the sideband's
    `session.started` (which a re-attach repeats)."""
    if isinstance(core, LiveSession):
        core.answered(now)


class CallWatch(Supervised):
    """Watches one WebRTC call: holds its sideband, bills it through its Account, ends it by hangup."""

    #: The call's audio never passes through the sidecar: the provider's reported seconds are all there is
    #: (control.py reads this before reconciling metered against reported audio).
    meters_audio = False

    def __init__(
        self,
        *,
        session: Account,
        call: ProviderCall,
        hangup: Callable[[], Awaitable[None]],
        attach: Callable[[], Awaitable[Upstream]],
        publisher: UsagePublisher,
        checkpoint_s: float,
        idle_timeout_s: float,
        max_session_s: float,
        reattach_s: float,
        close_wait_s: float = CLOSE_WAIT_S,
        clock: Callable[[], datetime] = utcnow,
        clock_ns: Callable[[], int] = time.monotonic_ns,
        guard: SettingsGuard | None = None,
    ) -> None:
        """Built when the provider has answered the offer (the answer is the call's start). `hangup` asks the
        provider to end the call (calls.provider.hangup_call); `attach` opens its sideband (sideband.attach);
        `guard` (a realtime call's) follows the session changes the sideband shows (calls/guard.py)."""
        #: Who the call belongs to and its usage events (the control path reads it).
        self.session = session
        self.call = call
        self._core = session.core
        self._guard = guard
        self._hangup = hangup
        self._attach = attach
        self.publisher = publisher
        self.checkpoint_s = checkpoint_s
        self.idle_timeout_s = idle_timeout_s
        self.max_session_s = max_session_s
        self.reattach_s = reattach_s
        self.close_wait_s = close_wait_s
        self.clock = clock
        self.clock_ns = clock_ns
        self.close_reason = ""
        self._loop = asyncio.get_running_loop()
        self._start_supervision(self._loop)  # ending, billing, limits and checkpoints (supervised.Supervised)
        start_clock(self._core, clock_ns())
        # The Supervisor folds these into the relay counters: nothing is relayed for a call, so they stay 0.
        self.frames_in = self.frames_out = self.bytes_in = self.bytes_out = 0
        #: Server events received on the sideband; sideband attaches (the first included); sidebands that
        #: closed or failed without the sidecar asking (the last one of a call the provider ended included).
        self.events = self.attaches = self.drops = 0
        #: True once the provider was asked to hang the call up (or said the call was over: nothing to hang up).
        self.hung_up = False
        self.sideband: Upstream | None = None
        self._reading: asyncio.Task[None] | None = None

    # ---- the call --------------------------------------------------------------------------------

    async def run(self) -> str:
        """Watch the call until something ends it; returns the close reason. Hangs up and bills exactly once,
        also when cancelled. A first checkpoint (seq 1) is published at once."""
        self.publisher.submit(self.session.usage_event("checkpoint", now=self.clock(), mono=self.clock_ns()))
        reason = "server_shutdown"  # when cancelled before the watch decides
        try:
            reason = await self._watch()
            self.close_reason = reason
            self._core.on_end(now=self.clock_ns())  # session time stops at the hangup, not when billed
            if reason == "upstream_close":
                self.hung_up = True  # the provider says the call is over
            await self._hang_up()
            await self._let_close()
        finally:
            if not self.hung_up:
                await self._hang_up()
            await self._stop_reading()
            self._bill(self.close_reason or reason)
        return self.close_reason

    async def abandon(self, reason: str) -> None:
        """End a watch that never ran (e.g. cancelled at shutdown before it started): hang up, bill once."""
        if not self.done.done():
            await self._hang_up()
            self._bill(reason)

    async def _watch(self) -> str:
        """Attach, read, re-attach after a drop, until the call is over or ended; returns the close reason."""
        while True:
            attached = await self._unless_ended(self._attach_within_bound())
            if attached is None:
                return self._ended.result().close_reason
            if isinstance(attached, str):
                return attached
            self.sideband = attached
            self.attaches += 1
            if self._guard is not None and self.attaches > 1:
                self._guard.reattached()
            self._reading = reading = asyncio.create_task(self._read(attached), name="call sideband")
            await asyncio.wait((reading, self._ended), return_when=asyncio.FIRST_COMPLETED)
            if self._ended.done():
                return self._ended.result().close_reason  # the reader goes on until the sideband closes
            self._reading = self.sideband = None
            self.drops += 1
            self._log("sideband closed: re-attaching")

    async def _unless_ended(self, work: Coroutine[Any, Any, T]) -> T | None:
        """`work`'s result, or None when an ending comes first (`work` is then cancelled)."""
        task = asyncio.ensure_future(work)
        await asyncio.wait((task, self._ended), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None

    async def _attach_within_bound(self) -> Upstream | str:
        """A new sideband, or the close reason when there will be none: `upstream_close` (the provider says the
        call is gone) or `sideband_lost` (no sideband within `reattach_s`)."""
        deadline = self._loop.time() + self.reattach_s
        delay = FIRST_BACKOFF_S
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    return await self._attach()
            except TimeoutError:
                return "sideband_lost"
            except UpstreamError as exc:
                if exc.status in CALL_GONE:
                    return "upstream_close"
                self._log("sideband attach failed", reason=str(exc))
            except Exception as exc:  # a dialer's own failure: counted as a failed attempt, never raised
                self._log("sideband attach failed", reason=type(exc).__name__)
            if self._loop.time() + delay >= deadline:
                return "sideband_lost"
            await asyncio.sleep(delay)  # back-off before the next attempt
            delay = min(delay * 2, MAX_BACKOFF_S)

    async def _read(self, sideband: Upstream) -> None:
        """Feed every server event to the core until the sideband closes or fails (never raises)."""
        core, clock_ns, loop, guard = self._core, self.clock_ns, self._loop, self._guard
        try:
            while True:
                frame = await sideband.recv()
                self._last_activity = loop.time()
                self.events += 1
                if isinstance(frame, str):
                    core.on_upstream_text(frame, now=clock_ns())  # the output is for nobody: discarded
                    if guard is not None and (verdict := guard.on_text(frame)) is not None:
                        await self._obey(verdict, sideband)
        except ConnectionClosed:
            return
        except Exception as exc:  # a failing sideband is a drop, never a crash of the watch
            self._log("sideband failed", reason=type(exc).__name__)

    async def _obey(self, verdict: Restore | Hangup, sideband: Upstream) -> None:
        """Act on the guard's verdict: restore the pinned settings on the sideband, or end the call."""
        if isinstance(verdict, Restore):
            self._log("pinned setting changed on the call: restoring it", reason=verdict.setting)
            await sideband.send(verdict.frame)  # a failure is the sideband's: a drop, re-attached
            return
        if not self.ended:
            self._log("call settings changed: hanging up", reason=f"{verdict.code}: {verdict.detail}")
        self.end(verdict.code)

    async def _hang_up(self) -> None:
        """Ask the provider to end the call, once, within `close_wait_s`; a failure is logged, never raised."""
        if self.hung_up:
            return
        self.hung_up = True
        try:
            async with asyncio.timeout(self.close_wait_s):
                await self._hangup()
        except Exception as exc:  # the call may be over already; billing goes on either way
            self._log("hangup failed", reason=str(exc) if isinstance(exc, UpstreamError) else type(exc).__name__)

    async def _let_close(self) -> None:
        """Wait at most `close_wait_s` for the sideband to close after the hangup, billing what still arrives."""
        reading = self._reading
        if reading is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.close_wait_s):
                    await asyncio.shield(reading)

    async def _stop_reading(self) -> None:
        reading, sideband = self._reading, self.sideband
        self._reading = self.sideband = None
        if reading is not None:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
        if sideband is not None:
            with contextlib.suppress(Exception):
                await sideband.close()

    def _log(self, message: str, *, reason: str = "") -> None:
        session = self.session
        extra = {"session_id": session.session_id, "key_hash": session.principal.key_hash, "reason": reason}
        log.warning(message, extra=extra)
