"""What the Supervisor (control.py) drives of one live session, whatever carries it: a relayed WebSocket
(relay.Relay) or a watched WebRTC call (calls.watch.CallWatch). One place for the ending asked for, the idle and
length limits, the checkpoints, the running figures and the one final usage event.

A subclass sets, in its `__init__`: `session` (the Account), `publisher`, `checkpoint_s`, `idle_timeout_s`,
`max_session_s`, `clock`, `clock_ns`, `close_reason`, and calls `_start_supervision(loop)`; it moves
`_last_activity` (loop time) on whatever counts as activity (a client frame, a sideband event).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from sidecar.errors import Ending, ending

if TYPE_CHECKING:
    from sidecar.metering import Figures
    from sidecar.publisher import UsagePublisher
    from sidecar.surfaces.account import Account
    from sidecar.usage import UsageEvent


class Supervised:
    """The supervision half of a live session (see the module docstring)."""

    session: Account
    publisher: UsagePublisher
    checkpoint_s: float
    idle_timeout_s: float
    max_session_s: float
    clock: Callable[[], datetime]
    clock_ns: Callable[[], int]
    close_reason: str
    _ended: asyncio.Future[Ending]
    #: Resolves with the close reason once the session is over and billed.
    done: asyncio.Future[str]
    _started: float
    _last_activity: float
    _next_checkpoint: float

    def _start_supervision(self, loop: asyncio.AbstractEventLoop) -> None:
        """The session starts now (loop time): its ending and billing futures, its limits' and checkpoints' clock."""
        self._ended = loop.create_future()
        self.done = loop.create_future()
        self._started = self._last_activity = loop.time()
        self._next_checkpoint = self._started + self.checkpoint_s

    def end(self, code: str) -> None:
        """Ask the session to end with the contract's ending for `code` (idempotent, any task)."""
        if not self._ended.done():
            self._ended.set_result(ending(code))

    @property
    def ended(self) -> bool:
        """True once an ending was asked for or the session closed."""
        return self._ended.done() or bool(self.close_reason)

    def poll(self, now: float) -> UsageEvent | None:
        """Called by the supervisor a few times a second (loop time `now`): limits and checkpoints.

        Returns the checkpoint usage event it submitted, if one was due (the supervisor folds its figures
        into the metrics)."""
        if now - self._last_activity >= self.idle_timeout_s:
            self.end("idle_timeout")
        elif now - self._started >= self.max_session_s:
            self.end("max_duration")
        if now >= self._next_checkpoint and not self.close_reason:
            self._next_checkpoint = now + self.checkpoint_s
            event = self.session.usage_event("checkpoint", now=self.clock(), mono=self.clock_ns())
            self.publisher.submit(event)
            return event
        return None

    def figures(self) -> Figures:
        """The session's cumulative figures now."""
        return self.session.figures(now=self.clock_ns())

    def cost(self) -> Decimal:
        """The session's running cost now (budgets in flight)."""
        return self.session.cost(now=self.clock_ns())

    def _bill(self, reason: str) -> None:
        """The one final usage event of this session (a second call does nothing)."""
        if self.done.done():
            return
        self.close_reason = reason
        mono = self.clock_ns()
        self.session.core.on_end(now=mono)
        self.publisher.submit(self.session.usage_event("final", now=self.clock(), mono=mono, close_reason=reason))
        self.done.set_result(reason)
