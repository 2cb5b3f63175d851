"""The session state machine, pure: client frames, upstream frames, scrubbing and usage events."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from decimal import Decimal

import orjson

from sidecar.auth import Principal
from sidecar.catalog import Deployment, RealtimeModel
from sidecar.metering import SessionMeter
from sidecar.pricing import Price
from sidecar.session import REDACTED, Session

T0 = datetime(2026, 1, 1, tzinfo=UTC)
PRICE = Price(unit="second", per_unit=Decimal("0.000283333333333"))
DEPLOYMENT = Deployment(
    provider="azure",
    model="my-deploy",
    api_base="https://res.openai.azure.com:8443",
    api_key="az-secret-key",
    api_version="2025-04-01-preview",
)


def make(kind: str = "realtime-transcription", transcription: bool = True) -> Session:
    model = RealtimeModel(name="captions", kind=kind, price=PRICE, price_key="k", deployments=(DEPLOYMENT,))  # type: ignore[arg-type]
    return Session(
        session_id="rs_1",
        model=model,
        deployment=DEPLOYMENT,
        principal=Principal(key_hash="h" * 64, key_alias="alias", user_id="u", team_id="t"),
        meter=SessionMeter(PRICE),
        started_at=T0,
        transcription=transcription,
    )


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


def test_conversation_input_transcription_model_passes_through() -> None:
    """In a conversation session the input-transcription model is the client's choice and is not rewritten."""
    s = make(kind="realtime-conversation", transcription=False)
    update = {"type": "session.update", "session": {"audio": {"input": {"transcription": {"model": "whisper-1"}}}}}
    out = orjson.loads(s.on_client_text(orjson.dumps(update).decode()).upstream or "")
    assert out["session"]["audio"]["input"]["transcription"]["model"] == "whisper-1"


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
    """response.done tokens are metered; transcription usage is recorded beside, not billed."""
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


def test_model_injection_sets_the_transcription_model() -> None:
    """The injected session.update carries the deployment's model in the transcription settings."""
    event = orjson.loads(make().model_injection())
    assert event["type"] == "session.update"
    assert event["session"]["audio"]["input"]["transcription"]["model"] == "my-deploy"
