"""The settings guard of a WebRTC call, pure: the transcriber followed from the provider's session events, the
model and a client secret's pinned settings kept (sidecar/calls/guard.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from sidecar.auth import Principal
from sidecar.calls.guard import MAX_RESTORES, Hangup, Restore, SettingsGuard
from sidecar.catalog import Deployment, RealtimeModel, Transcriber
from sidecar.errors import ending
from sidecar.metering import SessionMeter
from sidecar.pricing import Price
from sidecar.session import Session

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TOKENS = Price(unit="token", input_token=Decimal("0.000004"), output_token=Decimal("0.000016"))
SECONDS = Price(unit="second", per_unit=Decimal("0.0003"))
DEPLOYMENT = Deployment(provider="openai", model="gpt-realtime-2025", api_base="https://api.openai.com")
# Two transcribers on the call's provider (one under another name there), one on another provider only.
CHEAP = Transcriber(
    "cheap-whisper",
    Price(unit="second", per_unit=Decimal("0.0001")),
    (Deployment("openai", "whisper-1", "https://api.openai.com"),),
)
DEAR = Transcriber(
    "dear-transcribe",
    Price(unit="second", per_unit=Decimal("0.0005")),
    (Deployment("openai", "dear-transcribe", "https://api.openai.com"),),
)
ELSEWHERE = Transcriber("azure-only", CHEAP.price, (Deployment("azure", "az-whisper", api_base="https://x.azure.com"),))
TRANSCRIBERS = {t.name: t for t in (CHEAP, DEAR, ELSEWHERE)}


def core(*, transcription: bool = False, models: tuple[str, ...] = ()) -> Session:
    kind = "realtime-transcription" if transcription else "realtime-conversation"
    price = SECONDS if transcription else TOKENS
    model = RealtimeModel(name="gpt-realtime", kind=kind, price=price, price_key="k", deployments=(DEPLOYMENT,))  # type: ignore[arg-type]
    return Session(
        session_id="rs_1",
        model=model,
        deployment=DEPLOYMENT,
        principal=Principal(key_hash="h" * 64, key_alias="a", user_id="u", team_id="t", models=models),
        meter=SessionMeter(price),
        started_at=T0,
        transcription=transcription,
        transcribers=TRANSCRIBERS,
        default_transcriber=CHEAP.name,
    )


def session(*, model: str = "gpt-realtime-2025", transcriber: str | None = None, **extra: Any) -> dict[str, Any]:
    """The whole session a provider's session event shows (GA)."""
    audio: dict[str, Any] = {
        "input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "transcription": {"model": transcriber} if transcriber else None,
        },
        "output": {"voice": "alloy"},
    }
    return {"type": "realtime", "model": model, "audio": audio, "instructions": "Be brief.", **extra}


def updated(shown: dict[str, Any], kind: str = "session.updated") -> str:
    return orjson.dumps({"type": kind, "event_id": "event_1", "session": shown}).decode()


def transcribed(c: Session, seconds: float) -> None:
    usage = {"type": "duration", "seconds": seconds}
    event = {"type": "conversation.item.input_audio_transcription.completed", "item_id": "i", "usage": usage}
    c.on_upstream_text(orjson.dumps(event).decode())


def transcription_cost(c: Session) -> Any:
    record = orjson.loads(c.figures().upstream_usage or "{}")
    return Decimal(str(record.get("transcription_cost_usd", 0))), record.get("transcription_unpriced", 0)


def test_a_transcriber_changed_on_the_call_prices_what_follows() -> None:
    """The provider's name for a configured transcriber (whisper-1 is cheap-whisper there): the usage before the
    change at the old transcriber's price, after it at the new one's; nothing to do."""
    c = core()
    guard = SettingsGuard(c, transcribers=TRANSCRIBERS)
    assert guard.on_text(updated(session(transcriber="whisper-1"), "session.created")) is None
    assert c.transcriber is CHEAP
    transcribed(c, 10.0)
    assert guard.on_text(updated(session(transcriber="dear-transcribe"))) is None
    assert c.transcriber is DEAR
    transcribed(c, 4.0)
    assert transcription_cost(c) == (Decimal("0.0030"), 0)  # 10 s x 0.0001 + 4 s x 0.0005


def test_the_beta_shape_names_the_transcriber_too() -> None:
    """A beta session (`input_audio_transcription`) is read at its GA path."""
    c = core()
    guard = SettingsGuard(c, transcribers=TRANSCRIBERS)
    beta = {"model": "gpt-realtime-2025", "input_audio_transcription": {"model": "dear-transcribe"}}
    assert guard.on_text(updated(beta)) is None and c.transcriber is DEAR


def test_an_unpriceable_transcriber_hangs_up_and_prices_nothing_more() -> None:
    """A transcriber the config does not have on this provider (or at all): hang up as transcriber_refused; usage
    arriving before the hangup is recorded unpriced, not billed at the previous transcriber's price."""
    for name in ("gpt-4o-transcribe", "az-whisper"):
        c = core()
        guard = SettingsGuard(c, transcribers=TRANSCRIBERS)
        guard.on_text(updated(session(transcriber="whisper-1")))
        transcribed(c, 10.0)
        assert guard.on_text(updated(session(transcriber=name))) == Hangup("transcriber_refused", name)
        transcribed(c, 3.0)
        assert transcription_cost(c) == (Decimal("0.0010"), 1)
    assert ending("transcriber_refused").close_code == 1008


def test_a_transcriber_the_key_may_not_use_hangs_up_priced_at_its_own_price() -> None:
    """A key limited to cheap-whisper: a change to dear-transcribe is billed as what it is, and the call hung up."""
    c = core(models=("gpt-realtime", "cheap-whisper"))
    guard = SettingsGuard(c, transcribers=TRANSCRIBERS)
    assert guard.on_text(updated(session(transcriber="dear-transcribe"))) == Hangup(
        "transcriber_refused", "dear-transcribe"
    )
    assert c.transcriber is DEAR


def test_no_transcription_changes_nothing_and_other_frames_are_not_read() -> None:
    """transcription null keeps the transcriber; frames other than session events give no verdict."""
    c = core()
    guard = SettingsGuard(c, transcribers=TRANSCRIBERS)
    assert guard.on_text(updated(session())) is None and c.transcriber is CHEAP
    assert guard.on_text('{"type":"response.done","response":{"usage":{}}}') is None
    assert guard.on_text("not json session.updated") is None


def test_the_model_changed_hangs_up() -> None:
    """The first model shown is the call's; another later is model_mismatch (also a transcription call's)."""
    guard = SettingsGuard(core(), transcribers=TRANSCRIBERS)
    assert guard.on_text(updated(session(), "session.created")) is None
    assert guard.on_text(updated(session(model="gpt-realtime-mini"))) == Hangup("model_mismatch", "gpt-realtime-mini")
    t = SettingsGuard(core(transcription=True), transcribers=TRANSCRIBERS)
    shown = {"type": "transcription", "audio": {"input": {"transcription": {"model": "gpt-realtime-whisper"}}}}
    assert t.on_text(updated(shown, "transcription_session.updated")) is None
    shown["audio"]["input"]["transcription"]["model"] = "whisper-1"
    assert t.on_text(updated(shown)) == Hangup("model_mismatch", "whisper-1")


BOUND = {
    "type": "realtime",
    "model": "gpt-realtime",
    "instructions": "Be brief.",
    "audio": {"input": {"transcription": {"model": "cheap-whisper"}}, "output": {"voice": "alloy"}},
}


def pinned() -> tuple[Session, SettingsGuard]:
    c = core()
    guard = SettingsGuard(c, transcribers=TRANSCRIBERS, bound=BOUND)
    assert guard.on_text(updated(session(transcriber="whisper-1"), "session.created")) is None
    return c, guard


def test_a_pinned_setting_changed_is_restored_with_the_bound_values() -> None:
    """The voice changed on the data channel: a session.update with the bound values (the transcriber by the
    provider's name, no model), once; the provider's answer showing them again ends the episode."""
    _, guard = pinned()
    changed = session(transcriber="whisper-1")
    changed["audio"]["output"]["voice"] = "verse"
    verdict = guard.on_text(updated(changed))
    assert isinstance(verdict, Restore) and verdict.setting == "audio.output.voice"
    frame = orjson.loads(verdict.frame)
    assert frame == {
        "type": "session.update",
        "event_id": verdict.event_id,
        "session": {
            "type": "realtime",
            "instructions": "Be brief.",
            "audio": {"input": {"transcription": {"model": "whisper-1"}}, "output": {"voice": "alloy"}},
        },
    }
    assert BOUND["audio"]["input"]["transcription"]["model"] == "cheap-whisper"  # type: ignore[index]
    assert guard.on_text(updated(session(transcriber="whisper-1"))) is None and guard.restoring is None
    # A setting the secret left open may change freely.
    assert guard.on_text(updated(session(transcriber="whisper-1", tool_choice="none"))) is None


def test_a_pinned_setting_that_stays_changed_hangs_up() -> None:
    """After the restore, a session event still showing another value is session_pinned; so is an error that
    answers the restore."""
    _, guard = pinned()
    changed = session(transcriber="whisper-1", instructions="Say anything.")
    assert isinstance(guard.on_text(updated(changed)), Restore)
    assert guard.on_text(updated(changed)) == Hangup("session_pinned", "instructions")
    _, guard = pinned()
    restore = guard.on_text(updated(changed))
    assert isinstance(restore, Restore)
    other = {"type": "error", "error": {"type": "invalid_request_error", "code": "x", "event_id": "someone_else"}}
    assert guard.on_text(orjson.dumps(other).decode()) is None
    refused = {"type": "error", "error": {"type": "invalid_request_error", "code": "x", "event_id": restore.event_id}}
    assert guard.on_text(orjson.dumps(refused).decode()) == Hangup("session_pinned", "restore refused")
    assert ending("session_pinned").close_code == 1008


def test_a_pinned_transcriber_changed_is_priced_then_restored() -> None:
    """A bound transcriber changed to another allowed one: priced as shown while it lasts, then restored."""
    c, guard = pinned()
    verdict = guard.on_text(updated(session(transcriber="dear-transcribe")))
    assert isinstance(verdict, Restore) and verdict.setting == "audio.input.transcription.model"
    assert c.transcriber is DEAR
    assert guard.on_text(updated(session(transcriber="whisper-1"))) is None and c.transcriber is CHEAP


def test_a_pinned_object_replaced_by_null_is_a_change() -> None:
    """A bound object's leaves replaced by a non-object (transcription turned off) is a change."""
    _, guard = pinned()
    assert isinstance(guard.on_text(updated(session())), Restore)


def test_a_browser_that_keeps_changing_a_pinned_setting_is_hung_up_after_the_restores() -> None:
    """Each change restored (the provider then shows the bound value again), up to MAX_RESTORES; the next change
    hangs up."""
    _, guard = pinned()
    changed = session(transcriber="whisper-1", instructions="Say anything.")
    for _ in range(MAX_RESTORES):
        assert isinstance(guard.on_text(updated(changed)), Restore)
        assert guard.on_text(updated(session(transcriber="whisper-1"))) is None
    assert guard.on_text(updated(changed)) == Hangup("session_pinned", "instructions")


def test_a_beta_bound_transcriber_is_restored_by_the_providers_name() -> None:
    """A secret bound in the beta shape (`input_audio_transcription`): the restore names the provider's name."""
    c = core()
    bound = {"type": "realtime", "model": "gpt-realtime", "input_audio_transcription": {"model": "cheap-whisper"}}
    guard = SettingsGuard(c, transcribers=TRANSCRIBERS, bound=bound)
    assert guard.on_text(updated(session(transcriber="whisper-1"), "session.created")) is None
    verdict = guard.on_text(updated(session(transcriber="dear-transcribe")))
    assert isinstance(verdict, Restore)
    assert orjson.loads(verdict.frame)["session"] == {
        "type": "realtime",
        "input_audio_transcription": {"model": "whisper-1"},
    }


def test_a_transcription_calls_restore_never_names_its_model() -> None:
    """A transcription call's bound model is the model rule's: the restore leaves it out."""
    c = core(transcription=True)
    bound = {
        "type": "transcription",
        "audio": {"input": {"transcription": {"model": "gpt-realtime-whisper", "language": "en"}}},
    }
    guard = SettingsGuard(c, transcribers=TRANSCRIBERS, bound=bound)
    shown = {"type": "transcription", "audio": {"input": {"transcription": {"model": "w", "language": "en"}}}}
    assert guard.on_text(updated(shown, "session.created")) is None
    shown["audio"]["input"]["transcription"]["language"] = "fr"
    verdict = guard.on_text(updated(shown))
    assert isinstance(verdict, Restore) and verdict.setting == "audio.input.transcription.language"
    assert orjson.loads(verdict.frame)["session"] == {
        "type": "transcription",
        "audio": {"input": {"transcription": {"language": "en"}}},
    }


def test_a_restore_lost_with_a_dropped_sideband_is_sent_again_on_the_new_one() -> None:
    """After a re-attach the new sideband's session.created still showing the change gets a new restore (counted),
    not a hangup."""
    _, guard = pinned()
    changed = session(transcriber="whisper-1", instructions="Say anything.")
    first = guard.on_text(updated(changed))
    assert isinstance(first, Restore)
    guard.reattached()
    again = guard.on_text(updated(changed, "session.created"))
    assert isinstance(again, Restore) and again.event_id != first.event_id and guard.restores == 2
