"""The usage event and its Redis stream codec (docs/api.md, "Metering and billing").

One flat field map per stream entry, every value a string. Figures are cumulative for the session;
the event with the highest `seq` wins. `event_id` is the idempotency key.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Final, Literal

from sidecar.errors import SidecarError

SCHEMA: Final = "realtime.usage.v1"
EventType = Literal["checkpoint", "final"]
EVENT_TYPES: Final = ("checkpoint", "final")


class UsageDecodeError(SidecarError):
    """A stream entry is not a valid usage event. The message says which field and why."""


def rfc3339(moment: datetime) -> str:
    """RFC 3339 UTC with microseconds and a `Z`."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> datetime:
    """Parse what `rfc3339` writes (and any ISO 8601 with an offset). Raises ValueError."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError("timestamp has no timezone")
    return moment.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """One usage event. Decimal figures are exact; timestamps are aware UTC datetimes."""

    event_id: str
    type: EventType
    session_id: str
    seq: int
    key_hash: str
    key_alias: str
    user_id: str
    team_id: str
    model: str
    provider_model: str
    kind: str
    unit: str
    quantity: Decimal
    audio_seconds: Decimal
    audio_bytes: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal
    started_at: datetime
    ended_at: datetime | None = None
    close_reason: str = ""
    upstream_usage: str = ""
    budget_windows: str = ""
    schema: str = SCHEMA

    @staticmethod
    def new_id() -> str:
        """A fresh idempotency key."""
        return str(uuid.uuid4())

    def with_changes(self, **changes: object) -> UsageEvent:
        """A copy with some fields changed."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def to_fields(self) -> dict[str, str]:
        """The stream entry: a flat map of strings, in the contract's field order."""
        return {name: _encode(getattr(self, name)) for name in FIELD_ORDER}  # no asdict: it deep-copies

    @classmethod
    def from_fields(cls, raw: dict[bytes, bytes] | dict[str, str]) -> UsageEvent:
        """Decode a stream entry. Raises UsageDecodeError naming the bad field."""
        try:
            data = {_text(k): _text(v) for k, v in raw.items()}
        except UnicodeDecodeError as exc:
            raise UsageDecodeError("entry: a field is not UTF-8 text") from exc
        if data.get("schema") != SCHEMA:
            raise UsageDecodeError(f"schema: expected {SCHEMA!r}, got {data.get('schema')!r}")
        values: dict[str, object] = {}
        for f in fields(cls):
            if f.name not in data:
                if f.name in _OPTIONAL:
                    continue
                raise UsageDecodeError(f"{f.name}: missing")
            values[f.name] = _decode(f.name, data[f.name])
        if values["type"] not in EVENT_TYPES:
            raise UsageDecodeError(f"type: expected checkpoint or final, got {values['type']!r}")
        if not data["event_id"] or not data["session_id"]:
            raise UsageDecodeError("event_id and session_id must not be empty")
        if int(str(values["seq"])) < 1:
            raise UsageDecodeError("seq: must be 1 or more")
        return cls(**values)  # type: ignore[arg-type]


# docs/api.md's field order for a stream entry.
FIELD_ORDER: Final = (
    "event_id", "schema", "type", "session_id", "seq", "key_hash", "key_alias", "user_id", "team_id", "model",
    "provider_model", "kind", "unit", "quantity", "audio_seconds", "audio_bytes", "input_tokens", "output_tokens",
    "cost_usd", "started_at", "ended_at", "close_reason", "upstream_usage", "budget_windows",
)  # fmt: skip
# Fields an entry may lack: events written before they existed still decode (empty: the default).
_OPTIONAL: Final = frozenset({"ended_at", "close_reason", "upstream_usage", "budget_windows"})
_INTS: Final = frozenset({"seq", "audio_bytes", "input_tokens", "output_tokens"})
_DECIMALS: Final = frozenset({"quantity", "audio_seconds", "cost_usd"})


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _encode(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return rfc3339(value)
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)


def _decode(name: str, text: str) -> object:
    try:
        if name in _INTS:
            return int(text)
        if name in _DECIMALS:
            value = Decimal(text)
            if not value.is_finite():
                raise ValueError("not finite")
            return value
        if name == "started_at":
            return parse_rfc3339(text)
        if name == "ended_at":
            return parse_rfc3339(text) if text else None
    except (ValueError, InvalidOperation) as exc:
        raise UsageDecodeError(f"{name}: cannot parse {text[:40]!r}") from exc
    return text
