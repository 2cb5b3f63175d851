"""Models from LiteLLM's database (issue 16, item 1): rows sealed by LiteLLM's own helper in LiteLLM's real schema,
opened and merged with config.yaml as the proxy merges them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import yaml
from psycopg.types.json import Jsonb

from sidecar.catalog import Catalog, describe, format_table, load_price_map
from sidecar.catalog_reload import CatalogReloader
from sidecar.config import Settings
from sidecar.errors import ModelNotFound
from sidecar.proxy_models import (
    ProxyModelRow,
    ProxyModelsUnavailable,
    load_catalog,
    looks_sealed,
    open_value,
    salt_key,
)

# LiteLLM's own sealing, in a child process (importing litellm here would change every test's logging).
from tests import litellm_crypto

SALT = "sk-salt-0123456789"
MASTER = "sk-master-9876543210"
API_KEY = "sk-db-upstream-secret"
CONFIG_KEY = "sk-config-upstream-secret"
PriceMap = dict[str, dict[str, Any]]
Seal = Callable[[str, str], str]


def seal(value: str, key: str) -> str:
    """LiteLLM's own sealing, as /model/new does it (encrypt_value_helper; `new_encryption_key` is the key the
    proxy's get_salt_key would give: passing it keeps litellm's proxy_server module unimported)."""
    sealed = litellm_crypto.encrypt_value_helper(value, new_encryption_key=key)
    assert isinstance(sealed, str)
    return sealed


def seal_gcm(value: str, key: str) -> str:
    """LiteLLM's AES-256-GCM sealing (general_settings.encryption_algorithm: aes-256-gcm)."""
    return litellm_crypto._encrypt_aes_gcm(value=value, signing_key=key)


@pytest.fixture(scope="module")
def price_map() -> PriceMap:
    """The installed LiteLLM price map, loaded once."""
    return load_price_map()


@pytest.fixture
def conn(litellm_db: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to a fresh clone of LiteLLM's schema."""
    with psycopg.connect(litellm_db, autocommit=True) as connection:
        yield connection


def insert_model(
    conn: psycopg.Connection[Any],
    *,
    model_id: str,
    model_name: str,
    params: dict[str, Any],
    key: str,
    info: dict[str, Any] | None = None,
    blocked: bool = False,
    sealer: Seal = seal,
    as_text: bool = False,
) -> dict[str, Any]:
    """A row as the proxy's `_add_model_to_db` writes it: every string litellm_param sealed, model_info plain.
    Returns the sealed params."""
    sealed = {k: sealer(v, key) if isinstance(v, str) else v for k, v in params.items()}
    model_info = {"id": model_id, **(info or {})}
    stored_params: Any = orjson.dumps(sealed).decode() if as_text else sealed
    conn.execute(
        'INSERT INTO "LiteLLM_ProxyModelTable" (model_id, model_name, litellm_params, model_info, blocked,'
        " created_by, updated_by) VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (model_id, model_name, Jsonb(stored_params), Jsonb(model_info), blocked, "admin", "admin"),
    )
    return sealed


def write_config(tmp_path: Path, *, store: bool | None = True, master: str | None = MASTER, models: Any = None) -> Path:
    general: dict[str, Any] = {}
    if store is not None:
        general["store_model_in_db"] = store
    if master is not None:
        general["master_key"] = master
    config = {
        "model_list": models
        if models is not None
        else [
            {
                "model_name": "gpt-realtime",
                "litellm_params": {"model": "openai/gpt-realtime", "api_key": CONFIG_KEY},
                "model_info": {"id": "config-dep"},
            }
        ],
        "general_settings": general,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def load(
    tmp_path: Path, litellm_db: str, price_map: PriceMap, *, environ: dict[str, str] | None = None, **config: Any
) -> Catalog:
    path = write_config(tmp_path, **config)
    settings = Settings(litellm_config=path, litellm_database_url=litellm_db)
    env = {"LITELLM_SALT_KEY": SALT} if environ is None else environ
    return load_catalog(settings, environ=env, price_map=price_map)


REALTIME_PARAMS = {"model": "openai/gpt-realtime", "api_key": API_KEY, "api_base": "https://db.example/"}


def test_a_row_sealed_by_litellm_is_served_with_its_deployment_and_price(
    conn: psycopg.Connection[Any], litellm_db: str, tmp_path: Path, price_map: PriceMap
) -> None:
    """A realtime row sealed with LITELLM_SALT_KEY is a served model: opened credential, api_base, id, price."""
    insert_model(conn, model_id="db-1", model_name="ui-realtime", params=REALTIME_PARAMS, key=SALT)
    catalog = load(tmp_path, litellm_db, price_map)
    model = catalog.resolve("ui-realtime")
    (deployment,) = model.deployments
    assert (deployment.provider, deployment.model, deployment.api_base) == (
        "openai",
        "gpt-realtime",
        "https://db.example",
    )
    assert deployment.api_key == API_KEY
    assert deployment.deployment_id == "db-1"
    assert model.kind == "realtime-conversation"
    assert model.price == catalog.resolve("gpt-realtime").price  # priced from the same price-map entry
    assert model.price.input_token == Decimal(str(price_map["gpt-realtime"]["input_cost_per_token"]))
    assert not catalog.warnings


def test_model_info_prices_of_a_row_override_the_price_map(
    conn: psycopg.Connection[Any], litellm_db: str, tmp_path: Path, price_map: PriceMap
) -> None:
    """A row's model_info (the UI's custom prices, stored in clear) prices the model, as in config.yaml."""
    info = {"input_cost_per_token": 0.00001, "output_cost_per_audio_token": 0.0002}
    insert_model(conn, model_id="db-1", model_name="priced", params=REALTIME_PARAMS, key=SALT, info=info)
    price = load(tmp_path, litellm_db, price_map).resolve("priced").price
    assert (price.input_token, price.output_audio_token) == (Decimal("0.00001"), Decimal("0.0002"))


@pytest.mark.parametrize("as_text", [False, True], ids=["json-object", "json-text"])
@pytest.mark.parametrize("sealer", [seal, seal_gcm], ids=["xsalsa20-poly1305", "aes-256-gcm"])
def test_both_of_litellms_ciphers_and_both_json_forms_open(
    conn: psycopg.Connection[Any],
    litellm_db: str,
    tmp_path: Path,
    price_map: PriceMap,
    sealer: Seal,
    as_text: bool,
) -> None:
    """LiteLLM's default cipher and its `v2:gcm:` one both open, whether litellm_params is an object or JSON text."""
    insert_model(
        conn, model_id="db-1", model_name="ui", params=REALTIME_PARAMS, key=SALT, sealer=sealer, as_text=as_text
    )
    (deployment,) = load(tmp_path, litellm_db, price_map).resolve("ui").deployments
    assert deployment.api_key == API_KEY


def test_without_a_salt_key_the_master_key_opens(
    conn: psycopg.Connection[Any], litellm_db: str, tmp_path: Path, price_map: PriceMap
) -> None:
    """No LITELLM_SALT_KEY: general_settings.master_key is the key, as LiteLLM's get_salt_key says."""
    insert_model(conn, model_id="db-1", model_name="ui", params=REALTIME_PARAMS, key=MASTER)
    catalog = load(tmp_path, litellm_db, price_map, environ={})
    assert catalog.resolve("ui").deployments[0].api_key == API_KEY


def test_without_a_salt_key_or_config_master_key_litellm_master_key_opens(
    conn: psycopg.Connection[Any], litellm_db: str, tmp_path: Path, price_map: PriceMap
) -> None:
    """No salt key and no general_settings.master_key: LITELLM_MASTER_KEY is the master key, hence the key."""
    insert_model(conn, model_id="db-1", model_name="ui", params=REALTIME_PARAMS, key=MASTER)
    catalog = load(tmp_path, litellm_db, price_map, environ={"LITELLM_MASTER_KEY": MASTER}, master=None)
    assert catalog.resolve("ui").deployments[0].api_key == API_KEY


def test_salt_key_rules_as_litellm() -> None:
    """LITELLM_SALT_KEY wins over the master key when set, even empty; else the master key; else none."""
    assert salt_key({"LITELLM_SALT_KEY": SALT}, MASTER) == SALT
    assert salt_key({"LITELLM_SALT_KEY": ""}, MASTER) == ""
    assert salt_key({}, MASTER) == MASTER
    assert salt_key({}, None) is None


def test_open_value_agrees_with_litellms_own_decrypt() -> None:
    """open_value opens what LiteLLM's decrypt opens and refuses what it refuses, for both ciphers."""
    for sealed in (seal("hello", SALT), seal_gcm("hello", SALT)):
        assert open_value(sealed, SALT) == litellm_crypto.decrypt_if_encrypted_with(sealed, SALT) == "hello"
        assert open_value(sealed, MASTER) is None
        assert litellm_crypto.decrypt_if_encrypted_with(sealed, MASTER) is None
        assert looks_sealed(sealed)
    for plain in ("gpt-realtime", "openai/gpt-realtime", "https://api.openai.com/v1", "2024-10-01-preview", "modèle"):
        assert not looks_sealed(plain)
        assert open_value(plain, SALT) is None


def test_a_row_sealed_with_another_key_is_skipped_with_one_warning_and_no_secret(
    conn: psycopg.Connection[Any],
    litellm_db: str,
    tmp_path: Path,
    price_map: PriceMap,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The salt key changed: the row is refused as unknown, one warning names it; no key, value or ciphertext leaks."""
    sealed = insert_model(conn, model_id="db-lost", model_name="lost-model", params=REALTIME_PARAMS, key=MASTER)
    insert_model(conn, model_id="db-ok", model_name="kept-model", params=REALTIME_PARAMS, key=SALT)
    with caplog.at_level(logging.DEBUG):
        catalog = load(tmp_path, litellm_db, price_map)
    assert catalog.resolve("kept-model").deployments[0].api_key == API_KEY
    assert catalog.resolve("gpt-realtime").deployments[0].api_key == CONFIG_KEY
    with pytest.raises(ModelNotFound):
        catalog.resolve("lost-model")
    (warning,) = catalog.warnings
    assert "lost-model" in warning and "db-lost" in warning and "another key" in warning
    shown = "\n".join([*catalog.warnings, repr(catalog), format_table(describe(catalog)), caplog.text])
    shown += orjson.dumps(describe(catalog)).decode()
    for secret in (SALT, MASTER, API_KEY, CONFIG_KEY, *sealed.values()):
        assert secret not in shown


def test_no_key_at_all_skips_sealed_rows_with_a_warning(
    conn: psycopg.Connection[Any], litellm_db: str, tmp_path: Path, price_map: PriceMap
) -> None:
    """Neither a salt key nor a master key: a sealed row cannot open; the warning says why."""
    insert_model(conn, model_id="db-1", model_name="ui", params=REALTIME_PARAMS, key=SALT)
    catalog = load(tmp_path, litellm_db, price_map, environ={}, master=None)
    assert "ui" not in catalog.known
    (warning,) = catalog.warnings
    assert "no LITELLM_SALT_KEY or master key" in warning


def test_a_row_with_a_config_deployments_id_replaces_it(
    conn: psycopg.Connection[Any], litellm_db: str, tmp_path: Path, price_map: PriceMap
) -> None:
    """The proxy upserts DB rows by id: a row whose model_id is a config deployment's id replaces that deployment."""
    insert_model(conn, model_id="config-dep", model_name="gpt-realtime", params=REALTIME_PARAMS, key=SALT)
    (deployment,) = load(tmp_path, litellm_db, price_map).resolve("gpt-realtime").deployments
    assert (deployment.deployment_id, deployment.api_key) == ("config-dep", API_KEY)
    assert deployment.api_base == "https://db.example"


def test_a_row_sharing_a_config_models_name_is_one_more_deployment_after_the_configs(
    conn: psycopg.Connection[Any], litellm_db: str, tmp_path: Path, price_map: PriceMap
) -> None:
    """Same model_name, another id: the proxy load-balances both; the config's comes first, the row's after."""
    insert_model(conn, model_id="db-1", model_name="gpt-realtime", params=REALTIME_PARAMS, key=SALT)
    model = load(tmp_path, litellm_db, price_map).resolve("gpt-realtime")
    assert [(d.deployment_id, d.api_key) for d in model.deployments] == [("config-dep", CONFIG_KEY), ("db-1", API_KEY)]


def test_a_blocked_row_is_not_served(
    conn: psycopg.Connection[Any], litellm_db: str, tmp_path: Path, price_map: PriceMap
) -> None:
    """A row the admin paused (`blocked`) is never routed to by the proxy, so it is no deployment here."""
    insert_model(conn, model_id="db-1", model_name="gpt-realtime", params=REALTIME_PARAMS, key=SALT, blocked=True)
    insert_model(conn, model_id="db-2", model_name="paused", params=REALTIME_PARAMS, key=SALT, blocked=True)
    catalog = load(tmp_path, litellm_db, price_map)
    assert [d.deployment_id for d in catalog.resolve("gpt-realtime").deployments] == ["config-dep"]
    assert "paused" not in catalog.known


def test_rows_are_ignored_unless_the_proxy_stores_models_in_its_database(
    conn: psycopg.Connection[Any], litellm_db: str, tmp_path: Path, price_map: PriceMap
) -> None:
    """store_model_in_db off in the config, the environment and the DB: the proxy serves no row, nor the sidecar."""
    insert_model(conn, model_id="db-1", model_name="ui", params=REALTIME_PARAMS, key=SALT)
    assert "ui" not in load(tmp_path, litellm_db, price_map, store=None).known
    on_by_env = {"LITELLM_SALT_KEY": SALT, "STORE_MODEL_IN_DB": "True"}
    assert "ui" in load(tmp_path, litellm_db, price_map, store=None, environ=on_by_env).known
    conn.execute(
        'INSERT INTO "LiteLLM_Config" (param_name, param_value) VALUES (%s, %s)',
        ("general_settings", Jsonb({"store_model_in_db": True})),
    )
    assert "ui" in load(tmp_path, litellm_db, price_map, store=None).known


def test_an_environment_reference_in_a_row_resolves(
    conn: psycopg.Connection[Any], litellm_db: str, tmp_path: Path, price_map: PriceMap
) -> None:
    """A sealed `os.environ/NAME` value resolves from the environment after opening, as the proxy resolves it."""
    params = {**REALTIME_PARAMS, "api_key": "os.environ/UI_KEY"}
    insert_model(conn, model_id="db-1", model_name="ui", params=params, key=SALT)
    catalog = load(tmp_path, litellm_db, price_map, environ={"LITELLM_SALT_KEY": SALT, "UI_KEY": API_KEY})
    assert catalog.resolve("ui").deployments[0].api_key == API_KEY


def test_a_transcription_row_on_azure_is_a_transcription_model(
    conn: psycopg.Connection[Any], litellm_db: str, tmp_path: Path, price_map: PriceMap
) -> None:
    """An Azure gpt-realtime-whisper row is a per-second transcription model with its Azure deployment."""
    params = {
        "model": "azure/my-whisper",
        "api_key": API_KEY,
        "api_base": "https://res.openai.azure.com",
        "api_version": "2025-04-01-preview",
    }
    info = {"base_model": "azure/gpt-realtime-whisper"}
    insert_model(conn, model_id="db-w", model_name="ui-whisper", params=params, key=SALT, info=info)
    model = load(tmp_path, litellm_db, price_map).resolve("ui-whisper")
    assert (model.kind, model.price.unit) == ("realtime-transcription", "second")
    assert model.price.per_unit is not None and model.price.per_unit > 0
    (deployment,) = model.deployments
    assert (deployment.provider, deployment.model, deployment.api_version) == (
        "azure",
        "my-whisper",
        "2025-04-01-preview",
    )


def test_no_database_url_reads_the_config_alone(tmp_path: Path, price_map: PriceMap) -> None:
    """Without SIDECAR_LITELLM_DATABASE_URL the catalog is the config's, as before."""
    settings = Settings(litellm_config=write_config(tmp_path))
    catalog = load_catalog(settings, environ={}, price_map=price_map)
    assert list(catalog.models) == ["gpt-realtime"]


def test_an_unreachable_database_is_a_clear_error_without_its_password(tmp_path: Path, price_map: PriceMap) -> None:
    """A database that cannot be reached raises ProxyModelsUnavailable; the message holds no password."""
    url = "postgresql://litellm:hunter2-password@127.0.0.1:1/litellm"
    settings = Settings(litellm_config=write_config(tmp_path), litellm_database_url=url, db_timeout_s=2)
    with pytest.raises(ProxyModelsUnavailable) as caught:
        load_catalog(settings, environ={}, price_map=price_map)
    assert "hunter2" not in str(caught.value)


def test_a_database_without_litellms_schema_says_so(pg_url: str, tmp_path: Path, price_map: PriceMap) -> None:
    """An empty database (not the proxy's, or not migrated) is named as such."""
    url = pg_url.replace("postgresql+psycopg://", "postgresql://")
    settings = Settings(litellm_config=write_config(tmp_path), litellm_database_url=url)
    with pytest.raises(ProxyModelsUnavailable, match="LiteLLM_ProxyModelTable"):
        load_catalog(settings, environ={}, price_map=price_map)


def test_a_row_never_shows_its_params() -> None:
    """ProxyModelRow's repr leaves litellm_params (sealed or not) out."""
    row = ProxyModelRow("db-1", "ui", {"api_key": API_KEY}, {})
    assert API_KEY not in repr(row)


async def test_a_row_added_then_deleted_is_served_then_refused_after_a_reload(
    conn: psycopg.Connection[Any], litellm_db: str, tmp_path: Path, price_map: PriceMap
) -> None:
    """The issue's loop: a model added in the UI is served after a reload; deleted, it is refused after the next."""
    settings = Settings(litellm_config=write_config(tmp_path), litellm_database_url=litellm_db)
    env = {"LITELLM_SALT_KEY": SALT}
    reloader = CatalogReloader(
        lambda: load_catalog(settings, environ=env, price_map=price_map),
        load_catalog(settings, environ=env, price_map=price_map),
    )
    with pytest.raises(ModelNotFound):
        reloader.catalog.resolve("ui")
    insert_model(conn, model_id="db-1", model_name="ui", params=REALTIME_PARAMS, key=SALT)
    assert (await reloader.reload()).added == ("ui",)
    assert reloader.catalog.resolve("ui").deployments[0].api_key == API_KEY
    conn.execute('DELETE FROM "LiteLLM_ProxyModelTable" WHERE model_id = %s', ("db-1",))
    assert (await reloader.reload()).removed == ("ui",)
    with pytest.raises(ModelNotFound):
        reloader.catalog.resolve("ui")
