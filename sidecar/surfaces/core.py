"""The one interface every protocol's session core implements, and what it returns (sans-I/O).

A core is driven by the relay driver, one call per frame, with `now` the driver's monotonic clock in
nanoseconds (`time.monotonic_ns()`): cores never read a clock, so tests pass any time they like.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from sidecar.catalog import Route
    from sidecar.metering import Figures

#: How a walk-out's wait ended: the provider answered, the wait timed out, or the upstream closed first.
WalkoutOutcome = Literal["response_done", "timed_out", "upstream_closed"]

#: Nanoseconds in a second: `now` is monotonic nanoseconds.
NS_PER_SECOND = 1_000_000_000


@dataclass(slots=True)  # not frozen: one per client frame, and a frozen __init__ costs twice as much
class Reply:
    """The outcome of one client frame: text for the upstream and/or for the client (either may be None),
    and `ending`, an error code of errors.py's endings table when the session must end after `client` is
    sent (e.g. `invalid_session_start`); None while the session goes on."""

    upstream: str | None
    client: str | None
    ending: str | None = None


class SessionClock:
    """Session time on the driver's clock, for cores billed by it (GPT-Live, xAI): from the provider's session
    start (`start`, the first call wins) to the session's end (`stop`, the first call wins). Pure: the times are
    the driver's monotonic nanoseconds, passed in."""

    __slots__ = ("ended_at", "started_at")

    def __init__(self) -> None:
        self.started_at: int | None = None
        self.ended_at: int | None = None

    def start(self, now: int) -> None:
        """The provider's session started now (ignored after the first call)."""
        if self.started_at is None:
            self.started_at = now

    def stop(self, now: int) -> bool:
        """The session ended now; True on the first call (the one that counts), False after it."""
        if self.ended_at is not None:
            return False
        self.ended_at = now
        return True

    def seconds(self, *, now: int) -> Fraction:
        """Exact seconds from the start to the end (or to `now` while running); 0 before the start."""
        if self.started_at is None:
            return Fraction(0)
        end = self.ended_at if self.ended_at is not None else now
        return Fraction(max(0, end - self.started_at), NS_PER_SECOND)


def unchanged(text: str) -> str:
    """The identity scrubber: a core built without one relays upstream text as it came (tests)."""
    return text


class SurfaceCore(Protocol):
    """One relayed session of one protocol: what it parses, meters, rewrites and scrubs. Never raises on
    what a peer sends: a bad frame becomes an error event in the protocol's own shape.

    The /v1/realtime core is session.Session; GPT-Live's live.LiveSession; translation's
    translation.TranslationSession. The relay driver (relay.py) drives any of them the same way.
    """

    @property
    def route(self) -> Route:
        """The route this core speaks (catalog.ROUTES)."""
        ...

    def opening(self) -> tuple[str, ...]:
        """Frames the driver sends upstream first, once it is connected, before any client frame."""
        ...

    def on_client_text(self, text: str, *, now: int) -> Reply:
        """Decide what one client text frame becomes."""
        ...

    def on_upstream_text(self, text: str, *, now: int) -> str:
        """The text to relay to the client for one upstream text frame: metered, scrubbed."""
        ...

    def on_end(self, *, now: int) -> None:
        """The session ended now (either side closed, the upstream dropped, the sidecar ended it): metering
        stops here. Idempotent: the first call wins."""
        ...

    @property
    def client_closing(self) -> bool:
        """True once the client asked the provider to end the session (GPT-Live's and translation's
        `session.close`): the provider's close that follows ends it as `client_close`, not `upstream_close`."""
        ...

    def error(self, code: str, message: str, *, error_type: str = "invalid_request_error") -> str:
        """An `error` server event in the protocol's own shape, serialised (the driver's endings and refusals)."""
        ...

    def figures(self, *, now: int) -> Figures:
        """The session's cumulative metering figures at `now` (after `on_end`, the final figures)."""
        ...

    # A walk-out (docs/billing.md, "Walk-outs"): the client is gone while usage the provider reports only at
    # a response's end is still to come. The driver sends `walkout()` upstream and relays upstream frames to
    # the core (not to the client) until `awaiting` is False or its wait times out, then `on_walkout_end`.
    # Read only when the client disconnects: nothing per frame.

    @property
    def awaiting(self) -> bool:
        """True while usage is still to come that only the provider's answer to `walkout()` would bring."""
        ...

    def walkout(self) -> tuple[str, ...]:
        """The frames that ask the provider to finish what is in progress (e.g. `response.cancel`)."""
        ...

    def on_walkout_end(self, outcome: WalkoutOutcome) -> None:
        """How the walk-out's wait ended: recorded in the figures' `upstream_usage.walkout`."""
        ...


class PaidAsItGoes:
    """The walk-out half of SurfaceCore for a core whose usage is counted as it goes (session seconds, input
    audio): a client that walks out leaves nothing still to come, so the session closes at once."""

    __slots__ = ()

    @property
    def awaiting(self) -> bool:
        """Never: nothing is billed only at a response's end."""
        return False

    def walkout(self) -> tuple[str, ...]:
        """Nothing to ask the provider for."""
        return ()

    def on_walkout_end(self, outcome: WalkoutOutcome) -> None:
        """Never called (`awaiting` is never True)."""
