"""Upstream URL and header forms (checked against LiteLLM's realtime handlers and the provider docs)."""

from __future__ import annotations

import orjson

from sidecar.catalog import LIVE_ENDPOINT, REALTIME_ENDPOINT, ROUTES, TRANSLATION_ENDPOINT, Deployment, ProviderName
from sidecar.upstream import azure_preview, is_openai_host, preview_warning, route_target, target


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
    """Azure preview (realtime_protocol beta): /openai/realtime?api-version=...&deployment=..., api-key header,
    intent passed on; it is the one deprecated form."""
    for protocol in ("beta", "preview"):
        t = target(azure(protocol=protocol), transcription=True)
        assert t.url == (
            "wss://res.openai.azure.com/openai/realtime?api-version=2025-04-01-preview"
            "&deployment=my-deploy&intent=transcription"
        )
        assert t.headers == (("api-key", "az-key"),)
        assert not t.inject_model and t.client_secret is None
        assert azure_preview(t.deployment)


def test_azure_ga_is_the_default_form() -> None:
    """Azure GA: /openai/v1/realtime?model=<deployment>, api-key, with or without an api_version (LiteLLM's
    `azure_realtime_protocol_for_client` default), unless realtime_protocol names another form."""
    for deployment in (azure(), azure(api_version=None), azure(protocol="GA"), azure(protocol="v1")):
        conv = target(deployment, transcription=False)
        assert conv.url == "wss://res.openai.azure.com/openai/v1/realtime?model=my-deploy"
        assert conv.headers == (("api-key", "az-key"),) and conv.client_secret is None
        assert not azure_preview(deployment)


def test_azure_ga_transcription_mints_a_client_secret() -> None:
    """Azure GA transcription: no api-key and no ?model= on the socket; the api-key goes only into the
    client-secret exchange, whose session names the deployment as its transcription model."""
    trans = target(azure(), transcription=True)
    assert trans.url == "wss://res.openai.azure.com/openai/v1/realtime?intent=transcription"
    assert trans.headers == () and trans.inject_model
    exchange = trans.client_secret
    assert exchange is not None
    assert exchange.url == "https://res.openai.azure.com/openai/v1/realtime/client_secrets"
    assert dict(exchange.headers) == {"api-key": "az-key", "Content-Type": "application/json"}
    assert orjson.loads(exchange.body) == {
        "session": {"type": "transcription", "audio": {"input": {"transcription": {"model": "my-deploy"}}}}
    }
    assert "az-key" not in repr(trans)


def test_preview_warning_names_each_preview_deployment_once() -> None:
    """One warning for every Azure deployment on the preview form, none without one."""
    preview = azure(protocol="beta")
    assert preview_warning([azure(), azure(protocol="GA")]) is None
    warning = preview_warning([preview, azure(), preview])
    assert warning is not None and warning.count("my-deploy") == 1 and "2026-04-30" in warning


def test_openai_host_detection() -> None:
    """No api_base and api.openai.com are OpenAI; others are not."""
    assert is_openai_host(None)
    assert is_openai_host("https://api.openai.com/v1")
    assert not is_openai_host("ws://127.0.0.1:9100")
    assert is_openai_host("ws://127.0.0.1:9100", openai_hosts=("127.0.0.1",))


def test_target_repr_never_shows_the_key() -> None:
    """A Target's repr leaves its credential out."""
    assert "sk-up" not in repr(target(openai(), transcription=False))


# --- GPT-Live and realtime translation (issue 15) ----------------------------------------------------


def live_model(
    provider: ProviderName = "openai", api_base: str | None = None, *, version: str | None = None, ga: bool = False
) -> Deployment:
    model = "my-live-deployment" if provider == "azure" else "gpt-live-1"
    protocol = "GA" if ga else None
    return Deployment(provider, model, api_base, "sk-up", api_version=version, realtime_protocol=protocol)


def test_openai_live_url_has_no_query_and_a_bearer() -> None:
    """GPT-Live on OpenAI: wss://api.openai.com/v1/live/sessions with no query; the model goes in session.start."""
    t = route_target(live_model(), LIVE_ENDPOINT)
    assert t.url == "wss://api.openai.com/v1/live/sessions"
    assert t.headers == (("Authorization", "Bearer sk-up"),)
    assert t.route == LIVE_ENDPOINT and not t.inject_model
    assert t.safe_url == "/v1/live/sessions"


def test_compatible_live_bases() -> None:
    """An OpenAI-compatible base gets /v1 once, like /v1/realtime; http(s) becomes ws(s)."""
    assert route_target(live_model(api_base="ws://10.0.0.5:9000"), LIVE_ENDPOINT).url == (
        "ws://10.0.0.5:9000/v1/live/sessions"
    )
    assert route_target(live_model(api_base="https://gw.example/v1"), LIVE_ENDPOINT).url == (
        "wss://gw.example/v1/live/sessions"
    )


def test_azure_live_form_ignores_preview_settings() -> None:
    """Azure GPT-Live: /openai/v1/live/sessions, api-key header, no query even with an api_version."""
    for version, ga in ((None, False), ("2025-04-01-preview", False), (None, True)):
        t = route_target(live_model("azure", "https://res.openai.azure.com", version=version, ga=ga), LIVE_ENDPOINT)
        assert t.url == "wss://res.openai.azure.com/openai/v1/live/sessions"
        assert t.headers == (("api-key", "sk-up"),)


def translator(
    provider: ProviderName = "openai", api_base: str | None = None, *, version: str | None = None
) -> Deployment:
    model = "my-translate-deployment" if provider == "azure" else "gpt-realtime-translate"
    return Deployment(provider, model, api_base, "sk-up", api_version=version)


def test_openai_translation_url_names_the_model() -> None:
    """Translation on OpenAI: /v1/realtime/translations?model=<provider model>, Bearer; no intent, no injection."""
    t = route_target(translator(), TRANSLATION_ENDPOINT, transcription=True)
    assert t.url == "wss://api.openai.com/v1/realtime/translations?model=gpt-realtime-translate"
    assert t.headers == (("Authorization", "Bearer sk-up"),)
    assert t.route == TRANSLATION_ENDPOINT and not t.inject_model
    assert route_target(translator(api_base="http://127.0.0.1:9/v1"), TRANSLATION_ENDPOINT).url == (
        "ws://127.0.0.1:9/v1/realtime/translations?model=gpt-realtime-translate"
    )


def test_azure_translation_form_names_the_deployment() -> None:
    """Azure translation: /openai/v1/realtime/translations?model=<deployment>, api-key, preview settings ignored."""
    for version in (None, "2025-04-01-preview"):
        t = route_target(translator("azure", "https://res.openai.azure.com/", version=version), TRANSLATION_ENDPOINT)
        assert t.url == "wss://res.openai.azure.com/openai/v1/realtime/translations?model=my-translate-deployment"
        assert t.headers == (("api-key", "sk-up"),)


def test_realtime_route_is_the_realtime_form() -> None:
    """route_target on /v1/realtime is exactly `target`, transcription included."""
    for deployment in (openai(), azure(), azure(protocol="GA")):
        for transcription in (False, True):
            assert route_target(deployment, REALTIME_ENDPOINT, transcription=transcription) == target(
                deployment, transcription=transcription
            )


def test_the_credential_is_only_in_a_header() -> None:
    """On every route and provider the key is in one header, never in the URL nor the Target's repr."""
    deployments = [
        live_model(),
        live_model("azure", "https://res.openai.azure.com"),
        translator(),
        translator("azure", "https://res.openai.azure.com"),
        openai(),
        azure(),
    ]
    for deployment in deployments:
        for route in ROUTES:
            key = deployment.api_key or "unset"
            t = route_target(deployment, route)
            assert key not in t.url
            assert key not in repr(t)
            assert len(t.headers) == 1 and t.headers[0][1].endswith(key)


def test_no_key_no_credential_header() -> None:
    """A deployment without a key is dialled without a credential header (the upstream refuses it)."""
    keyless = Deployment(provider="openai", model="gpt-live-1", api_base=None)
    assert route_target(keyless, LIVE_ENDPOINT).headers == ()
    assert route_target(Deployment("azure", "d", "https://r"), TRANSLATION_ENDPOINT).headers == ()
