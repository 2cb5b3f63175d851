"""What a fault did to billing, from three independent counts per client session (pure; no I/O).

- **sent**: the bytes of audio the client handed to the SDK before its session ended (each client has its
  own LiteLLM key, so its billing rows are found by the key's hash);
- **decoded**: the bytes the provider decoded for that session (tagged by the appends' `event_id`s);
- **billed**: the `audio_bytes` of the session's `realtime_usage` rows.

Per session, `lost = max(0, sent - billed)` and `double = max(0, billed - sent)`; a row sums them. Each
fault states the loss it may cause per session (`allowed_lost_s`): 0 for every fault the sidecar must ride
without losing a byte, one checkpoint interval (plus the supervisor's poll period, when a checkpoint falls
due between two polls) where a process holding unpublished usage is SIGKILLed, and the audio in flight for
faults that cut a connection (what the client wrote that the sidecar never read is neither decoded nor
billed). The invariants of every row: nothing double-billed, no session losing more than allowed, and the
provider never decoding audio that nobody pays for beyond the same allowance.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final

BYTES_PER_SECOND: Final = 48_000  # 24 kHz PCM16 mono (docs/billing.md, "Metering")
SUPERVISOR_POLL_S: Final = Decimal("0.25")  # control.Supervisor polls each relay (checkpoints) 4 times a second


def seconds(audio_bytes: int) -> Decimal:
    """Seconds of 24 kHz PCM16, exact to the microsecond (as the sidecar meters them)."""
    return (Decimal(audio_bytes) / BYTES_PER_SECOND).quantize(Decimal("0.000001"))


@dataclass(frozen=True)
class SessionFigures:
    """One client session's three counts (bytes) and how many billing rows its key has."""

    tag: str
    sent: int
    decoded: int
    billed: int
    rows: int

    @property
    def lost(self) -> int:
        return max(0, self.sent - self.billed)

    @property
    def double(self) -> int:
        return max(0, self.billed - self.sent)

    @property
    def unpaid_decoded(self) -> int:
        """Audio the provider decoded that no row bills."""
        return max(0, self.decoded - self.billed)


@dataclass(frozen=True)
class FaultRow:
    """A fault's line in the table, and why it failed (empty: every invariant held)."""

    fault: str
    sessions: int
    sent_s: Decimal
    decoded_s: Decimal
    billed_s: Decimal
    lost_s: Decimal
    worst_lost_s: Decimal
    double_s: Decimal
    allowed_lost_s: Decimal
    failures: tuple[str, ...] = ()
    note: str = ""
    skipped: str = ""  # set when the fault could not run here (the reason)

    @property
    def ok(self) -> bool:
        return not self.failures


CHUNK_S: Final = Decimal("0.1")  # one client append: the audio that can be in flight when a connection dies


def allowance_for_kill(checkpoint_s: Decimal) -> Decimal:
    """What a SIGKILLed sidecar may lose per session: its audio since the last checkpoint it published (one
    interval, plus one supervisor poll: the checkpoint is taken at the first poll after it falls due), plus the
    one append in flight when the process died."""
    return checkpoint_s + SUPERVISOR_POLL_S + CHUNK_S


def evaluate(fault: str, figures: Sequence[SessionFigures], *, allowed_lost_s: Decimal, note: str = "") -> FaultRow:
    """The row of `fault` from its sessions' figures, with every invariant that failed spelled out."""
    failures: list[str] = []
    if not figures or sum(f.sent for f in figures) == 0:
        failures.append("no audio was sent: the row proves nothing")
    allowed = allowed_lost_s
    for f in figures:
        if f.double:
            failures.append(
                f"{f.tag}: double-billed {seconds(f.double)} s (sent {seconds(f.sent)}, billed {seconds(f.billed)})"
            )
        if seconds(f.lost) > allowed:
            failures.append(f"{f.tag}: lost {seconds(f.lost)} s > {allowed} s allowed")
        if seconds(f.unpaid_decoded) > allowed:
            failures.append(f"{f.tag}: provider decoded {seconds(f.unpaid_decoded)} s nobody is billed for")
        if f.rows > 1:
            failures.append(f"{f.tag}: {f.rows} billing rows for one client session")
        if f.sent and f.rows == 0 and seconds(f.sent) > allowed:
            failures.append(f"{f.tag}: no billing row")
    return FaultRow(
        fault=fault,
        sessions=len(figures),
        sent_s=_total(f.sent for f in figures),
        decoded_s=_total(f.decoded for f in figures),
        billed_s=_total(f.billed for f in figures),
        lost_s=_total(f.lost for f in figures),
        worst_lost_s=max((seconds(f.lost) for f in figures), default=Decimal(0)),
        double_s=_total(f.double for f in figures),
        allowed_lost_s=allowed,
        failures=tuple(failures),
        note=note,
    )


def skipped(fault: str, reason: str) -> FaultRow:
    """A row for a fault this machine cannot make (it neither passes nor fails the run)."""
    zero = Decimal(0)
    return FaultRow(fault, 0, zero, zero, zero, zero, zero, zero, zero, skipped=reason)


def failed(fault: str, reason: str) -> FaultRow:
    """A row that could not be measured: it fails the run."""
    zero = Decimal(0)
    return FaultRow(fault, 0, zero, zero, zero, zero, zero, zero, zero, failures=(reason,))


def _total(values: Iterable[int]) -> Decimal:
    return seconds(sum(values))


HEADER: Final = (
    "| fault | sessions | sent s | decoded s | billed s | lost s (worst session) | double-billed s "
    "| allowed loss / session | result | what happened |"
)
RULE: Final = "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"


def table(rows: Sequence[FaultRow]) -> str:
    """The markdown table of `rows` (a skipped row says why in its result cell)."""
    lines = [HEADER, RULE]
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.fault} | - | - | - | - | - | - | - | not run | {r.skipped} |")
            continue
        result = "pass" if r.ok else "FAIL: " + "; ".join(r.failures[:3])
        lines.append(
            f"| {r.fault} | {r.sessions} | {r.sent_s:.3f} | {r.decoded_s:.3f} | {r.billed_s:.3f} "
            f"| {r.lost_s:.3f} ({r.worst_lost_s:.3f}) | {r.double_s:.3f} | {r.allowed_lost_s} | {result} | {r.note} |"
        )
    return "\n".join(lines)


@dataclass
class Matrix:
    """The rows so far; the run fails when any row that ran failed."""

    rows: list[FaultRow] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows if not r.skipped)

    def exit_status(self) -> int:
        return 0 if self.ok else 1
