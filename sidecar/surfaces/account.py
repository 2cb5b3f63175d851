"""Who pays for one relayed session, and its usage events: built from a core's `Figures`, in one place for
every protocol (issue 15, item 6: one billing path).

The relay driver holds one Account per session (`Relay.session`): the control path (control.py) reads who
the session belongs to from it, the billing path gets every checkpoint and the final from it. Pure: the
times are passed in (the wall clock for the event's timestamps, the driver's monotonic clock for the core).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from sidecar.usage import EventType, UsageEvent

if TYPE_CHECKING:
    from sidecar.auth import Principal
    from sidecar.catalog import Deployment, RealtimeModel
    from sidecar.metering import Figures, SessionMeter
    from sidecar.scrub import Scrubber
    from sidecar.surfaces.core import SurfaceCore


def usage_event(
    kind: EventType,
    figures: Figures,
    *,
    seq: int,
    session_id: str,
    principal: Principal,
    model: RealtimeModel,
    deployment: Deployment,
    started_at: datetime,
    now: datetime,
    close_reason: str = "",
    budget_windows: str = "",
) -> UsageEvent:
    """The usage event of a session's cumulative `figures`. A final carries ended_at and close_reason."""
    final = kind == "final"
    return UsageEvent(
        event_id=UsageEvent.new_id(),
        type=kind,
        session_id=session_id,
        seq=seq,
        key_hash=principal.key_hash,
        key_alias=principal.key_alias,
        user_id=principal.user_id,
        team_id=principal.team_id,
        model=model.name,
        provider_model=f"{deployment.provider}/{deployment.model}",
        kind=model.kind,
        unit=figures.unit,
        quantity=figures.quantity,
        audio_seconds=figures.audio_seconds,
        audio_bytes=figures.audio_bytes,
        input_tokens=figures.input_tokens,
        output_tokens=figures.output_tokens,
        cost_usd=figures.cost_usd,
        started_at=started_at,
        ended_at=now if final else None,
        close_reason=close_reason if final else "",
        upstream_usage=figures.upstream_usage,
        budget_windows=budget_windows,
    )


class Account:
    """One relayed session's owner, model and deployment, its core, and the sequence of its usage events."""

    __slots__ = (
        "__weakref__",  # tests check nothing of an ended session stays alive
        "_scrubber",
        "budget_windows",
        "core",
        "deployment",
        "meter",
        "model",
        "principal",
        "seq",
        "session_id",
        "started_at",
    )

    def __init__(
        self,
        core: SurfaceCore,
        *,
        session_id: str,
        model: RealtimeModel,
        deployment: Deployment,
        principal: Principal,
        started_at: datetime,
        scrubber: Callable[[], Scrubber],
        meter: SessionMeter | None = None,
        budget_windows: str = "",
    ) -> None:
        """`scrubber` gives the session's current scrubber (a /v1/realtime session widens its own when it
        names a transcriber); `meter` is the core's audio/token meter when it has one (its running cost is
        cheaper than a full snapshot, and its reconciliation counters feed the metrics)."""
        self.core = core
        self.session_id = session_id
        self.model = model
        self.deployment = deployment
        self.principal = principal
        self.started_at = started_at
        self.meter = meter
        #: The usage events' `budget_windows` (control.budget_windows), fixed at the session's start.
        self.budget_windows = budget_windows
        self.seq = 0
        self._scrubber = scrubber

    @property
    def scrubber(self) -> Scrubber:
        """What keeps the deployment's key, host and names from the client (close reasons, binary frames)."""
        return self._scrubber()

    def figures(self, *, now: int) -> Figures:
        """The core's cumulative figures at the driver's monotonic `now`."""
        return self.core.figures(now=now)

    def cost(self, *, now: int) -> Decimal:
        """The session's running cost (budgets in flight)."""
        return self.meter.cost() if self.meter is not None else self.core.figures(now=now).cost_usd

    def usage_event(self, kind: EventType, *, now: datetime, mono: int, close_reason: str = "") -> UsageEvent:
        """The next cumulative usage event (seq 1, 2, ...): wall time `now`, the core's figures at `mono`."""
        self.seq += 1
        return usage_event(
            kind,
            self.core.figures(now=mono),
            seq=self.seq,
            session_id=self.session_id,
            principal=self.principal,
            model=self.model,
            deployment=self.deployment,
            started_at=self.started_at,
            now=now,
            close_reason=close_reason,
            budget_windows=self.budget_windows,
        )
