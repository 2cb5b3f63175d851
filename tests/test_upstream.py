"""Upstream URL and header forms (checked against LiteLLM's realtime handlers and the provider docs)."""

from __future__ import annotations

from sidecar.catalog import Deployment
from sidecar.upstream import is_openai_host, target


def openai(api_base: str | None = None) -> Deployment:
    return Deployment(provider="openai", model="gpt-realtime-whisper", api_base=api_base, api_key="sk-up")


def azure(api_version: str | None = "2025-04-01-preview", protocol: str | None = None) -> Deployment:
    return Deployment(
        provider="azure",
        model="my-deploy",
        api_base="https://res.openai.azure.com",
        api_key="az-key",
        api_version=api_version,
        realtime_protocol=protocol,
    )


def test_openai_conversation_url_and_bearer() -> None:
    """OpenAI: wss://api.openai.com/v1/realtime?model=..., Authorization Bearer."""
    t = target(openai(), transcription=False)
    assert t.url == "wss://api.openai.com/v1/realtime?model=gpt-realtime-whisper"
    assert t.headers == (("Authorization", "Bearer sk-up"),)
    assert not t.inject_model


def test_openai_transcription_drops_model_and_injects_it() -> None:
    """OpenAI refuses ?model= on transcription sessions: the model goes into the session instead."""
    t = target(openai(), transcription=True)
    assert t.url == "wss://api.openai.com/v1/realtime?intent=transcription"
    assert t.inject_model


def test_compatible_server_keeps_model_on_transcription() -> None:
    """Another OpenAI-compatible server keeps ?model= (a gateway may route on it) and intent."""
    t = target(openai("ws://10.0.0.5:9000"), transcription=True)
    assert t.url == "ws://10.0.0.5:9000/v1/realtime?model=gpt-realtime-whisper&intent=transcription"
    assert not t.inject_model
    assert target(openai("https://gw.example/v1"), transcription=False).url == (
        "wss://gw.example/v1/realtime?model=gpt-realtime-whisper"
    )


def test_azure_preview_form() -> None:
    """Azure preview: /openai/realtime?api-version=...&deployment=..., api-key header, intent passed on."""
    t = target(azure(), transcription=True)
    assert t.url == (
        "wss://res.openai.azure.com/openai/realtime?api-version=2025-04-01-preview"
        "&deployment=my-deploy&intent=transcription"
    )
    assert t.headers == (("api-key", "az-key"),)
    assert not t.inject_model


def test_azure_ga_form() -> None:
    """Azure GA: /openai/v1/realtime?model=<deployment>; transcription sessions take the model in-session."""
    conv = target(azure(protocol="GA"), transcription=False)
    assert conv.url == "wss://res.openai.azure.com/openai/v1/realtime?model=my-deploy"
    assert conv.headers == (("api-key", "az-key"),)
    trans = target(azure(api_version=None), transcription=True)
    assert trans.url == "wss://res.openai.azure.com/openai/v1/realtime?intent=transcription"
    assert trans.inject_model


def test_openai_host_detection() -> None:
    """No api_base and api.openai.com are OpenAI; others are not."""
    assert is_openai_host(None)
    assert is_openai_host("https://api.openai.com/v1")
    assert not is_openai_host("ws://127.0.0.1:9100")
    assert is_openai_host("ws://127.0.0.1:9100", openai_hosts=("127.0.0.1",))


def test_target_repr_never_shows_the_key() -> None:
    """A Target's repr leaves its credential out."""
    assert "sk-up" not in repr(target(openai(), transcription=False))
