"""Route rules: which WebSocket routes each model serves (docs/api.md, "Models"), against LiteLLM's real price map."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.catalog import (
    LIVE_ENDPOINT,
    REALTIME_ENDPOINT,
    ROUTES,
    TRANSLATION_ENDPOINT,
    Catalog,
    Route,
    build_catalog,
    describe,
    family_route,
    load_price_map,
)
from sidecar.errors import ConfigError, ModelNotFound, ModelNotRealtime

PriceMap = dict[str, dict[str, Any]]
PROPERTY = settings(deadline=None, database=None, max_examples=200)
LIVE_PER_SECOND = Decimal("0.000833333333333")
TRANSLATE_PER_SECOND = Decimal("0.000566666666667")
PRICE_MAP: PriceMap = load_price_map()  # LiteLLM's installed price map, loaded once (property tests use it too)


@pytest.fixture(scope="module")
def price_map() -> PriceMap:
    """LiteLLM's installed price map."""
    return PRICE_MAP


def entry(name: str, model: str, info: dict[str, Any] | None = None, **params: Any) -> dict[str, Any]:
    """One model_list entry (with an api_key unless one is given)."""
    row: dict[str, Any] = {"model_name": name, "litellm_params": {"model": model, "api_key": "sk-up", **params}}
    if info is not None:
        row["model_info"] = info
    return row


def catalog_of(price_map: PriceMap, *entries: dict[str, Any]) -> Catalog:
    """A catalog of these entries."""
    return build_catalog({"model_list": list(entries)}, price_map=price_map, environ={})


def test_gpt_live_serves_live_sessions_only(price_map: PriceMap) -> None:
    """gpt-live-1 (mode realtime, no supported_endpoints) serves /v1/live/sessions, billed per session second."""
    catalog = catalog_of(price_map, entry("live", "openai/gpt-live-1"))
    model = catalog.resolve("live", route=LIVE_ENDPOINT)
    assert (model.kind, model.price.unit, model.price.per_unit, model.price_key) == (
        "live-session",
        "second",
        LIVE_PER_SECOND,
        "gpt-live-1",
    )
    assert catalog.routes_of("live") == (LIVE_ENDPOINT,)
    assert "live" not in catalog.models


def test_azure_live_and_translation_by_base_model(price_map: PriceMap) -> None:
    """Azure deployments take their protocol from base_model, as their price does."""
    catalog = catalog_of(
        price_map,
        entry("live", "azure/my-live", {"base_model": "azure/gpt-live-1"}, api_base="https://x.openai.azure.com"),
        entry("tr", "azure/my-tr", {"base_model": "azure/gpt-realtime-translate"}, api_base="https://x"),
    )
    assert catalog.routes_of("live") == (LIVE_ENDPOINT,)
    assert catalog.routes_of("tr") == (TRANSLATION_ENDPOINT,)
    assert catalog.resolve("tr", route=TRANSLATION_ENDPOINT).price.per_unit == TRANSLATE_PER_SECOND


def test_translation_serves_translations_only(price_map: PriceMap) -> None:
    """gpt-realtime-translate serves /v1/realtime/translations, billed per second of input audio."""
    catalog = catalog_of(price_map, entry("tr", "openai/gpt-realtime-translate"))
    model = catalog.resolve("tr", route=TRANSLATION_ENDPOINT)
    assert (model.kind, model.price.unit, model.price.per_unit) == (
        "realtime-translation",
        "second",
        TRANSLATE_PER_SECOND,
    )
    assert catalog.routes_of("tr") == (TRANSLATION_ENDPOINT,)


@pytest.mark.parametrize(
    "info",
    [None, {"realtime": True}, {"supported_endpoints": ["/v1/realtime"]}, {"mode": "audio_transcription"}],
    ids=["plain", "forced", "endpoints", "mode"],
)
@pytest.mark.parametrize("model", ["openai/gpt-live-1", "openai/gpt-realtime-translate"])
def test_realtime_refuses_live_and_translation_models(
    price_map: PriceMap, model: str, info: dict[str, Any] | None
) -> None:
    """/v1/realtime refuses a GPT-Live or translation model before the upgrade: 400 model_not_realtime, naming
    its route. Before the route rules, `realtime: true` or a `supported_endpoints` override let it in, unpriced."""
    catalog = catalog_of(price_map, entry("m", model, info))
    with pytest.raises(ModelNotRealtime) as refused:
        catalog.resolve("m")
    assert (refused.value.status, refused.value.body()["error"]["code"]) == (400, "model_not_realtime")
    assert str(family_route(model)) in str(refused.value)
    assert catalog.unpriced() == [] and not any("no price" in w for w in catalog.warnings)


def test_conversation_model_is_refused_on_the_new_routes(price_map: PriceMap) -> None:
    """The reverse: gpt-realtime is refused on /v1/live/sessions and /v1/realtime/translations."""
    catalog = catalog_of(price_map, entry("rt", "openai/gpt-realtime"))
    assert catalog.routes_of("rt") == (REALTIME_ENDPOINT,)
    for route in (LIVE_ENDPOINT, TRANSLATION_ENDPOINT):
        with pytest.raises(ModelNotRealtime, match=REALTIME_ENDPOINT):
            catalog.resolve("rt", route=route)
    with pytest.raises(ModelNotFound):
        catalog.resolve("nope", route=LIVE_ENDPOINT)


def test_gpt_live_transcribe_stays_a_realtime_transcription_model(price_map: PriceMap) -> None:
    """gpt-live-transcribe lists /v1/realtime and is not a GPT-Live session model."""
    catalog = catalog_of(price_map, entry("lt", "openai/gpt-live-transcribe"))
    assert catalog.routes_of("lt") == (REALTIME_ENDPOINT,)
    assert catalog.resolve("lt").kind == "realtime-transcription"


def test_route_mapping_forces_on_and_blocks(price_map: PriceMap) -> None:
    """model_info.realtime {route: bool}: true forces a route on, false blocks it; other routes follow the rule."""
    catalog = catalog_of(
        price_map,
        entry("custom", "openai/my-live", {"realtime": {LIVE_ENDPOINT: True}, "input_cost_per_second": 0.001}),
        entry("blocked", "openai/gpt-live-1", {"realtime": {LIVE_ENDPOINT: False}}),
        entry("both", "openai/gpt-live-1", {"realtime": {REALTIME_ENDPOINT: True}}),
        entry("w", "openai/whisper-1", {"realtime": {REALTIME_ENDPOINT: True}}),
    )
    assert catalog.routes_of("custom") == (LIVE_ENDPOINT,)
    assert catalog.resolve("custom", route=LIVE_ENDPOINT).price.per_unit == Decimal("0.001")
    assert catalog.routes_of("blocked") == ()
    with pytest.raises(ModelNotRealtime, match="not available for realtime sessions"):
        catalog.resolve("blocked", route=LIVE_ENDPOINT)
    assert catalog.routes_of("both") == (REALTIME_ENDPOINT, LIVE_ENDPOINT)
    assert catalog.resolve("w").kind == "realtime-transcription"


def test_supported_endpoints_name_the_new_routes(price_map: PriceMap) -> None:
    """A model the price map does not know serves the routes its supported_endpoints name."""
    info = {"supported_endpoints": [TRANSLATION_ENDPOINT, "/v1/chat/completions"], "input_cost_per_second": 0.0005}
    catalog = catalog_of(price_map, entry("mine", "openai/my-translator", info))
    assert catalog.routes_of("mine") == (TRANSLATION_ENDPOINT,)


def test_realtime_false_blocks_every_route(price_map: PriceMap) -> None:
    """model_info.realtime: false blocks a model on every route."""
    catalog = catalog_of(price_map, entry("live", "openai/gpt-live-1", {"realtime": False}))
    assert catalog.routes_of("live") == ()


@pytest.mark.parametrize("flag", [{"/v1/chat/completions": True}, {LIVE_ENDPOINT: "yes"}, ["x"], 1])
def test_malformed_route_override_is_config_error(price_map: PriceMap, flag: object) -> None:
    """A route mapping with an unknown route or a non-boolean value, or another type, names the field."""
    with pytest.raises(ConfigError, match=r"model_list\[0\]\.model_info\.realtime"):
        catalog_of(price_map, entry("m", "openai/gpt-live-1", {"realtime": flag}))


def test_entries_on_every_served_route_raise_warnings(price_map: PriceMap) -> None:
    """Every route is served now: a GPT-Live entry without an api_key, or on a provider the sidecar does not
    relay, is warned of like a /v1/realtime one."""
    catalog = build_catalog(
        {
            "model_list": [
                {"model_name": "rt", "litellm_params": {"model": "openai/gpt-realtime", "api_key": "k"}},
                {"model_name": "live", "litellm_params": {"model": "openai/gpt-live-1"}},
                {"model_name": "g", "litellm_params": {"model": "gemini/gpt-live-1"}},
            ]
        },
        price_map=price_map,
        environ={},
    )
    assert len(catalog.warnings) == 2
    assert catalog.warnings[0].startswith("model_list[1] (live): no litellm_params.api_key")
    assert "model_list[2] (g)" in catalog.warnings[1] and "gemini/" in catalog.warnings[1]
    assert catalog.routes_of("g") == ()
    assert [(row["id"], row["routes"]) for row in describe(catalog)] == [
        ("rt", ["/v1/realtime"]),
        ("live", ["/v1/live/sessions"]),
    ]


def test_models_listing_names_each_models_routes(price_map: PriceMap) -> None:
    """GET /v1/realtime/models rows: the /v1/realtime models first (as before), then GPT-Live and translation
    models, each with the routes that serve it (a model forced on two routes lists both)."""
    catalog = catalog_of(
        price_map,
        entry("tr", "openai/gpt-realtime-translate"),
        entry("live", "openai/gpt-live-1"),
        entry("rt", "openai/gpt-realtime"),
        entry("both", "openai/gpt-live-1", {"realtime": {"/v1/realtime": True}}),
    )
    rows = {row["id"]: row for row in describe(catalog)}
    assert list(rows) == ["rt", "both", "live", "tr"]
    assert rows["both"]["routes"] == ["/v1/realtime", "/v1/live/sessions"]
    assert (rows["live"]["kind"], rows["live"]["routes"]) == ("live-session", ["/v1/live/sessions"])
    assert (rows["tr"]["kind"], rows["tr"]["routes"]) == ("realtime-translation", ["/v1/realtime/translations"])


def test_deployments_per_route_in_config_order(price_map: PriceMap) -> None:
    """Entries sharing a name are deployments on each route they serve, in config order."""
    catalog = catalog_of(
        price_map,
        entry("v", "openai/gpt-live-1", api_base="https://a"),
        entry("v", "azure/gpt-live-1", api_base="https://b"),
    )
    model = catalog.resolve("v", route=LIVE_ENDPOINT)
    assert [(d.provider, d.api_base) for d in model.deployments] == [("openai", "https://a"), ("azure", "https://b")]
    assert [d.deployment_id for d in model.deployments] == ["v#0", "v#1"]


def test_price_map_realtime_models_keep_their_route(price_map: PriceMap) -> None:
    """Across LiteLLM's whole price map, an OpenAI or Azure model serves /v1/realtime exactly when it did
    before the route rules (its supported_endpoints list /v1/realtime), unless it is named GPT-Live or
    translation; and no model serves two protocols' routes by default."""
    for key, info in price_map.items():
        if info.get("litellm_provider") not in ("openai", "azure"):
            continue
        model = key if key.startswith("azure/") else f"openai/{key}"
        catalog = catalog_of(price_map, entry("m", model))
        routes = catalog.routes_of("m")
        listed = REALTIME_ENDPOINT in (info.get("supported_endpoints") or [])
        family = family_route(key)
        assert (REALTIME_ENDPOINT in routes) == (listed and family is None), key
        assert len(routes) <= 1, key
        if family is not None:
            assert routes == (family,), key
            assert catalog.served(family)["m"].price.per_unit is not None, key


# --- properties -----------------------------------------------------------------------------------

_SUFFIX = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-", max_size=12)
_PREFIX = st.sampled_from(["", "openai/", "azure/", "azure/us/"])


@PROPERTY
@given(prefix=_PREFIX, digit=st.integers(0, 9), suffix=_SUFFIX)
def test_live_family_by_name(prefix: str, digit: int, suffix: str) -> None:
    """Every `gpt-live-<digit>...` name, with any provider prefix, is a GPT-Live model."""
    assert family_route(f"{prefix}gpt-live-{digit}{suffix}") == LIVE_ENDPOINT


@PROPERTY
@given(prefix=_PREFIX, suffix=_SUFFIX)
def test_translation_family_by_name(prefix: str, suffix: str) -> None:
    """`gpt-realtime-translate` and its dated snapshots are translation models; longer words are not."""
    assert family_route(f"{prefix}gpt-realtime-translate-{suffix}") == TRANSLATION_ENDPOINT
    assert family_route(f"{prefix}gpt-realtime-translate") == TRANSLATION_ENDPOINT
    assert family_route(f"{prefix}gpt-realtime-translator{suffix}") is None


@PROPERTY
@given(name=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-/", max_size=30))
def test_other_names_have_no_family(name: str) -> None:
    """A bare name that starts with neither family prefix has no family route."""
    bare = name.rsplit("/", 1)[-1]
    if not bare.startswith(("gpt-live-", "gpt-realtime-translate")):
        assert family_route(name) is None


_OVERRIDE = st.one_of(
    st.none(),
    st.booleans(),
    st.dictionaries(st.sampled_from(ROUTES), st.booleans(), max_size=3),
)
_MODELS = st.sampled_from(
    ["openai/gpt-live-1", "openai/gpt-realtime-translate", "openai/gpt-realtime", "openai/whisper-1", "openai/x"]
)


@PROPERTY
@given(
    model=_MODELS, flag=_OVERRIDE, endpoints=st.none() | st.lists(st.sampled_from([*ROUTES, "/v1/chat/completions"]))
)
def test_overrides_decide_each_route(model: str, flag: object, endpoints: list[str] | None) -> None:
    """For any override: false blocks all, a mapping's named routes are exactly as it says, and resolve agrees
    with routes_of on every route."""
    info: dict[str, Any] = {"input_cost_per_second": 0.001}
    if flag is not None:
        info["realtime"] = flag
    if endpoints is not None:
        info["supported_endpoints"] = endpoints
    catalog = catalog_of(PRICE_MAP, entry("m", model, info))
    routes = catalog.routes_of("m")
    if flag is False:
        assert routes == ()
    if flag is True:
        assert routes
    if isinstance(flag, dict):
        for route, on in flag.items():
            assert (route in routes) == on
    for route in ROUTES:
        served: Route = route
        if route in routes:
            assert catalog.resolve("m", route=served).name == "m"
        else:
            with pytest.raises(ModelNotRealtime):
                catalog.resolve("m", route=served)
