"""Models from LiteLLM's database: the proxy's `LiteLLM_ProxyModelTable` rows (models added in its admin UI under
`store_model_in_db`) become config.yaml `model_list` entries, merged with the config's as the proxy merges them.

What LiteLLM does (litellm 1.110; read, not copied):
    write    proxy/management_endpoints/model_management_endpoints.py `_add_model_to_db` (and the update paths)
             seal every string value of litellm_params with `encrypt_value_helper` (proxy/common_utils/
             encrypt_decrypt_utils.py); model_info is stored as plain JSON, the deployment id is the row's
             `model_id`, and `blocked` is the admin's pause switch.
    seal     key = sha256(salt key). Default: nacl SecretBox (XSalsa20-Poly1305), nonce(24) || box, urlsafe base64.
             With general_settings.encryption_algorithm: aes-256-gcm: "v2:gcm:" + urlsafe base64 of
             nonce(12) || ciphertext || tag(16). Opening goes by the prefix, whatever the setting
             (`_decrypt_with_signing_key`); a legacy value is urlsafe-base64 decoded, else standard base64.
    salt key `get_salt_key`: the environment's LITELLM_SALT_KEY when set (even empty), else the proxy's master key.
    read     proxy/proxy_server.py `ProxyConfig.get_models_from_db` takes every row; `decrypt_model_list_from_db`
             and `_add_deployment` pass each string value through `decrypt_value_helper(return_original_value=
             True)` (a value that does not open is kept as stored), then resolve `os.environ/` references;
             `get_model_info_with_id` sets model_info.id = model_id, db_model = true, blocked = the column.
             Only when store_model_in_db is on: STORE_MODEL_IN_DB=true, general_settings.store_model_in_db:
             true, or the same setting in the `LiteLLM_Config` row `general_settings` (`proxy_startup_event`).
    merge    the router starts with config.yaml's deployments, then upserts each row by id
             (router_rust/surface/registry.py `_core_upsert_deployment`): a row whose model_id is a config
             deployment's model_info.id replaces it (and now comes after the config's); any other row is one
             more deployment, of its own model or, sharing a model_name, of a config model (load balanced).
             A blocked deployment stays listed but is never routed to (`_core_is_deployment_blocked`).

Where the sidecar differs, on purpose: a row whose model does not open under the salt key (a changed key) is
skipped with one warning naming it (the proxy would keep the ciphertext as model name and credential); a
blocked row is not a deployment; a realtime model served only by DB rows and priced by nothing is not served
(one warning naming it) unless SIDECAR_ALLOW_UNPRICED: an unpriced model added in the UI would otherwise bill
$0, and refusing the whole catalog for it would stop every later reload (an unpriced config.yaml model still
stops `sidecar serve`, `cli.check_prices`). Everything here is pure except `read_database` and `load_catalog`.

Named credentials (`litellm_params.litellm_credential_name`, as the UI adds models):
    config   the config's `credential_list` (credential_name, credential_values, credential_info), loaded by
             proxy/proxy_server.py `ProxyConfig.load_credential_list`; `os.environ/` values resolve as elsewhere.
    db       `LiteLLM_CredentialsTable`, read whenever the proxy has a database (`get_credentials`, not gated by
             store_model_in_db); each value opened as `decrypted_or_stored` (proxy/common_utils/
             credential_hydration.py) opens it: under the salt key, else kept as stored. A DB credential
             replaces a config one of the same name (`CredentialAccessor.upsert_credentials`).
    merge    `{**credential_values, **litellm_params}`: the model's own values win (realtime_api/main.py
             `_model_params_with_stored_credentials`). An unknown name: the model runs without it, one warning.
    hosts    a credential's api_key may reach only the origins its own values name (api_base, base_url, a URL in
             model; types/utils.py `upstream_origins`, `AdminApiKeySecretReference.may_reach`). LiteLLM checks
             this for `oidc/` references; the sidecar checks it for every key a credential with an api_base gives
             (a model that points the credential's key elsewhere gets no key, one warning). A credential naming
             no host gives its key wherever the model points, as LiteLLM does for a plain key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit

import nacl.exceptions
import nacl.secret
import orjson
import psycopg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecar.catalog import (
    REALTIME_ENDPOINT,
    ROUTES,
    Catalog,
    build_catalog,
    load_price_map,
    master_key,
    read_config,
)
from sidecar.catalog import (
    _priced as priced,  # one definition of "priced" (catalog.unpriced uses it too)
)
from sidecar.catalog import (
    _resolve_env as resolve_env,  # one definition of `os.environ/` resolution
)
from sidecar.config import Settings
from sidecar.errors import SidecarError
from sidecar.ledger.sink import connect_params

log = logging.getLogger(__name__)

SALT_KEY_VARIABLE: Final = "LITELLM_SALT_KEY"
STORE_MODEL_IN_DB_VARIABLE: Final = "STORE_MODEL_IN_DB"
TABLE: Final = "LiteLLM_ProxyModelTable"
CREDENTIALS_TABLE: Final = "LiteLLM_CredentialsTable"
CREDENTIAL_NAME: Final = "litellm_credential_name"
#: The litellm_params naming where a key goes, of LiteLLM's API_KEY_UPSTREAM_PARAMS, that the sidecar dials.
UPSTREAM_PARAMS: Final = ("api_base", "base_url")
_DEFAULT_PORTS: Final = {"http": 80, "ws": 80, "https": 443, "wss": 443}
_URL_IN_MODEL: Final = re.compile(r"https?://\S+", re.IGNORECASE)
V2_GCM_PREFIX: Final = "v2:gcm:"
_GCM_NONCE_BYTES: Final = 12
# The shortest legacy ciphertext: a nonce and the MAC around an empty message. Model names are shorter.
_SEALED_MIN_BYTES: Final = nacl.secret.SecretBox.NONCE_SIZE + nacl.secret.SecretBox.MACBYTES

# Every row, whatever columns this LiteLLM version has (`blocked` came later), in the order they were added.
_ROWS: Final = f'SELECT to_jsonb(m) FROM "{TABLE}" m ORDER BY m.created_at, m.model_id'
_CREDENTIALS: Final = f'SELECT credential_name, credential_values FROM "{CREDENTIALS_TABLE}" ORDER BY credential_name'
_GENERAL_SETTINGS: Final = "SELECT param_value FROM \"LiteLLM_Config\" WHERE param_name = 'general_settings' LIMIT 1"


class ProxyModelsUnavailable(SidecarError):
    """LiteLLM's database could not be read for its models. The message names no credential."""


@dataclass(frozen=True, slots=True)
class ProxyModelRow:
    """One `LiteLLM_ProxyModelTable` row as stored: litellm_params still sealed (never in repr)."""

    model_id: str
    model_name: str
    litellm_params: Mapping[str, Any] = field(repr=False)
    model_info: Mapping[str, Any] = field(default_factory=dict)
    blocked: bool = False


@dataclass(frozen=True, slots=True)
class Credential:
    """One named credential (`credential_list` entry or `LiteLLM_CredentialsTable` row): values never in repr."""

    name: str
    values: Mapping[str, Any] = field(repr=False)


@dataclass(frozen=True, slots=True)
class DatabaseModels:
    """What LiteLLM's database says about models: whether the proxy serves its rows, the rows, and its named
    credentials (still sealed; read whether or not the proxy serves its rows, as the proxy reads them)."""

    enabled: bool
    rows: tuple[ProxyModelRow, ...] = ()
    credentials: tuple[Credential, ...] = ()


# --- the proxy's crypto (pure) ----------------------------------------------------------------------


def salt_key(environ: Mapping[str, str], master: str | None) -> str | None:
    """The key LiteLLM seals with: LITELLM_SALT_KEY when set (an empty value counts, as in LiteLLM), else the
    proxy's master key; None when neither is."""
    value = environ.get(SALT_KEY_VARIABLE)
    return master if value is None else value


def open_value(value: str, key: str) -> str | None:
    """`value` opened under `key` as LiteLLM's `decrypt_value_helper` opens it; None when it does not open
    (a plaintext value, or a ciphertext under another key). A value that decodes to no bytes opens to ""."""
    try:
        if value.startswith(V2_GCM_PREFIX):
            sealed = base64.urlsafe_b64decode(value[len(V2_GCM_PREFIX) :])
            nonce, body = sealed[:_GCM_NONCE_BYTES], sealed[_GCM_NONCE_BYTES:]
            return AESGCM(_derived(key)).decrypt(nonce, body, None).decode("utf-8")
        sealed = _legacy_bytes(value)
        if not sealed:
            return ""
        return nacl.secret.SecretBox(_derived(key)).decrypt(sealed).decode("utf-8")
    except (binascii.Error, ValueError, InvalidTag, nacl.exceptions.CryptoError):
        return None  # UnicodeDecodeError is a ValueError; a too-short box is a CryptoError or ValueError


def looks_sealed(value: str) -> bool:
    """Whether `value` has the form of a LiteLLM ciphertext (a `v2:gcm:` value, or strict base64 of at least
    a nonce and a MAC); model names and plaintext URLs do not."""
    if value.startswith(V2_GCM_PREFIX):
        return True
    for altchars in (b"-_", None):
        try:
            return len(base64.b64decode(value, altchars=altchars, validate=True)) >= _SEALED_MIN_BYTES
        except ValueError:  # binascii.Error, or a character outside ASCII
            continue
    return False


def _derived(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _legacy_bytes(value: str) -> bytes:
    """LiteLLM's `_legacy_ciphertext_bytes`: urlsafe base64 first, standard base64 as the fallback."""
    try:
        return base64.urlsafe_b64decode(value)
    except (binascii.Error, ValueError):
        return base64.b64decode(value)


# --- rows -> model_list entries (pure) --------------------------------------------------------------


def row_label(row: ProxyModelRow) -> str:
    """How warnings and config errors name a row: the table and its model_id (no secret)."""
    return f"{TABLE}[{row.model_id}]"


def opened_entry(row: ProxyModelRow, key: str | None) -> tuple[dict[str, Any] | None, list[str]]:
    """The row as a config model_list entry (values opened, model_info.id = model_id), or None when it is
    not served, and the warnings (each naming the row's model, never a value).

    Not served: a blocked row (silently, as the proxy never routes to it), and a row whose model is sealed but
    does not open under `key` (or there is no key). Another sealed value that does not open is kept as stored,
    as the proxy keeps it, with a warning.
    """
    where = f"{row_label(row)} ({row.model_name})"
    if row.blocked:
        return None, []
    model = row.litellm_params.get("model")
    if isinstance(model, str) and looks_sealed(model) and (key is None or open_value(model, key) is None):
        why = "no LITELLM_SALT_KEY or master key is set" if key is None else "it was sealed with another key"
        return None, [
            f"{where} skipped: its litellm_params do not open under LITELLM_SALT_KEY (else the master key): {why}"
        ]
    params: dict[str, Any] = {}
    kept: list[str] = []
    for name, value in row.litellm_params.items():
        opened = open_value(value, key) if isinstance(value, str) and key is not None else None
        if opened is None and isinstance(value, str) and looks_sealed(value):
            kept.append(name)
        params[name] = value if opened is None else opened
    info = {**row.model_info, "id": row.model_id, "db_model": True}
    entry = {"model_name": row.model_name, "litellm_params": params, "model_info": info}
    warnings = [f"{where}: litellm_params.{name} does not open under the salt key; used as stored" for name in kept]
    return entry, warnings


def merge_model_list(config_list: Sequence[Any], db_entries: Sequence[Mapping[str, Any]]) -> list[tuple[str, Any]]:
    """The proxy's deployments, each with its label: the config's (`model_list[i]`, its place in the file), less
    those whose model_info.id a DB entry has, then the DB's (`LiteLLM_ProxyModelTable[<model_id>]`)."""
    db_ids = {str(entry["model_info"]["id"]) for entry in db_entries}
    merged = [(f"model_list[{i}]", entry) for i, entry in enumerate(config_list) if _config_id(entry) not in db_ids]
    return merged + [(f"{TABLE}[{entry['model_info']['id']}]", entry) for entry in db_entries]


def _config_id(entry: Any) -> str | None:
    info = entry.get("model_info") if isinstance(entry, Mapping) else None
    ident = info.get("id") if isinstance(info, Mapping) else None
    return None if ident is None else str(ident)


# --- named credentials (pure) -----------------------------------------------------------------------


def config_credentials(config: Mapping[str, Any]) -> list[Credential]:
    """The config's `credential_list` (entries without a name or with values not a mapping are skipped)."""
    listed = config.get("credential_list")
    return [
        Credential(str(item["credential_name"]), item["credential_values"])
        for item in (listed if isinstance(listed, list) else [])
        if isinstance(item, Mapping)
        and item.get("credential_name")
        and isinstance(item.get("credential_values"), Mapping)
    ]


def opened_credential(credential: Credential, key: str | None) -> Credential:
    """A stored credential with each value opened under `key`, a value that does not open kept as stored."""
    values = {
        name: opened
        if isinstance(value, str) and key is not None and (opened := open_value(value, key)) is not None
        else value
        for name, value in credential.values.items()
    }
    return Credential(credential.name, values)


def upstream_origins(params: Mapping[str, Any]) -> frozenset[str]:
    """The scheme://host:port each upstream param (and a URL in `model`) names, as LiteLLM's `upstream_origins`."""
    model = params.get("model")
    found = _URL_IN_MODEL.search(model) if isinstance(model, str) else None
    values = [*(params.get(name) for name in UPSTREAM_PARAMS), found.group(0) if found else None]
    return frozenset(_origin(value) for value in values if isinstance(value, str) and value)


def _origin(url: str) -> str:
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return text.rstrip("/").lower()
    host = (parts.hostname or "").rstrip(".")
    if not host:
        return text.rstrip("/").lower()
    scheme = parts.scheme.lower()
    port = port if port is not None else _DEFAULT_PORTS.get(scheme)
    return f"{scheme}://{host}" if port is None else f"{scheme}://{host}:{port}"


def with_credential(
    label: str, entry: Any, credentials: Mapping[str, Mapping[str, Any]], environ: Mapping[str, str]
) -> tuple[Any, list[str]]:
    """`entry` with its named credential's values under its own litellm_params, and the warnings (naming the
    model and the credential, never a value). An entry naming no credential is returned as it is."""
    params = entry.get("litellm_params") if isinstance(entry, Mapping) else None
    name = params.get(CREDENTIAL_NAME) if isinstance(params, Mapping) else None
    if not isinstance(params, Mapping) or not isinstance(name, str) or not name:
        return entry, []
    where = f"{label} ({entry.get('model_name')})"
    values = credentials.get(name)
    if values is None:
        why = "no credential_list entry or LiteLLM_CredentialsTable row has that name; used without it"
        return entry, [f"{where}: {CREDENTIAL_NAME} {name!r}: {why}"]
    merged = {**values, **params}
    warnings = []
    if "api_key" not in params and not _may_reach(resolve_env(values, environ), resolve_env(merged, environ)):
        del merged["api_key"]
        warnings.append(f"{where}: credential {name!r}'s api_key is not sent: its api_base is not the model's")
    return {**entry, "litellm_params": merged}, warnings


def _may_reach(credential: Mapping[str, Any], upstream: Mapping[str, Any]) -> bool:
    """Whether the credential's api_key may go to `upstream` (LiteLLM's `may_reach`, for a credential naming a
    host; one naming none gives its key anywhere, as LiteLLM gives a plain key)."""
    origins = upstream_origins(credential)
    if not origins or "api_key" not in credential:
        return True
    destinations = upstream_origins(upstream)
    return bool(destinations) and destinations <= origins


def with_credentials(
    merged: Sequence[tuple[str, Any]], credentials: Mapping[str, Mapping[str, Any]], environ: Mapping[str, str]
) -> tuple[list[tuple[str, Any]], list[str]]:
    """Every labelled entry with its named credential merged in (`with_credential`), and all the warnings."""
    resolved: list[tuple[str, Any]] = []
    warnings: list[str] = []
    for label, entry in merged:
        entry, found = with_credential(label, entry, credentials, environ)
        resolved.append((label, entry))
        warnings += found
    return resolved, warnings


def store_model_in_db(config: Mapping[str, Any], environ: Mapping[str, str], db_setting: Any) -> bool:
    """Whether the proxy serves its DB models: STORE_MODEL_IN_DB=true, general_settings.store_model_in_db: true,
    or that setting true in the database's general_settings (`db_setting`), as `proxy_startup_event` decides."""
    settings = config.get("general_settings")
    in_config = isinstance(settings, Mapping) and settings.get("store_model_in_db") is True
    in_env = environ.get(STORE_MODEL_IN_DB_VARIABLE, "").strip().lower() == "true"
    in_db = db_setting is True or (isinstance(db_setting, str) and db_setting.lower() == "true")
    return in_config or in_env or in_db


def build_merged_catalog(
    config: Mapping[str, Any],
    database: DatabaseModels,
    *,
    price_map: Mapping[str, Mapping[str, Any]],
    environ: Mapping[str, str],
    default_transcription_model: str,
    drop_unpriced: bool = False,
    price_overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Catalog:
    """The catalog of the config's models and the database's, merged as the proxy merges them. Pure.

    `drop_unpriced`: a model with no price whose deployments all come from the database is not served (one
    warning each; it stays known, so it is refused as not available). `price_overrides`: as `build_catalog`'s
    (the proxy's /model/info prices, proxy_prices.py).
    Raises ConfigError as `build_catalog` does (a DB entry's error names its row). The rows' warnings come
    after the config's in `Catalog.warnings`.
    """
    return _build_merged(
        config,
        database,
        price_map=price_map,
        environ=environ,
        default_transcription_model=default_transcription_model,
        drop_unpriced=drop_unpriced,
        price_overrides=price_overrides,
    )[0]


def _build_merged(
    config: Mapping[str, Any],
    database: DatabaseModels,
    *,
    price_map: Mapping[str, Mapping[str, Any]],
    environ: Mapping[str, str],
    default_transcription_model: str,
    drop_unpriced: bool,
    price_overrides: Mapping[str, Mapping[str, Any]] | None,
) -> tuple[Catalog, list[dict[str, Any]]]:
    """build_merged_catalog's catalog, and each merged entry's model_name and model_info (no litellm_params)."""
    config_list = config.get("model_list") or []
    if not isinstance(config_list, list):  # build_catalog's to refuse
        catalog = build_catalog(
            config,
            price_map=price_map,
            environ=environ,
            default_transcription_model=default_transcription_model,
            price_overrides=price_overrides,
        )
        return catalog, []
    serves_rows = database.enabled and bool(database.rows)
    key = salt_key(environ, master_key(config, environ)) if serves_rows or database.credentials else None
    entries: list[dict[str, Any]] = []
    warnings: list[str] = []
    for row in database.rows if serves_rows else ():
        entry, found = opened_entry(row, key)
        warnings += found
        if entry is not None:
            entries.append(entry)
    stored = [opened_credential(credential, key) for credential in database.credentials]
    credentials = {c.name: c.values for c in (*config_credentials(config), *stored)}  # the DB's replace
    merged, found = with_credentials(merge_model_list(config_list, entries), credentials, environ)
    catalog = build_catalog(
        {**config, "model_list": [entry for _, entry in merged]},
        price_map=price_map,
        environ=environ,
        default_transcription_model=default_transcription_model,
        labels=[label for label, _ in merged],
        price_overrides=price_overrides,
    )
    catalog = replace(catalog, warnings=(*catalog.warnings, *warnings, *found))
    if drop_unpriced and entries:
        catalog = without_unpriced(catalog, frozenset(str(entry["model_info"]["id"]) for entry in entries))
    return catalog, _infos([entry for _, entry in merged])


def _infos(model_list: Sequence[Any]) -> list[dict[str, Any]]:
    """Each entry's model_name and model_info: what `proxy_prices.price_sources` reads, and no credential."""
    return [
        {"model_name": entry.get("model_name"), "model_info": entry.get("model_info")}
        for entry in model_list
        if isinstance(entry, Mapping)
    ]


def without_unpriced(catalog: Catalog, db_ids: frozenset[str]) -> Catalog:
    """`catalog` without the unpriced models whose every deployment is a DB row (`db_ids`), on every route;
    their "no price" warning becomes one saying they are not served. Pure."""
    dropped = {
        name
        for route in ROUTES
        for name, model in catalog.served(route).items()
        if not priced(model.price) and all(d.deployment_id in db_ids for d in model.deployments)
    }
    if not dropped:
        return catalog
    by_route = {
        route: MappingProxyType({n: m for n, m in catalog.served(route).items() if n not in dropped})
        for route in ROUTES
    }
    unpriced_warnings = {f"{name}: realtime model with no price (its sessions bill $0)" for name in dropped}
    warnings = [w for w in catalog.warnings if w not in unpriced_warnings] + [
        f"{name}: a model from LiteLLM's database with no price is not served (price it in its model_info, or "
        "set SIDECAR_ALLOW_UNPRICED=1 to serve it free)"
        for name in sorted(dropped)
    ]
    return replace(
        catalog, models=by_route[REALTIME_ENDPOINT], by_route=MappingProxyType(by_route), warnings=tuple(warnings)
    )


# --- the database (I/O) -----------------------------------------------------------------------------


def read_database(dsn: str, *, timeout_s: float) -> tuple[Any, tuple[ProxyModelRow, ...], tuple[Credential, ...]]:
    """The database's general_settings.store_model_in_db (None when unset), every model row and every named
    credential (sealed), in one read-only transaction bounded by `timeout_s` (connect, statement).

    Raises ProxyModelsUnavailable when the database cannot be reached or read, or holds no LiteLLM schema.
    """
    try:
        params, _ = connect_params(dsn, timeout_s=timeout_s)
    except psycopg.ProgrammingError as exc:  # its text may quote the URL, password included
        raise ProxyModelsUnavailable("SIDECAR_LITELLM_DATABASE_URL is not a URL libpq accepts") from exc
    try:
        with psycopg.connect(**params) as conn:
            conn.read_only = True
            setting = conn.execute(_GENERAL_SETTINGS).fetchone()
            rows = conn.execute(_ROWS).fetchall()
            stored = conn.execute(_CREDENTIALS).fetchall()
    except psycopg.errors.UndefinedTable as exc:
        raise ProxyModelsUnavailable(
            f"LiteLLM's database has no {TABLE} (is SIDECAR_LITELLM_DATABASE_URL the proxy's database, migrated?)"
        ) from exc
    except (psycopg.Error, OSError) as exc:
        raise ProxyModelsUnavailable(f"cannot read LiteLLM's models from its database: {_first_line(exc)}") from exc
    general = _json(setting[0]) if setting else None
    db_setting = general.get("store_model_in_db") if isinstance(general, Mapping) else None
    credentials = tuple(
        Credential(str(name), values) for name, raw in stored if isinstance(values := _json(raw), Mapping)
    )
    return db_setting, tuple(row for (raw,) in rows if (row := _row(raw)) is not None), credentials


def _row(raw: Any) -> ProxyModelRow | None:
    """A row from its JSON; None for one the proxy would refuse too (litellm_params not an object)."""
    params = _json(raw.get("litellm_params"))
    if not isinstance(params, Mapping):
        log.warning("%s[%s] skipped: litellm_params is not an object", TABLE, raw.get("model_id"))
        return None
    info = _json(raw.get("model_info"))
    return ProxyModelRow(
        model_id=str(raw["model_id"]),
        model_name=str(raw["model_name"]),
        litellm_params=params,
        model_info=info if isinstance(info, Mapping) else {},
        blocked=raw.get("blocked") is True,
    )


def _json(value: Any) -> Any:
    """A Json column's value: an object as stored, or a JSON text some writers stored instead."""
    if isinstance(value, str):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return None
    return value


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:200]}"


def load_catalog(
    settings: Settings,
    *,
    environ: Mapping[str, str],
    price_map: Mapping[str, Mapping[str, Any]] | None = None,
    config_path: Path | None = None,
) -> Catalog:
    """The catalog of the LiteLLM config and, when SIDECAR_LITELLM_DATABASE_URL is set and the proxy stores
    models in its database, of its DB models too. Blocks (run it in a thread from the event loop).

    Raises ConfigError (the config), ProxyModelsUnavailable (the database; a reload keeps its last catalog).
    """
    return load_models(settings, environ=environ, price_map=price_map, config_path=config_path)[0]


def load_models(
    settings: Settings,
    *,
    environ: Mapping[str, str],
    price_map: Mapping[str, Mapping[str, Any]] | None = None,
    price_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    config_path: Path | None = None,
) -> tuple[Catalog, list[dict[str, Any]]]:
    """`load_catalog`'s catalog, priced with `price_overrides` too (the proxy's prices), and each merged entry's
    model_name and model_info (for `proxy_prices.price_sources`). Blocks; raises as `load_catalog`."""
    config = read_config(config_path or settings.litellm_config)
    database = DatabaseModels(enabled=False)
    if settings.litellm_database_url:
        db_setting, rows, credentials = read_database(settings.litellm_database_url, timeout_s=settings.db_timeout_s)
        database = DatabaseModels(store_model_in_db(config, environ, db_setting), rows, credentials)
    return _build_merged(
        config,
        database,
        price_map=load_price_map() if price_map is None else price_map,
        environ=environ,
        default_transcription_model=settings.default_transcription_model,
        drop_unpriced=not settings.allow_unpriced,
        price_overrides=price_overrides,
    )


__all__ = [
    "Credential",
    "DatabaseModels",
    "ProxyModelRow",
    "ProxyModelsUnavailable",
    "build_merged_catalog",
    "config_credentials",
    "load_catalog",
    "load_models",
    "looks_sealed",
    "merge_model_list",
    "open_value",
    "opened_credential",
    "opened_entry",
    "read_database",
    "salt_key",
    "store_model_in_db",
    "upstream_origins",
    "with_credential",
    "with_credentials",
    "without_unpriced",
]
