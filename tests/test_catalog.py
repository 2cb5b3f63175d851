"""The model catalog against LiteLLM's real, installed price map (docs/api.md, "Models")."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from sidecar.catalog import (
    Catalog,
    Deployment,
    build_catalog,
    describe,
    format_table,
    load_catalog,
    load_price_map,
    price_map_path,
)
from sidecar.errors import ConfigError, ModelNotFound, ModelNotRealtime
from sidecar.pricing import to_decimal

EXAMPLE_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "config.yaml"
WHISPER_PER_SECOND = Decimal("0.000283333333333")

PriceMap = dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def price_map() -> PriceMap:
    """LiteLLM's installed price map, loaded once."""
    return load_price_map()


def entry(name: str, model: str, info: dict[str, Any] | None = None, **params: Any) -> dict[str, Any]:
    """One model_list entry."""
    row: dict[str, Any] = {"model_name": name, "litellm_params": {"model": model, **params}}
    if info is not None:
        row["model_info"] = info
    return row


def catalog_of(
    price_map: PriceMap, *entries: dict[str, Any], environ: dict[str, str] | None = None, **extra: Any
) -> Catalog:
    """A catalog of these entries."""
    config = {"model_list": list(entries), **extra}
    return build_catalog(config, price_map=price_map, environ=environ or {})


def test_openai_realtime_whisper_is_transcription_per_second(price_map: PriceMap) -> None:
    """openai/gpt-realtime-whisper is a per-second transcription model at the price map's price."""
    catalog = catalog_of(
        price_map,
        entry("w", "openai/gpt-realtime-whisper", api_base="https://up.example.com/", api_key="sk-1"),
    )
    model = catalog.resolve("w")
    assert (model.kind, model.price.unit, model.price.per_unit) == (
        "realtime-transcription",
        "second",
        WHISPER_PER_SECOND,
    )
    assert model.price_key == "gpt-realtime-whisper"
    assert model.deployments == (
        Deployment("openai", "gpt-realtime-whisper", "https://up.example.com", "sk-1", deployment_id="w#0"),
    )


def test_bare_model_name_means_openai(price_map: PriceMap) -> None:
    """A litellm_params.model without a prefix is an OpenAI model with default api_base."""
    deployment = catalog_of(price_map, entry("w", "gpt-realtime-whisper")).resolve("w").deployments[0]
    assert (deployment.provider, deployment.model, deployment.api_base) == (
        "openai",
        "gpt-realtime-whisper",
        None,
    )


def test_azure_deployment_priced_by_base_model(price_map: PriceMap) -> None:
    """An azure/<deployment> entry takes its kind and price from model_info.base_model."""
    row = entry(
        "az",
        "azure/my-whisper",
        {"base_model": "azure/gpt-realtime-whisper"},
        api_base="https://res.openai.azure.com",
        api_key="az-key",
        api_version="2025-04-01-preview",
    )
    model = catalog_of(price_map, row).resolve("az")
    expected = to_decimal(price_map["azure/gpt-realtime-whisper"]["input_cost_per_second"])
    assert (model.kind, model.price.unit, model.price.per_unit) == (
        "realtime-transcription",
        "second",
        expected,
    )
    assert model.price.per_unit is not None
    assert round(model.price.per_unit, 15) == WHISPER_PER_SECOND
    assert model.price_key == "azure/gpt-realtime-whisper"
    deployment = model.deployments[0]
    assert (deployment.provider, deployment.model, deployment.api_version) == (
        "azure",
        "my-whisper",
        "2025-04-01-preview",
    )


def test_azure_bare_base_model_falls_back(price_map: PriceMap) -> None:
    """An Azure base_model without a prefix is found as given (the OpenAI entry)."""
    row = entry("az", "azure/my-whisper", {"base_model": "gpt-realtime-whisper"})
    model = catalog_of(price_map, row).resolve("az")
    assert (model.price_key, model.price.per_unit) == ("gpt-realtime-whisper", WHISPER_PER_SECOND)


def test_azure_without_base_model_tries_bare_deployment_name(price_map: PriceMap) -> None:
    """Without base_model, azure/<name> is tried as given, then as the bare name."""
    model = catalog_of(price_map, entry("az", "azure/gpt-realtime-whisper")).resolve("az")
    assert model.price_key == "azure/gpt-realtime-whisper"


def test_azure_unknown_deployment_without_base_model_is_not_realtime(price_map: PriceMap) -> None:
    """An Azure deployment name the price map does not know is not realtime unless forced."""
    catalog = catalog_of(price_map, entry("az", "azure/some-private-name"))
    with pytest.raises(ModelNotRealtime):
        catalog.resolve("az")


def test_whisper_1_is_not_realtime(price_map: PriceMap) -> None:
    """whisper-1 exists but only serves /v1/audio/transcriptions: 400 model_not_realtime."""
    catalog = catalog_of(price_map, entry("whisper-1", "openai/whisper-1"))
    with pytest.raises(ModelNotRealtime, match="`whisper-1`") as info:
        catalog.resolve("whisper-1")
    assert (info.value.status, info.value.code) == (400, "model_not_realtime")
    assert "whisper-1" in catalog.known


def test_unknown_model_is_not_found(price_map: PriceMap) -> None:
    """A name the config does not have: 404 model_not_found, naming the model."""
    catalog = catalog_of(price_map, entry("w", "openai/gpt-realtime-whisper"))
    with pytest.raises(ModelNotFound, match="`nope`") as info:
        catalog.resolve("nope")
    assert (info.value.status, info.value.code) == (404, "model_not_found")


def test_realtime_true_forces_realtime(price_map: PriceMap) -> None:
    """model_info.realtime: true makes whisper-1 realtime, priced from the price map."""
    model = catalog_of(price_map, entry("w1", "openai/whisper-1", {"realtime": True})).resolve("w1")
    assert (model.kind, model.price.unit, model.price.per_unit) == (
        "realtime-transcription",
        "second",
        Decimal("0.0001"),
    )


def test_realtime_false_blocks(price_map: PriceMap) -> None:
    """model_info.realtime: false blocks a model the price map calls realtime."""
    catalog = catalog_of(price_map, entry("w", "openai/gpt-realtime-whisper", {"realtime": False}))
    with pytest.raises(ModelNotRealtime):
        catalog.resolve("w")


def test_supported_endpoints_override(price_map: PriceMap) -> None:
    """model_info.supported_endpoints replaces the price map's list."""
    catalog = catalog_of(
        price_map,
        entry("on", "openai/whisper-1", {"supported_endpoints": ["/v1/realtime"]}),
        entry("off", "openai/gpt-realtime", {"supported_endpoints": ["/v1/chat/completions"]}),
    )
    assert catalog.resolve("on").kind == "realtime-transcription"
    with pytest.raises(ModelNotRealtime):
        catalog.resolve("off")


def test_forced_unknown_model_priced_from_model_info_only(price_map: PriceMap) -> None:
    """A model the price map lacks, forced realtime, takes kind and price from model_info alone."""
    info = {"realtime": True, "mode": "audio_transcription", "input_cost_per_second": 0.0002}
    model = catalog_of(price_map, entry("mine", "openai/my-own-asr", info)).resolve("mine")
    assert (model.price_key, model.kind, model.price.per_unit) == (
        "",
        "realtime-transcription",
        Decimal("0.0002"),
    )


def test_model_info_price_override(price_map: PriceMap) -> None:
    """model_info.input_cost_per_second replaces the price map's price exactly."""
    row = entry("w", "openai/gpt-realtime-whisper", {"input_cost_per_second": 0.0003})
    model = catalog_of(price_map, row).resolve("w")
    assert (model.price.unit, model.price.per_unit) == ("second", Decimal("0.0003"))


def test_minute_unit_from_model_info(price_map: PriceMap) -> None:
    """model_info.input_cost_per_minute alone switches billing to per minute."""
    row = entry("w", "openai/gpt-realtime-whisper", {"input_cost_per_minute": 0.017})
    model = catalog_of(price_map, row).resolve("w")
    assert (model.price.unit, model.price.per_unit) == ("minute", Decimal("0.017"))


def test_both_time_prices_in_model_info_bill_per_second(price_map: PriceMap) -> None:
    """With both per-second and per-minute prices, the unit is second."""
    info = {"input_cost_per_minute": 0.017, "input_cost_per_second": 0.0004}
    model = catalog_of(price_map, entry("w", "openai/gpt-realtime-whisper", info)).resolve("w")
    assert (model.price.unit, model.price.per_unit) == ("second", Decimal("0.0004"))


def test_gpt_realtime_is_conversation_with_token_prices(price_map: PriceMap) -> None:
    """gpt-realtime is a conversation model billed per token at the price map's token prices."""
    model = catalog_of(price_map, entry("gr", "openai/gpt-realtime")).resolve("gr")
    info = price_map["gpt-realtime"]
    assert (model.kind, model.price.unit, model.price.per_unit) == ("realtime-conversation", "token", None)
    assert (
        model.price.input_token,
        model.price.output_token,
        model.price.input_audio_token,
        model.price.output_audio_token,
        model.price.cached_input_token,
    ) == (
        to_decimal(info["input_cost_per_token"]),
        to_decimal(info["output_cost_per_token"]),
        to_decimal(info["input_cost_per_audio_token"]),
        to_decimal(info["output_cost_per_audio_token"]),
        to_decimal(info["cache_read_input_token_cost"]),
    )
    assert model.price.input_token is not None and model.price.input_token > 0


def test_environment_references_resolve(price_map: PriceMap) -> None:
    """os.environ/NAME values resolve from the mapping; a missing variable becomes None."""
    row = entry(
        "w",
        "azure/dep",
        {"base_model": "azure/gpt-realtime-whisper"},
        api_base="os.environ/AZ_BASE",
        api_key="os.environ/AZ_KEY",
        api_version="os.environ/AZ_VERSION",
    )
    environ = {"AZ_KEY": "secret-az", "MASTER": "sk-master"}
    catalog = catalog_of(price_map, row, environ=environ, general_settings={"master_key": "os.environ/MASTER"})
    deployment = catalog.resolve("w").deployments[0]
    assert (deployment.api_key, deployment.api_base, deployment.api_version) == ("secret-az", None, None)
    assert catalog.master_key == "sk-master"


def test_missing_master_key_variable_is_none(price_map: PriceMap) -> None:
    """A master_key naming an unset variable leaves no master key."""
    catalog = catalog_of(price_map, general_settings={"master_key": "os.environ/UNSET_MASTER"})
    assert catalog.master_key is None


def test_several_deployments_in_config_order(price_map: PriceMap) -> None:
    """Entries sharing a model_name are its deployments in config order; non-realtime ones are skipped."""
    catalog = catalog_of(
        price_map,
        entry("w", "openai/gpt-realtime-whisper", {"id": "primary"}),
        entry("other", "openai/gpt-realtime"),
        entry("w", "openai/whisper-1"),
        entry("w", "azure/dep-b", {"base_model": "azure/gpt-realtime-whisper"}, realtime_protocol="GA"),
        entry("w", "azure/dep-c", {"base_model": "azure/gpt-realtime-whisper", "realtime": False}),
    )
    deployments = catalog.resolve("w").deployments
    assert [(d.provider, d.model, d.deployment_id) for d in deployments] == [
        ("openai", "gpt-realtime-whisper", "primary"),
        ("azure", "dep-b", "w#2"),
    ]
    assert deployments[1].realtime_protocol == "GA"


def test_first_realtime_entry_fixes_kind_and_price(price_map: PriceMap) -> None:
    """The model's kind and price come from its first realtime entry."""
    catalog = catalog_of(
        price_map,
        entry("m", "openai/whisper-1"),
        entry("m", "openai/gpt-realtime-whisper", {"input_cost_per_second": 0.0005}),
        entry("m", "openai/gpt-realtime"),
    )
    model = catalog.resolve("m")
    assert (model.kind, model.price.per_unit, len(model.deployments)) == (
        "realtime-transcription",
        Decimal("0.0005"),
        2,
    )


def test_unsupported_provider_is_not_a_deployment(price_map: PriceMap) -> None:
    """A realtime entry for a provider the sidecar cannot relay to (gemini/...) is not served."""
    catalog = catalog_of(price_map, entry("g", "gemini/gemini-2.5-flash-native-audio-latest"))
    with pytest.raises(ModelNotRealtime):
        catalog.resolve("g")


def test_transcription_default(price_map: PriceMap) -> None:
    """transcription_default resolves the configured default model name."""
    catalog = build_catalog(
        {"model_list": [entry("asr", "openai/gpt-realtime-whisper")]},
        price_map=price_map,
        environ={},
        default_transcription_model="asr",
    )
    assert catalog.transcription_default().name == "asr"
    with pytest.raises(ModelNotFound):
        catalog_of(price_map, entry("asr", "openai/gpt-realtime-whisper")).transcription_default()


def test_secrets_stay_out_of_repr(price_map: PriceMap) -> None:
    """Neither a deployment's api_key nor the master key appears in repr."""
    catalog = catalog_of(
        price_map,
        entry("w", "openai/gpt-realtime-whisper", api_key="sk-very-secret"),
        general_settings={"master_key": "sk-master-secret"},
    )
    text = repr(catalog)
    assert "gpt-realtime-whisper" in text
    assert "sk-very-secret" not in text and "sk-master-secret" not in text


def test_describe_shows_no_secrets_or_upstreams(price_map: PriceMap) -> None:
    """describe() rows carry no api key, api_base or deployment name (checked on the JSON text)."""
    catalog = catalog_of(
        price_map,
        entry(
            "pub-asr",
            "azure/hidden-deployment-name",
            {"base_model": "azure/gpt-realtime-whisper"},
            api_base="https://hidden-host.openai.azure.com",
            api_key="az-secret-key",
        ),
        entry(
            "pub-asr",
            "openai/gpt-realtime-whisper",
            api_base="https://hidden-proxy.example",
            api_key="sk-oai",
        ),
        entry("pub-conv", "openai/gpt-realtime", api_key="sk-conv-secret"),
    )
    text = orjson.dumps(describe(catalog)).decode() + format_table(describe(catalog))
    for secret in (
        "az-secret-key",
        "sk-oai",
        "sk-conv-secret",
        "hidden-host",
        "hidden-proxy",
        "hidden-deployment",
    ):
        assert secret not in text
    assert "pub-asr" in text and "pub-conv" in text


def test_describe_row_shape(price_map: PriceMap) -> None:
    """A describe() row: id, object, kind, unit, plain decimal prices, deployment count, providers."""
    catalog = catalog_of(
        price_map,
        entry("asr", "openai/gpt-realtime-whisper"),
        entry("asr", "azure/dep", {"base_model": "azure/gpt-realtime-whisper"}),
        entry("conv", "openai/gpt-realtime"),
        entry("whisper-1", "openai/whisper-1"),
    )
    rows = describe(catalog)
    assert rows[0] == {
        "id": "asr",
        "object": "model",
        "kind": "realtime-transcription",
        "unit": "second",
        "pricing": {"input_cost_per_second": "0.000283333333333"},
        "deployments": 2,
        "providers": ["azure", "openai"],
        "routes": ["/v1/realtime"],
    }
    assert [row["id"] for row in rows] == ["asr", "conv"]
    assert rows[1]["pricing"]["cache_read_input_token_cost"] == "0.0000004"
    assert set(rows[1]["pricing"]) == {
        "input_cost_per_token",
        "output_cost_per_token",
        "input_cost_per_audio_token",
        "output_cost_per_audio_token",
        "cache_read_input_token_cost",
        "cache_read_input_audio_token_cost",
    }


def test_format_table_lists_models_and_prices(price_map: PriceMap) -> None:
    """The human table has a header and one line per model with its unit and price."""
    catalog = catalog_of(
        price_map,
        entry("asr", "openai/gpt-realtime-whisper"),
        entry("minute", "openai/gpt-realtime-whisper", {"input_cost_per_minute": 0.006}),
        entry("conv", "openai/gpt-realtime"),
    )
    lines = format_table(describe(catalog)).splitlines()
    assert lines[0].split() == ["MODEL", "KIND", "UNIT", "DEPLOYMENTS", "PROVIDERS", "PRICE"]
    assert lines[1].startswith("asr ") and "$0.000283333333333 per second" in lines[1]
    assert "$0.006 per minute" in lines[2]
    assert "in $4," in lines[3] and "per 1M tokens" in lines[3]


def test_example_config_loads_without_environment() -> None:
    """examples/config.yaml loads with no provider variables set; its default is the fake provider."""
    catalog = load_catalog(EXAMPLE_CONFIG, environ={})
    default = catalog.transcription_default()
    assert (default.name, default.kind, default.price.per_unit) == (
        "gpt-realtime-whisper",
        "realtime-transcription",
        WHISPER_PER_SECOND,
    )
    assert default.deployments[0].api_base == "ws://127.0.0.1:18787"
    assert default.deployments[0].api_key == "sk-fake-provider-key"
    assert catalog.master_key == "sk-sidecar-master-example"
    assert catalog.resolve("gpt-realtime").kind == "realtime-conversation"
    assert {d.provider for d in catalog.resolve("gpt-realtime").deployments} == {"openai", "azure"}
    with pytest.raises(ModelNotRealtime):
        catalog.resolve("whisper-1")


def test_example_config_uses_environment() -> None:
    """examples/config.yaml takes the provider keys from the environment when set."""
    environ = {
        "OPENAI_API_KEY": "sk-env",
        "AZURE_API_BASE": "https://r.openai.azure.com/",
        "AZURE_API_KEY": "a",
    }
    catalog = load_catalog(EXAMPLE_CONFIG, environ=environ)
    azure = catalog.resolve("azure-realtime-whisper").deployments[0]
    assert (azure.provider, azure.api_base, azure.api_key) == ("azure", "https://r.openai.azure.com", "a")
    assert catalog.resolve("openai-realtime-whisper").deployments[0].api_key == "sk-env"


def test_price_map_loads_without_importing_litellm() -> None:
    """Locating and loading the price map never imports the litellm package."""
    code = (
        "import sys\n"
        "from sidecar.catalog import load_price_map\n"
        "assert 'gpt-realtime-whisper' in load_price_map()\n"
        "print(sorted(m for m in sys.modules if m == 'litellm' or m.startswith('litellm.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_price_map_path_is_in_litellm_package() -> None:
    """The price map is the JSON file inside the installed litellm package."""
    path = price_map_path()
    assert path.name == "model_prices_and_context_window_backup.json"
    assert path.parent.name == "litellm" and path.is_file()


def test_price_map_override_path(tmp_path: Path) -> None:
    """load_price_map reads an explicit path and drops non-object entries."""
    path = tmp_path / "prices.json"
    path.write_bytes(orjson.dumps({"m": {"mode": "realtime"}, "junk": 3}))
    assert load_price_map(path) == {"m": {"mode": "realtime"}}


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]"])
def test_bad_price_map_is_config_error(tmp_path: Path, content: bytes) -> None:
    """A price map that is not a JSON object is a ConfigError."""
    path = tmp_path / "prices.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"prices\.json"):
        load_price_map(path)


def test_missing_price_map_is_config_error(tmp_path: Path) -> None:
    """A missing price-map file is a ConfigError."""
    with pytest.raises(ConfigError):
        load_price_map(tmp_path / "absent.json")


@pytest.mark.parametrize(
    ("config", "where"),
    [
        ({"model_list": {"a": 1}}, "model_list"),
        ({"model_list": ["text"]}, r"model_list\[0\]"),
        ({"model_list": [{"litellm_params": {"model": "openai/x"}}]}, r"model_list\[0\]"),
        (
            {"model_list": [{"model_name": "x", "litellm_params": "openai/x"}]},
            r"model_list\[0\]\.litellm_params",
        ),
        (
            {"model_list": [entry("x", "openai/x", {"realtime": "yes"})]},
            r"model_list\[0\]\.model_info\.realtime",
        ),
        (
            {
                "model_list": [
                    entry("ok", "openai/gpt-realtime-whisper"),
                    entry("x", "openai/x", {"realtime": True}, api_key=42),
                ]
            },
            r"model_list\[1\]\.litellm_params\.api_key",
        ),
        (
            {"model_list": [entry("x", "openai/gpt-realtime-whisper", {"input_cost_per_second": "cheap"})]},
            r"model_list\[0\].*input_cost_per_second",
        ),
        ({"general_settings": {"master_key": 123}}, "general_settings.master_key"),
    ],
)
def test_malformed_config_is_config_error(price_map: PriceMap, config: dict[str, Any], where: str) -> None:
    """A malformed config raises ConfigError saying where."""
    with pytest.raises(ConfigError, match=where):
        build_catalog(config, price_map=price_map, environ={})


def test_yaml_date_api_version_and_empty_config(price_map: PriceMap, tmp_path: Path) -> None:
    """An unquoted YAML date api_version stays a string; an empty file is an empty catalog."""
    path = tmp_path / "config.yaml"
    path.write_text(
        "model_list:\n"
        "  - model_name: az\n"
        "    litellm_params: {model: azure/dep, api_version: 2024-10-21}\n"
        "    model_info: {base_model: azure/gpt-realtime-whisper}\n"
    )
    catalog = load_catalog(path, environ={}, price_map=price_map)
    assert catalog.resolve("az").deployments[0].api_version == "2024-10-21"
    path.write_text("")
    empty = load_catalog(path, environ={}, price_map=price_map)
    assert (dict(empty.models), empty.known, empty.master_key) == ({}, frozenset(), None)


@pytest.mark.parametrize("content", ["model_list: [unclosed", "- just\n- a list\n"])
def test_unreadable_config_is_config_error(price_map: PriceMap, tmp_path: Path, content: str) -> None:
    """Invalid YAML, or YAML that is not a mapping, is a ConfigError naming the file."""
    path = tmp_path / "config.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=r"config\.yaml"):
        load_catalog(path, environ={}, price_map=price_map)


def test_missing_config_file_is_config_error(price_map: PriceMap, tmp_path: Path) -> None:
    """A config path that does not exist is a ConfigError."""
    with pytest.raises(ConfigError):
        load_catalog(tmp_path / "absent.yaml", environ={}, price_map=price_map)
