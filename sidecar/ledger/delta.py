"""What one usage event adds to LiteLLM's ledger: the delta since the session's last applied event.

Pure (no I/O, no clock). Usage events carry cumulative figures per session; the sink keeps, per
session, the figures it last applied (`Applied`) and writes only the difference. `delta(last, event)`
returns a `Delta` to write, a `Skip` (the event's `seq` is not newer: a duplicate or a late
checkpoint, already covered), or a `DeadLetter` (the figures went backwards, or cannot be stored):
applying any order and duplication of a session's events therefore writes the highest-seq totals once.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Final

from sidecar.usage import UsageEvent

# LiteLLM's token columns are int4 (SpendLogs, daily tables): a larger delta cannot be stored.
INT4_MAX: Final = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Applied:
    """A session's cumulative figures as last applied to the ledger (the sink's marker row)."""

    seq: int
    cost_usd: Decimal
    input_tokens: int
    output_tokens: int
    audio_seconds: Decimal


ZERO: Final = Applied(seq=0, cost_usd=Decimal(0), input_tokens=0, output_tokens=0, audio_seconds=Decimal(0))


@dataclass(frozen=True, slots=True)
class Delta:
    """What to add for one event; `first` when it is the session's first applied event (one request)."""

    cost_usd: Decimal
    input_tokens: int
    output_tokens: int
    audio_seconds: Decimal
    first: bool
    totals: Applied

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens of the delta."""
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class Skip:
    """Nothing to write: the event is not newer than what was applied."""

    reason: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """The event must never be applied; `reason` says why (no secrets, no raw payload)."""

    reason: str


def totals(event: UsageEvent) -> Applied:
    """The cumulative figures an event carries."""
    return Applied(event.seq, event.cost_usd, event.input_tokens, event.output_tokens, event.audio_seconds)


def delta(last: Applied | None, event: UsageEvent) -> Delta | Skip | DeadLetter:
    """The delta `event` adds after `last` (None: nothing applied yet for its session)."""
    new = totals(event)
    if problem := _unstorable(new):
        return DeadLetter(problem)
    base = last or ZERO
    if new.seq <= base.seq:
        return Skip(f"seq {new.seq} is not newer than the applied seq {base.seq}")
    d = Delta(
        cost_usd=new.cost_usd - base.cost_usd,
        input_tokens=new.input_tokens - base.input_tokens,
        output_tokens=new.output_tokens - base.output_tokens,
        audio_seconds=new.audio_seconds - base.audio_seconds,
        first=last is None or last.seq == 0,
        totals=new,
    )
    negative = [name for name in _FIGURES if getattr(d, name) < 0]
    if negative:
        return DeadLetter(f"negative delta in {', '.join(negative)} (seq {base.seq} -> {new.seq})")
    if d.input_tokens > INT4_MAX or d.output_tokens > INT4_MAX or d.total_tokens > INT4_MAX:
        return DeadLetter("token delta exceeds LiteLLM's int4 columns")
    return d


_FIGURES: Final = ("cost_usd", "input_tokens", "output_tokens", "audio_seconds")


def _unstorable(figures: Applied) -> str:
    for name in ("cost_usd", "audio_seconds"):
        value: Decimal = getattr(figures, name)
        if not value.is_finite():
            return f"{name} is not finite"
        if not Decimal(float(value)).is_finite() or abs(value) > Decimal("1e15"):
            return f"{name} is too large to store"
    if figures.input_tokens < 0 or figures.output_tokens < 0:
        return "negative cumulative tokens"
    return ""
