"""Named credentials (issue 16): a model whose litellm_params name a stored credential (`litellm_credential_name`,
as LiteLLM's UI adds models) gets the credential's values under its own, from the config's `credential_list` or
LiteLLM's `LiteLLM_CredentialsTable` (sealed by LiteLLM's own helper), and the credential's key only reaches the
credential's own hosts."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import yaml
from psycopg.types.json import Jsonb

from sidecar.catalog import Catalog, describe, format_table
from sidecar.config import Settings
from sidecar.proxy_models import Credential, DatabaseModels, build_merged_catalog, load_catalog
from sidecar.testing.fake_provider import DEFAULT_TRANSCRIPT, FakeProvider
from tests import litellm_crypto
from tests.relay_stack import MASTER_KEY, PRICE_MAP, USER_KEY, stack
from tests.support import sdk_transcript

CRED_KEY = "sk-credential-upstream-secret-7777"
SALT = "sk-salt-credentials-0123"
MODEL = "gpt-realtime-whisper"


def config(*models: dict[str, Any], credentials: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "model_list": list(models),
        "credential_list": credentials or [],
        "general_settings": {"master_key": MASTER_KEY, "store_model_in_db": True},
    }


def named(name: str, credential: str, **params: Any) -> dict[str, Any]:
    """A model_list entry naming a credential instead of carrying api_key/api_base."""
    return {
        "model_name": name,
        "litellm_params": {"model": f"openai/{MODEL}", "litellm_credential_name": credential, **params},
    }


def build(cfg: dict[str, Any], *, environ: dict[str, str] | None = None, **db: Any) -> Catalog:
    return build_merged_catalog(
        cfg,
        DatabaseModels(enabled=True, **db),
        price_map=PRICE_MAP,
        environ=environ or {},
        default_transcription_model=MODEL,
    )


def shown(catalog: Catalog, caplog: pytest.LogCaptureFixture) -> str:
    """Everything the catalog shows: warnings, repr, `sidecar models` (table and JSON), the logs."""
    rows = describe(catalog)
    return "\n".join([*catalog.warnings, repr(catalog), format_table(rows), orjson.dumps(rows).decode(), caplog.text])


async def test_a_config_model_naming_a_credential_is_dialled_with_its_key(
    tmp_path: Path, speech_pcm16: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """credential_list's values (`os.environ/` resolved) go under the model's: served, the provider gets the key."""
    caplog.set_level(logging.DEBUG, logger="sidecar")  # the fake provider logs what it receives
    async with FakeProvider(api_key=CRED_KEY) as provider:
        credential = {"api_key": "os.environ/CRED_KEY", "api_base": provider.url}
        cfg = config(
            named(MODEL, "openai-prod"),
            credentials=[{"credential_name": "openai-prod", "credential_values": credential, "credential_info": {}}],
        )
        catalog = build(cfg, environ={"CRED_KEY": CRED_KEY})
        assert not catalog.warnings
        (deployment,) = catalog.resolve(MODEL).deployments
        assert (deployment.api_key, deployment.api_base) == (CRED_KEY, provider.url.rstrip("/"))
        async with stack(tmp_path, provider=provider, catalog=catalog) as s:
            transcript = await sdk_transcript(s.sidecar.openai(USER_KEY), speech_pcm16, model=MODEL)
        assert transcript == DEFAULT_TRANSCRIPT
        assert len(provider.sessions) == 1
        assert CRED_KEY not in shown(catalog, caplog)


def test_the_models_own_values_win_over_its_credentials() -> None:
    """`{**credential_values, **litellm_params}`: the model's own api_key is used, the credential's api_base kept."""
    credential = {"api_key": CRED_KEY, "api_base": "https://cred.example/v1"}
    cfg = config(
        named(MODEL, "c", api_key="sk-own-key"),
        credentials=[{"credential_name": "c", "credential_values": credential}],
    )
    (deployment,) = build(cfg).resolve(MODEL).deployments
    assert (deployment.api_key, deployment.api_base) == ("sk-own-key", "https://cred.example/v1")


def test_an_unknown_credential_name_is_one_warning_naming_model_and_credential(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A name no credential has: the model runs without it (so with no key); a warning names model and credential."""
    credential = {"api_key": CRED_KEY, "api_base": "https://cred.example"}
    cfg = config(
        named(MODEL, "missing-cred", api_base="https://model.example"),
        credentials=[{"credential_name": "other", "credential_values": credential}],
    )
    catalog = build(cfg)
    (warning,) = [w for w in catalog.warnings if "litellm_credential_name" in w]
    assert "model_list[0] (gpt-realtime-whisper)" in warning and "'missing-cred'" in warning
    assert catalog.resolve(MODEL).deployments[0].api_key is None
    assert CRED_KEY not in shown(catalog, caplog)


@pytest.mark.parametrize(
    ("model_base", "sent"),
    [
        ("https://cred.example/openai", True),  # the credential's host, another path: its origin
        ("https://CRED.example:443/", True),  # the same origin spelled otherwise
        ("https://evil.example", False),  # another host
        ("http://cred.example", False),  # another scheme (and port)
        ("https://cred.example:8443", False),  # another port
    ],
)
def test_a_credentials_key_only_reaches_the_credentials_own_hosts(
    model_base: str, sent: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A model pointing a credential's key at a host other than the credential's api_base gets no key, one
    warning (LiteLLM's `upstream_origins` / `may_reach`)."""
    credential = {"api_key": CRED_KEY, "api_base": "https://cred.example"}
    cfg = config(
        named(MODEL, "pinned", api_base=model_base),
        credentials=[{"credential_name": "pinned", "credential_values": credential}],
    )
    catalog = build(cfg)
    assert catalog.resolve(MODEL).deployments[0].api_key == (CRED_KEY if sent else None)
    assert any("'pinned'" in w and "api_key is not sent" in w for w in catalog.warnings) is not sent
    assert CRED_KEY not in shown(catalog, caplog)


def test_a_credential_naming_no_host_gives_its_key_where_the_model_points() -> None:
    """A credential of only an api_key (a plain key) goes to the model's own api_base, as LiteLLM sends it."""
    cfg = config(
        named(MODEL, "key-only", api_base="https://model.example"),
        credentials=[{"credential_name": "key-only", "credential_values": {"api_key": CRED_KEY}}],
    )
    catalog = build(cfg)
    assert catalog.resolve(MODEL).deployments[0].api_key == CRED_KEY
    assert not catalog.warnings


def test_credential_values_never_show_in_repr() -> None:
    """A Credential's repr names it, never its values."""
    assert CRED_KEY not in repr(Credential("c", {"api_key": CRED_KEY}))
    assert CRED_KEY not in repr(DatabaseModels(enabled=True, credentials=(Credential("c", {"api_key": CRED_KEY}),)))


def insert_credential(conn: psycopg.Connection[Any], name: str, values: dict[str, str]) -> dict[str, str]:
    """A credential as the proxy's /credentials endpoint stores it: each value sealed by LiteLLM's helper."""
    sealed = {k: litellm_crypto.encrypt_value_helper(v, new_encryption_key=SALT) for k, v in values.items()}
    conn.execute(
        'INSERT INTO "LiteLLM_CredentialsTable" (credential_id, credential_name, credential_values, credential_info,'
        " created_by, updated_by) VALUES (%s, %s, %s, %s, 'admin', 'admin')",
        (str(uuid.uuid4()), name, Jsonb(sealed), Jsonb({"custom_llm_provider": "openai"})),
    )
    return sealed


def test_a_db_model_naming_a_db_credential_sealed_by_litellm_gets_its_key(
    litellm_db: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A UI model row naming a UI credential (both sealed by LiteLLM's helper) gets the opened values; a DB
    credential replaces a config one of the same name; a config model may name a DB credential too."""
    caplog.set_level(logging.DEBUG, logger="sidecar")  # the fake provider logs what it receives
    with psycopg.connect(litellm_db, autocommit=True) as conn:
        sealed = insert_credential(conn, "ui-cred", {"api_key": CRED_KEY, "api_base": "https://cred.example"})
        params = {"model": f"openai/{MODEL}", "litellm_credential_name": "ui-cred"}
        conn.execute(
            'INSERT INTO "LiteLLM_ProxyModelTable" (model_id, model_name, litellm_params, model_info, created_by,'
            " updated_by) VALUES ('row-1', 'ui-model', %s, %s, 'admin', 'admin')",
            (
                Jsonb({k: litellm_crypto.encrypt_value_helper(v, new_encryption_key=SALT) for k, v in params.items()}),
                Jsonb({"id": "row-1"}),
            ),
        )
    stale = {"credential_name": "ui-cred", "credential_values": {"api_key": "sk-stale", "api_base": "https://x"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config(named(MODEL, "ui-cred"), credentials=[stale])))
    settings = Settings(litellm_config=path, litellm_database_url=litellm_db)
    catalog = load_catalog(settings, environ={"LITELLM_SALT_KEY": SALT}, price_map=PRICE_MAP)
    for name in ("ui-model", MODEL):
        (deployment,) = catalog.resolve(name).deployments
        assert (deployment.api_key, deployment.api_base) == (CRED_KEY, "https://cred.example")
    assert not catalog.warnings
    text = shown(catalog, caplog)
    assert CRED_KEY not in text and sealed["api_key"] not in text
