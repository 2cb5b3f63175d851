"""Usage events for tests and benchmarks: one transcription session's cumulative figures after `seq` checkpoints."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Final

from sidecar.usage import UsageEvent

T0: Final = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
CHECKPOINT_S: Final = 5


def usage_event(
    session_id: str, seq: int, *, final: bool = False, started_at: datetime = T0, **changes: object
) -> UsageEvent:
    """Usage after `seq` checkpoints of 5 s each (a final one ends then, client_close); `changes` override fields."""
    seconds = Decimal(CHECKPOINT_S * seq)
    event = UsageEvent(
        event_id=UsageEvent.new_id(),
        type="final" if final else "checkpoint",
        session_id=session_id,
        seq=seq,
        key_hash="ab" * 32,
        key_alias="team-a-key",
        user_id="user-1",
        team_id="team-a",
        model="gpt-realtime-whisper",
        provider_model="openai/gpt-realtime-whisper",
        kind="realtime-transcription",
        unit="second",
        quantity=seconds,
        audio_seconds=seconds,
        audio_bytes=48_000 * CHECKPOINT_S * seq,
        input_tokens=0,
        output_tokens=0,
        cost_usd=seconds * Decimal("0.0001"),
        started_at=started_at,
        ended_at=started_at + timedelta(seconds=CHECKPOINT_S * seq) if final else None,
        close_reason="client_close" if final else "",
    )
    return event.with_changes(**changes) if changes else event
