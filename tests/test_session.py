"""The session state machine, pure: client frames, upstream frames, scrubbing and usage events."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest

from sidecar.auth import Principal
from sidecar.catalog import Deployment, RealtimeModel, Transcriber
from sidecar.metering import SessionMeter
from sidecar.pricing import Price
from sidecar.session import REDACTED, Session
from sidecar.usage import UsageEvent

T0 = datetime(2026, 1, 1, tzinfo=UTC)
PRICE = Price(unit="second", per_unit=Decimal("0.000283333333333"))
DEPLOYMENT = Deployment(
    provider="azure",
    model="my-deploy",
    api_base="https://res.openai.azure.com:8443",
    api_key="az-secret-key",
    api_version="2025-04-01-preview",
)


TOKENS = Price(unit="token", input_token=Decimal("0.000004"), output_token=Decimal("0.000016"))
# Transcription models a conversation session may name (Catalog.transcribers): one on this deployment's
# Azure resource under another deployment name, one served only by OpenAI.
WHISPER_1 = Transcriber(
    "whisper-1",
    Price(unit="second", per_unit=Decimal("0.0001")),
    (Deployment(provider="azure", model="my-whisper", api_base="https://res.openai.azure.com:8443"),),
)
TRANSCRIBE = Transcriber(
    "gpt-4o-transcribe",
    Price(unit="second", per_unit=Decimal("0.0001"), input_token=Decimal("0.0000025"), output_token=Decimal("0.00001")),
    (Deployment(provider="azure", model="gpt-4o-transcribe", api_base="https://other.openai.azure.com"),),
)
OPENAI_ONLY = Transcriber(
    "openai-whisper", WHISPER_1.price, (Deployment(provider="openai", model="whisper-1", api_base=None),)
)
TRANSCRIBERS = {t.name: t for t in (WHISPER_1, TRANSCRIBE, OPENAI_ONLY)}


def make(kind: str = "realtime-transcription", transcription: bool = True, *, models: tuple[str, ...] = ()) -> Session:
    price = PRICE if kind == "realtime-transcription" else TOKENS
    model = RealtimeModel(name="captions", kind=kind, price=price, price_key="k", deployments=(DEPLOYMENT,))  # type: ignore[arg-type]
    return Session(
        session_id="rs_1",
        model=model,
        deployment=DEPLOYMENT,
        principal=Principal(key_hash="h" * 64, key_alias="alias", user_id="u", team_id="t", models=models),
        meter=SessionMeter(price),
        started_at=T0,
        transcription=transcription,
        transcribers=TRANSCRIBERS,
        default_transcriber="whisper-1",
    )


def conversation(models: tuple[str, ...] = ()) -> Session:
    return make(kind="realtime-conversation", transcription=False, models=models)


def client(s: Session, event: dict[str, object]) -> tuple[dict[str, object] | None, dict[str, object] | None]:
    """Send one client event; (what goes upstream, what the client gets), parsed."""
    reply = s.on_client_text(orjson.dumps(event).decode())
    return (
        orjson.loads(reply.upstream) if reply.upstream else None,
        orjson.loads(reply.client) if reply.client else None,
    )


def upstream(s: Session, event: dict[str, object]) -> dict[str, object]:
    return orjson.loads(s.on_upstream_text(orjson.dumps(event).decode()))  # type: ignore[no-any-return]


def update(session: dict[str, object], **event: object) -> dict[str, object]:
    return {"type": "session.update", "session": session, **event}


def ga_format(fmt: dict[str, object]) -> dict[str, object]:
    return {"audio": {"input": {"format": fmt}}}


def append(data: bytes) -> str:
    return orjson.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(data).decode()}).decode()


def test_append_is_metered_and_forwarded_unchanged() -> None:
    """A valid append is counted and forwarded as the very same text."""
    s = make()
    text = append(b"\x00" * 48000)
    reply = s.on_client_text(text)
    assert reply.upstream is text and reply.client is None
    assert s.meter.snapshot().audio_seconds == Decimal("1.000000")


def test_format_change_applies_to_later_appends() -> None:
    """A session.update to audio/pcmu makes later appends count 8000 bytes per second."""
    s = make()
    s.on_client_text(append(b"\x00" * 48000))
    update = {"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}}
    s.on_client_text(orjson.dumps(update).decode())
    s.on_client_text(append(b"\x00" * 8000))
    assert s.meter.snapshot().audio_seconds == Decimal("2.000000")


def test_model_fields_rewritten_to_deployment() -> None:
    """GA and beta transcription model fields naming the public model reach the upstream as the deployment."""
    s = make()
    ga = {"type": "session.update", "session": {"audio": {"input": {"transcription": {"model": "captions"}}}}}
    out = orjson.loads(s.on_client_text(orjson.dumps(ga).decode()).upstream or "")
    assert out["session"]["audio"]["input"]["transcription"]["model"] == "my-deploy"
    beta = {"type": "transcription_session.update", "session": {"input_audio_transcription": {"language": "en"}}}
    out = orjson.loads(s.on_client_text(orjson.dumps(beta).decode()).upstream or "")
    assert out["session"]["input_audio_transcription"] == {"language": "en", "model": "my-deploy"}


def test_other_model_is_a_mismatch_and_not_forwarded() -> None:
    """Naming any other model answers model_mismatch and sends nothing upstream."""
    s = make(kind="realtime-conversation", transcription=False)
    reply = s.on_client_text(orjson.dumps({"type": "session.update", "session": {"model": "gpt-4o"}}).decode())
    assert reply.upstream is None
    assert orjson.loads(reply.client or "")["error"]["code"] == "model_mismatch"
    ok = s.on_client_text(orjson.dumps({"type": "session.update", "session": {"model": "captions"}}).decode())
    assert orjson.loads(ok.upstream or "")["session"]["model"] == "my-deploy"


def test_upstream_errors_are_scrubbed() -> None:
    """Key, host (with and without port) and deployment name never survive in an upstream error."""
    s = make()
    error = {
        "type": "error",
        "error": {"message": "bad key az-secret-key for my-deploy at res.openai.azure.com:8443 / res.openai.azure.com"},
    }
    out = s.on_upstream_text(orjson.dumps(error).decode())
    for secret in ("az-secret-key", "my-deploy", "res.openai.azure.com"):
        assert secret not in out
    assert REDACTED in out and "captions" in out


def test_session_events_show_the_public_model() -> None:
    """session.created naming the deployment is shown with the public model name."""
    s = make()
    out = s.on_upstream_text(orjson.dumps({"type": "session.created", "session": {"model": "my-deploy"}}).decode())
    assert orjson.loads(out)["session"]["model"] == "captions"


def test_plain_deltas_pass_through_as_the_same_object() -> None:
    """An upstream frame with nothing to read or scrub is relayed as the same string (no copy)."""
    s = make()
    text = '{"type":"conversation.item.input_audio_transcription.delta","delta":"hello"}'
    assert s.on_upstream_text(text) is text


def test_usage_read_from_upstream_events() -> None:
    """response.done tokens are metered; transcription usage is recorded beside them."""
    s = make(kind="realtime-conversation", transcription=False)
    done = {"type": "response.done", "response": {"usage": {"input_tokens": 10, "output_tokens": 5}}}
    s.on_upstream_text(orjson.dumps(done).decode())
    completed = {
        "type": "conversation.item.input_audio_transcription.completed",
        "usage": {"type": "duration", "seconds": 2.5},
    }
    s.on_upstream_text(orjson.dumps(completed).decode())
    figures = s.meter.snapshot()
    assert (figures.input_tokens, figures.output_tokens) == (10, 5)
    assert "2.5" in figures.upstream_usage


def test_usage_events_are_numbered_and_final_carries_the_end() -> None:
    """Checkpoints and the final are numbered 1, 2, ...; only the final has ended_at and close_reason."""
    s = make()
    s.on_client_text(append(b"\x00" * 96000))
    first = s.usage_event("checkpoint", now=T0)
    final = s.usage_event("final", now=T0, close_reason="client_close")
    assert (first.seq, final.seq) == (1, 2)
    assert first.ended_at is None and first.close_reason == ""
    assert final.ended_at == T0 and final.close_reason == "client_close"
    assert final.audio_seconds == Decimal("2.000000")
    assert final.cost_usd == Decimal("0.0005666667")
    assert (final.model, final.provider_model, final.key_hash) == ("captions", "azure/my-deploy", "h" * 64)
    assert first.budget_windows == final.budget_windows == ""  # the principal has no budget


def test_usage_events_carry_the_budget_windows_the_session_started_with() -> None:
    """Every usage event of a session carries the same `budget_windows` string, given once at its start."""
    s = make()
    s.budget_windows = '{"key:h":"all"}'
    events = [s.usage_event("checkpoint", now=T0), s.usage_event("final", now=T0, close_reason="client_close")]
    assert [e.budget_windows for e in events] == ['{"key:h":"all"}'] * 2
    assert all(e.budget_windows is s.budget_windows for e in events)  # no copy, no rebuild per event
    decoded = UsageEvent.from_fields(events[0].to_fields())
    assert decoded.budget_windows == '{"key:h":"all"}'
    legacy = {k: v for k, v in events[0].to_fields().items() if k != "budget_windows"}
    assert UsageEvent.from_fields(legacy).budget_windows == ""  # an entry written before the field existed


def test_model_injection_sets_the_transcription_model() -> None:
    """The injected session.update carries the deployment's model in the transcription settings."""
    event = orjson.loads(make().model_injection())
    assert event["type"] == "session.update"
    assert event["session"]["audio"]["input"]["transcription"]["model"] == "my-deploy"


# --- formats: refused before the provider, trusted once the provider confirms (issue 12, holes 1 and 2) ---


def test_a_declared_rate_the_provider_does_not_decode_is_refused_and_bills_the_same() -> None:
    """session.update with audio/pcm at 48 kHz is answered invalid_audio_format, never forwarded; PCM stays 24 kHz."""
    for rate in (48000, 96000, 1e9, 1e300):
        s = make()
        sent, answer = client(s, update(ga_format({"type": "audio/pcm", "rate": rate}), event_id="evt_rate"))
        assert sent is None and answer is not None
        assert answer["error"] == {
            "type": "invalid_request_error",
            "code": "invalid_audio_format",
            "message": "audio/pcm input audio is 24000 Hz; audio.input.format.rate must be 24000.",
            "param": None,
            "event_id": "evt_rate",
        }
        s.on_client_text(append(b"\x00" * 96000))
        assert s.meter.snapshot().audio_seconds == Decimal(2)


def test_beta_transcription_update_and_double_naming_are_refused() -> None:
    """transcription_session.update is checked the same way; naming the format both ways is refused."""
    s = make()
    beta = {"type": "transcription_session.update", "session": {"input_audio_format": "pcm48"}}
    assert client(s, beta)[0] is None
    both = update({**ga_format({"type": "audio/pcm"}), "input_audio_format": "pcm16"})
    sent, answer = client(s, both)
    assert sent is None and answer is not None and answer["error"]["code"] == "invalid_audio_format"  # type: ignore[index]


def test_a_format_takes_effect_only_when_the_provider_confirms_it() -> None:
    """After an update to mu-law, audio counts as mu-law only until session.updated says PCM is still in force."""
    s = make()
    sent, _ = client(s, update(ga_format({"type": "audio/pcmu"})))
    assert sent is not None and isinstance(sent["event_id"], str)  # an id the provider's answer refers to
    s.on_client_text(append(b"\x00" * 48000))
    assert s.meter.snapshot().audio_seconds == Decimal(6)  # unconfirmed: the most seconds it could be
    upstream(s, {"type": "session.updated", "session": ga_format({"type": "audio/pcm", "rate": 24000})})
    assert s.meter.snapshot().audio_seconds == Decimal(1)


def test_an_update_the_provider_refuses_keeps_the_format_before() -> None:
    """The provider's error naming the update's event id settles the audio after it at the old format."""
    s = make()
    client(s, update(ga_format({"type": "audio/pcmu"}), event_id="evt_fmt"))
    s.on_client_text(append(b"\x00" * 48000))
    upstream(s, {"type": "error", "error": {"type": "invalid_request_error", "code": "x", "event_id": "evt_fmt"}})
    assert s.meter.snapshot().audio_seconds == Decimal(1)


# --- binary frames and input transcription on conversation sessions (issue 12, holes 3 and 4) --------


def test_conversation_may_name_a_configured_transcriber_the_key_may_use() -> None:
    """whisper-1 is rewritten to its deployment on this provider, and its usage is billed at its price."""
    s = conversation(models=("captions", "whisper-1"))
    sent, answer = client(s, update({"audio": {"input": {"transcription": {"model": "whisper-1"}}}}))
    assert answer is None and sent is not None
    assert sent["session"]["audio"]["input"]["transcription"]["model"] == "my-whisper"  # type: ignore[index]
    shown = upstream(
        s, {"type": "session.updated", "session": {"audio": {"input": {"transcription": {"model": "my-whisper"}}}}}
    )
    assert shown["session"]["audio"]["input"]["transcription"]["model"] == "whisper-1"  # type: ignore[index]
    upstream(
        s,
        {"type": "conversation.item.input_audio_transcription.completed", "usage": {"type": "duration", "seconds": 7}},
    )
    assert s.meter.cost() == Decimal("0.0007")
    leak = {"type": "conversation.item.input_audio_transcription.failed", "error": {"message": "my-whisper is busy"}}
    assert upstream(s, leak)["error"] == {"message": "whisper-1 is busy"}  # its deployment name is hidden too


def test_transcription_tokens_are_billed_at_the_named_transcriber() -> None:
    """A beta input_audio_transcription naming gpt-4o-transcribe bills its token usage at its token prices."""
    s = conversation()
    sent, _ = client(s, update({"input_audio_transcription": {"model": "gpt-4o-transcribe"}}))
    assert sent is not None
    usage = {"type": "tokens", "input_tokens": 100, "output_tokens": 20}
    upstream(s, {"type": "conversation.item.input_audio_transcription.completed", "usage": usage})
    assert s.meter.cost() == Decimal("0.00045")  # 100 * 2.5e-6 + 20 * 1e-5


def test_transcription_without_a_named_model_is_billed_at_the_default_transcriber() -> None:
    """Transcription usage on a conversation session that named no model is priced at the default transcriber."""
    s = conversation()
    completed = {
        "type": "conversation.item.input_audio_transcription.completed",
        "usage": {"type": "duration", "seconds": 2.5},
    }
    upstream(s, completed)
    figures = s.meter.snapshot()
    assert figures.cost_usd == Decimal("0.0002500000")
    assert "2.5" in figures.upstream_usage


@pytest.mark.parametrize(
    ("name", "models", "code"),
    [
        ("gpt-4o-mini-transcribe", (), "model_not_found"),  # not in the config
        ("openai-whisper", (), "model_not_found"),  # no deployment on this session's provider
        ("whisper-1", ("captions",), "model_not_allowed"),  # the key may not use it
    ],
)
def test_a_transcriber_that_is_unknown_or_not_allowed_is_refused(name: str, models: tuple[str, ...], code: str) -> None:
    """A conversation session's transcription model must be configured, served here and allowed for the key."""
    s = conversation(models=models)
    for session in (
        {"audio": {"input": {"transcription": {"model": name}}}},
        {"input_audio_transcription": {"model": name}},
    ):
        sent, answer = client(s, update(session))
        assert sent is None and answer is not None
        assert answer["error"]["code"] == code  # type: ignore[index]


def test_a_response_in_progress_is_awaited_until_its_done_and_a_walkout_cancels_it() -> None:
    """response.created marks a response in progress (its usage still to come); its response.done ends it; a
    walk-out asks for `response.cancel` of each one and the figures record how the wait ended."""
    s = conversation()
    assert not s.awaiting and s.walkout() == ()
    upstream(s, {"type": "response.created", "event_id": "e1", "response": {"id": "resp_1", "usage": None}})
    assert s.awaiting
    (cancel,) = s.walkout()
    assert orjson.loads(cancel) | {"event_id": "x"} == {
        "type": "response.cancel",
        "event_id": "x",
        "response_id": "resp_1",
    }
    upstream(s, {"type": "response.done", "event_id": "e2", "response": {"id": "resp_1", "status": "cancelled"}})
    assert not s.awaiting
    s.on_walkout_end("timed_out")
    assert orjson.loads(s.figures().upstream_usage) == {"walkout": "timed_out"}


def test_deltas_skip_the_scans_but_are_still_scrubbed() -> None:
    """Audio and transcript deltas (recognised by their head) are relayed unparsed, yet scrubbed like any frame."""
    s = conversation()
    for kind in ("response.output_audio.delta", "conversation.item.input_audio_transcription.delta"):
        leak = "key az-secret-key at res.openai.azure.com:8443"
        out = upstream(s, {"type": kind, "event_id": "e1", "item_id": leak, "delta": "AAAA"})
        assert "az-secret-key" not in str(out) and "res.openai.azure.com" not in str(out)
        assert out["type"] == kind
