"""The model catalog: LiteLLM's config.yaml + LiteLLM's price map -> realtime models (docs/api.md,
"Models").

`build_catalog` is pure: it takes the parsed config, the price map and the environment mapping. Only
`load_price_map` and `load_catalog` read files. The price map is the JSON file shipped inside the
installed `litellm` package; it is located with `importlib.util.find_spec`, which does not execute the
package, so `litellm` is never imported.

Per `model_list` entry:
    lookup key   = model_info.base_model, else litellm_params.model; tried as given, then without an
                   `openai/` prefix, and for Azure entries also as `azure/<bare>` and `<bare>`.
    effective    = price-map entry overridden key by key by model_info (an explicit null clears a field).
    routes       = the WebSocket routes the entry serves (`_routes`): a GPT-Live model (`gpt-live-<n>`)
                   /v1/live/sessions, a translation model (`gpt-realtime-translate...`)
                   /v1/realtime/translations, any other the routes its effective supported_endpoints
                   name; then model_info.realtime: false blocks every route, true serves the entry's
                   own route, and a mapping {route: true|false} forces on or blocks route by route.
    realtime     = "/v1/realtime" is one of its routes.
    kind         = on /v1/realtime: realtime-transcription when the effective mode is
                   audio_transcription, else realtime-conversation (realtime-session for an xai/ entry:
                   session time plus input_cost_per_text_message); live-session and
                   realtime-translation on the other two routes (both billed per second).
    provider     = openai/ (or no prefix), azure/, xai/ (api_base default XAI_API_BASE, else
                   https://api.x.ai; api_key default XAI_API_KEY, as LiteLLM); any other is skipped.
Entries sharing a model_name are deployments of one model, in config order; per route, the first entry
serving it fixes the model's kind and price there. `Catalog.models` is the /v1/realtime table; the other
routes' tables are in `Catalog.by_route` (all three routes are served: SERVED_ROUTES).
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal

import orjson
import yaml

from sidecar.errors import ConfigError, ModelNotFound, ModelNotRealtime
from sidecar.pricing import Kind, Price, Unit, to_decimal

ProviderName = Literal["openai", "azure", "xai"]
Route = Literal["/v1/realtime", "/v1/live/sessions", "/v1/realtime/translations"]

PRICE_MAP_FILE: Final = "model_prices_and_context_window_backup.json"
DEFAULT_TRANSCRIPTION_MODEL: Final = "gpt-realtime-whisper"
REALTIME_ENDPOINT: Final = "/v1/realtime"
LIVE_ENDPOINT: Final = "/v1/live/sessions"
TRANSLATION_ENDPOINT: Final = "/v1/realtime/translations"
#: Every WebSocket route a model may serve, each speaking its own protocol.
ROUTES: Final[tuple[Route, ...]] = (REALTIME_ENDPOINT, LIVE_ENDPOINT, TRANSLATION_ENDPOINT)
#: The routes the app serves: only entries on these are checked for warnings (skipped provider, missing
#: api_key). All three, through one relay driver (sidecar/surfaces).
SERVED_ROUTES: Final[frozenset[Route]] = frozenset(ROUTES)
# The protocol a model speaks, from its name (OpenAI's model names: the SDK's `SessionConfig.model` is
# `gpt-live-1` / `gpt-live-1.1`; LiteLLM's translation default is `gpt-realtime-translate`). Matched at the
# start of the bare model name, so dated snapshots match and `gpt-live-transcribe` (a /v1/realtime
# transcription model) does not.
_FAMILY_ROUTES: Final[tuple[tuple[re.Pattern[str], Route], ...]] = (
    (re.compile(r"gpt-live-\d"), LIVE_ENDPOINT),
    (re.compile(r"gpt-realtime-translate(?:-|$)"), TRANSLATION_ENDPOINT),
)
ENV_PREFIX: Final = "os.environ/"
#: xAI's defaults, as LiteLLM's realtime entry point reads them (litellm/realtime_api/main.py, provider "xai":
#: api_base, else XAI_API_BASE, else xAI's; the key from litellm_params.api_key, else XAI_API_KEY, through
#: XAIModelInfo.get_api_key). LiteLLM's default base ends in /v1; upstream.py adds /v1 once either way.
XAI_API_BASE: Final = "https://api.x.ai"
XAI_BASE_VARIABLE: Final = "XAI_API_BASE"
XAI_KEY_VARIABLE: Final = "XAI_API_KEY"
#: LiteLLM's own fallback for general_settings.master_key (litellm/proxy/proxy_server.py).
MASTER_KEY_VARIABLE: Final = "LITELLM_MASTER_KEY"

# Price fields: Price attribute -> price-map / model_info / describe() name.
_TOKEN_FIELDS: Final[tuple[tuple[str, str], ...]] = (
    ("input_token", "input_cost_per_token"),
    ("output_token", "output_cost_per_token"),
    ("input_audio_token", "input_cost_per_audio_token"),
    ("output_audio_token", "output_cost_per_audio_token"),
    ("cached_input_token", "cache_read_input_token_cost"),
    ("cached_input_audio_token", "cache_read_input_audio_token_cost"),
)
_TIME_FIELDS: Final[dict[str, str]] = {"second": "input_cost_per_second", "minute": "input_cost_per_minute"}
_TEXT_MESSAGE_FIELD: Final = "input_cost_per_text_message"
_OTHER_TIME_UNIT: Final[dict[str, str]] = {
    "input_cost_per_minute": "input_cost_per_second",
    "input_cost_per_second": "input_cost_per_minute",
}


@dataclass(frozen=True, slots=True)
class Deployment:
    """One upstream that serves a public model. `api_key` never appears in repr or describe()."""

    provider: ProviderName
    model: str
    api_base: str | None
    api_key: str | None = field(default=None, repr=False)
    api_version: str | None = None
    realtime_protocol: str | None = None
    deployment_id: str = ""


@dataclass(frozen=True, slots=True)
class RealtimeModel:
    """A public realtime model: its kind, its price and its deployments in failover order."""

    name: str
    kind: Kind
    price: Price
    price_key: str
    deployments: tuple[Deployment, ...]


_NO_MODELS: Final[Mapping[str, RealtimeModel]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Transcriber:
    """A transcription model a conversation session may name for its input audio transcription
    (`audio.input.transcription.model`): every config model whose effective mode is audio_transcription,
    realtime or not. Its price has a time unit and, where the price map has them, token prices too."""

    name: str
    price: Price
    deployments: tuple[Deployment, ...]

    def upstream_name(self, deployment: Deployment) -> str | None:
        """The name the provider of `deployment` knows this model by (one of this model's deployments on the
        same provider, the same api_base first), or None when it has none there."""
        same = [d for d in self.deployments if d.provider == deployment.provider]
        exact = next((d for d in same if d.api_base == deployment.api_base), None)
        chosen = exact or (same[0] if same else None)
        return None if chosen is None else chosen.model


@dataclass(frozen=True)
class Catalog:
    """Every realtime model by public name, every transcription model, and every public name the config knows."""

    models: Mapping[str, RealtimeModel]
    known: frozenset[str]
    master_key: str | None = field(repr=False)
    default_transcription_model: str = DEFAULT_TRANSCRIPTION_MODEL
    transcribers: Mapping[str, Transcriber] = field(default_factory=dict)
    #: What an operator should know at start, each naming its config entry (no secret): shown, never fatal.
    warnings: tuple[str, ...] = ()
    #: Route -> public name -> model, for every route in ROUTES (the /v1/realtime table is `models`).
    by_route: Mapping[Route, Mapping[str, RealtimeModel]] = field(default_factory=dict)

    def unpriced(self) -> list[str]:
        """The realtime models with no price at all: their sessions would be billed $0."""
        return [name for name, model in self.models.items() if not _priced(model.price)]

    def served(self, route: Route) -> Mapping[str, RealtimeModel]:
        """The models `route` serves, by public name."""
        return self.models if route == REALTIME_ENDPOINT else self.by_route.get(route, _NO_MODELS)

    def routes_of(self, name: str) -> tuple[Route, ...]:
        """The routes that serve the model `name`, in ROUTES order (empty when none does)."""
        return tuple(route for route in ROUTES if name in self.served(route))

    def resolve(self, name: str, *, route: Route = REALTIME_ENDPOINT) -> RealtimeModel:
        """The model `name` as `route` serves it.

        Raises ModelNotFound when the config has no such model_name, ModelNotRealtime when it has one
        that `route` does not serve (not realtime, blocked, no deployment the sidecar can reach, or a
        model of another route's protocol: the message then names the routes that serve it).
        """
        model = self.served(route).get(name)
        if model is not None:
            return model
        if name in self.known:
            elsewhere = self.routes_of(name)
            if elsewhere:
                raise ModelNotRealtime(
                    f"The model `{name}` is not available for sessions on {route}; use {', '.join(elsewhere)}."
                )
            raise ModelNotRealtime(f"The model `{name}` is not available for realtime sessions.")
        raise ModelNotFound(f"The model `{name}` does not exist or you do not have access to it.")

    def transcription_default(self) -> RealtimeModel:
        """The default transcription model; raises as `resolve` does."""
        return self.resolve(self.default_transcription_model)


# --- loading (the only I/O) -------------------------------------------------------------------------


def price_map_path() -> Path:
    """Where the installed litellm keeps its price map. Raises ConfigError when litellm is not installed.

    Uses find_spec, which locates the package without executing it.
    """
    spec = importlib.util.find_spec("litellm")
    locations = None if spec is None else spec.submodule_search_locations
    if not locations:
        raise ConfigError("the litellm package (needed for its price map) is not installed")
    return Path(next(iter(locations))) / PRICE_MAP_FILE


def load_price_map(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """LiteLLM's price map (model key -> info) from `path` or the installed litellm.

    Raises ConfigError when the file is missing, unreadable or not a JSON object. Entries that are not
    objects are dropped.
    """
    source = price_map_path() if path is None else path
    try:
        data = orjson.loads(source.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the price map {source}: {type(exc).__name__}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"the price map {source} is not a JSON object")
    return {key: info for key, info in data.items() if isinstance(info, dict)}


def load_catalog(
    path: Path,
    *,
    environ: Mapping[str, str],
    price_map: Mapping[str, Mapping[str, Any]] | None = None,
    default_transcription_model: str = DEFAULT_TRANSCRIPTION_MODEL,
) -> Catalog:
    """Read the LiteLLM config.yaml at `path` and build its catalog (price map: the installed one).

    Raises ConfigError when the file cannot be read or parsed, or as `build_catalog` does.
    """
    return build_catalog(
        read_config(path),
        price_map=load_price_map() if price_map is None else price_map,
        environ=environ,
        default_transcription_model=default_transcription_model,
    )


def read_config(path: Path) -> Mapping[str, Any]:
    """The LiteLLM config.yaml at `path`, parsed (an empty file is {}). Raises ConfigError when it cannot be
    read or parsed, or is not a mapping; the message never quotes the file's text."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the LiteLLM config {path}: {exc.strerror or type(exc).__name__}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read the LiteLLM config {path}: not UTF-8 text") from exc
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"the LiteLLM config {path} is not valid YAML: {_yaml_problem(exc)}") from exc
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise ConfigError(f"the LiteLLM config {path} is not a mapping")
    return config


# --- building (pure) --------------------------------------------------------------------------------


def build_catalog(
    config: Mapping[str, Any],
    *,
    price_map: Mapping[str, Mapping[str, Any]],
    environ: Mapping[str, str],
    default_transcription_model: str = DEFAULT_TRANSCRIPTION_MODEL,
    labels: Sequence[str] | None = None,
    price_overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Catalog:
    """The catalog of a parsed LiteLLM config. Pure.

    `price_overrides` (model_name -> info, e.g. the proxy's merged model_info from `/model/info`,
    sidecar/proxy_prices.py) replaces the price-map entry of every entry of that model_name; the entry's
    own model_info still applies on top.

    `os.environ/NAME` string values resolve from `environ` (a missing variable becomes None). Raises
    ConfigError for a malformed config; the message names the offending entry and field: `labels[i]` names
    model_list[i] when given (entries that come from elsewhere, e.g. LiteLLM's database), else `model_list[i]`.
    """
    resolved = _resolve_env(config, environ)
    entries = _list(resolved.get("model_list"), "model_list")
    raw_entries = _list(config.get("model_list"), "model_list")
    builders: dict[str, _ModelBuilder] = {}
    warnings: list[str] = []
    for index, raw in enumerate(entries):
        entry = _Entry.parse(raw, where=labels[index] if labels is not None else f"model_list[{index}]")
        if entry.provider == "xai":
            entry = entry.with_xai_defaults(environ)
        builder = builders.setdefault(entry.name, _ModelBuilder(entry.name))
        relayed, skipped = builder.add(entry, price_map, (price_overrides or {}).get(entry.name))
        if skipped:
            warnings.append(f"{entry.where} ({entry.name}) skipped: {skipped}")
        if relayed and not entry.params.get("api_key"):
            warnings.append(f"{entry.where} ({entry.name}): {_missing_key(raw_entries[index], environ)}")
    by_route = {
        route: MappingProxyType({name: model for name, b in builders.items() if (model := b.build(route)) is not None})
        for route in ROUTES
    }
    models = by_route[REALTIME_ENDPOINT]
    transcribers = {name: t for name, b in builders.items() if (t := b.transcriber()) is not None}
    if not models:
        warnings.insert(0, "no realtime model in the config: every session will be refused")
    warnings += [
        f"{name}: realtime model with no price (its sessions bill $0)"
        for name, m in models.items()
        if not _priced(m.price)
    ]
    return Catalog(
        models=models,
        known=frozenset(builders),
        master_key=_master_key(resolved, environ),
        default_transcription_model=default_transcription_model,
        transcribers=MappingProxyType(transcribers),
        warnings=tuple(warnings),
        by_route=MappingProxyType(by_route),
    )


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what, never the offending text (it may hold a secret): `line 3, column 7: ...`."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or type(exc).__name__
    if mark is None:
        return str(problem)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _missing_key(raw: Any, environ: Mapping[str, str]) -> str:
    """Why a relayed deployment has no api_key: unset in the config, or its `os.environ/` variable unset."""
    params = raw.get("litellm_params") if isinstance(raw, Mapping) else None
    value = params.get("api_key") if isinstance(params, Mapping) else None
    if isinstance(value, str) and value.startswith(ENV_PREFIX):
        return f"litellm_params.api_key {value} is not set in the environment (the upstream will refuse it)"
    return "no litellm_params.api_key (sent to the upstream without a credential)"


def _priced(price: Price) -> bool:
    if price.unit != "token":
        return price.per_unit is not None or price.per_text_message is not None
    return any(getattr(price, attr) is not None for attr, _ in _TOKEN_FIELDS)


def _resolve_env(value: Any, environ: Mapping[str, str]) -> Any:
    """`value` with every `os.environ/NAME` string replaced by environ[NAME] (None when unset)."""
    if isinstance(value, str):
        return environ.get(value[len(ENV_PREFIX) :]) if value.startswith(ENV_PREFIX) else value
    if isinstance(value, Mapping):
        return {key: _resolve_env(item, environ) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve_env(item, environ) for item in value]
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list")
    return value


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping")
    return value


def _text(value: Any, where: str) -> str | None:
    """An optional string setting; empty means unset. YAML dates (api_version: 2024-10-21) are allowed."""
    if isinstance(value, dt.date):
        return value.isoformat()
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string")
    return value or None


def master_key(config: Mapping[str, Any], environ: Mapping[str, str]) -> str | None:
    """The proxy's master key from a parsed config (its `os.environ/` reference resolved), as `build_catalog`
    reads it. Raises ConfigError for a general_settings that is not a mapping or a master_key that is not text."""
    return _master_key(_resolve_env(config, environ), environ)


def _master_key(config: Mapping[str, Any], environ: Mapping[str, str]) -> str | None:
    """general_settings.master_key, else LITELLM_MASTER_KEY, as the LiteLLM proxy itself reads it
    (`general_settings.get("master_key", LITELLM_MASTER_KEY)`: the variable counts only when the field is absent)."""
    settings = _mapping(config.get("general_settings"), "general_settings")
    if "master_key" not in settings:
        return environ.get(MASTER_KEY_VARIABLE) or None
    return _text(settings.get("master_key"), "general_settings.master_key")


@dataclass(frozen=True, slots=True)
class _Entry:
    """One validated model_list entry."""

    where: str
    name: str
    provider: ProviderName | None  # None: a provider the sidecar cannot relay to (e.g. gemini/...)
    model: str
    params: Mapping[str, Any]
    info: Mapping[str, Any]

    @classmethod
    def parse(cls, raw: Any, *, where: str) -> _Entry:
        """Validate one entry. Raises ConfigError naming `where` and the field."""
        entry = _mapping(raw, where)
        name = _text(entry.get("model_name"), f"{where}.model_name")
        params = _mapping(entry.get("litellm_params"), f"{where}.litellm_params")
        target = _text(params.get("model"), f"{where}.litellm_params.model")
        if name is None or target is None:
            raise ConfigError(f"{where} needs model_name and litellm_params.model")
        provider, model = _split_provider(target)
        info = _mapping(entry.get("model_info"), f"{where}.model_info")
        return cls(where=where, name=name, provider=provider, model=model, params=params, info=info)

    def with_xai_defaults(self, environ: Mapping[str, str]) -> _Entry:
        """This xAI entry with LiteLLM's defaults for what it leaves out: api_base (XAI_API_BASE, else xAI's)
        and api_key (XAI_API_KEY)."""
        params = dict(self.params)
        params["api_base"] = params.get("api_base") or environ.get(XAI_BASE_VARIABLE) or XAI_API_BASE
        params["api_key"] = params.get("api_key") or environ.get(XAI_KEY_VARIABLE) or None
        return replace(self, params=params)

    def lookup_keys(self) -> list[str]:
        """Price-map keys to try, in order (docs/api.md, "Models")."""
        key = _text(self.info.get("base_model"), f"{self.where}.model_info.base_model")
        key = key or str(self.params["model"])
        bare = key.split("/", 1)[1] if key.startswith(("openai/", "azure/")) else key
        keys = [key, key.removeprefix("openai/")]
        if self.provider == "azure":
            keys += [f"azure/{bare}", bare]
        return list(dict.fromkeys(keys))

    def deployment(self, index: int) -> Deployment:
        """This entry as a deployment; `index` is its position among its model_name's entries."""
        assert self.provider is not None  # only called for relayable entries
        params, where = self.params, f"{self.where}.litellm_params"
        api_base = _text(params.get("api_base"), f"{where}.api_base")
        ident = _text(self.info.get("id"), f"{self.where}.model_info.id")
        return Deployment(
            provider=self.provider,
            model=self.model,
            api_base=(api_base or "").rstrip("/") or None,
            api_key=_text(params.get("api_key"), f"{where}.api_key"),
            api_version=_text(params.get("api_version"), f"{where}.api_version"),
            realtime_protocol=_text(params.get("realtime_protocol"), f"{where}.realtime_protocol"),
            deployment_id=ident or f"{self.name}#{index}",
        )


def _split_provider(target: str) -> tuple[ProviderName | None, str]:
    """`openai/x` -> openai, `azure/x` -> azure, `xai/x` -> xai, a bare name -> openai, any other prefix -> None."""
    prefix, sep, rest = target.partition("/")
    if not sep:
        return "openai", target
    if prefix in ("openai", "azure", "xai"):
        return prefix, rest  # type: ignore[return-value]  # one of ProviderName, checked just above
    return None, target


class _Served:
    """One model_name on one route: the first entry's (kind, price, price key), and its deployments."""

    __slots__ = ("deployments", "head")

    def __init__(self) -> None:
        self.head: tuple[Kind, Price, str] | None = None
        self.deployments: list[Deployment] = []


class _ModelBuilder:
    """Collects the entries of one model_name; per route, the first entry serving it fixes kind and price."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0
        self.served: dict[Route, _Served] = {}
        self.transcription_price: Price | None = None
        self.transcription_deployments: list[Deployment] = []

    def add(
        self, entry: _Entry, price_map: Mapping[str, Mapping[str, Any]], override: Mapping[str, Any] | None = None
    ) -> tuple[bool, str]:
        """Take one entry; return (whether it is a deployment on a served route now, why such an entry was
        skipped). Entries only on routes not served yet (SERVED_ROUTES) report (False, "")."""
        index, self.count = self.count, self.count + 1
        price_key, info = _effective_info(entry, price_map, override)
        if entry.provider is not None and _kind(info) == "realtime-transcription":
            if self.transcription_price is None:
                self.transcription_price = _transcription_price(info, entry.where)
            self.transcription_deployments.append(entry.deployment(index))
        routes = _routes(info, entry.info, price_key or entry.lookup_keys()[0], entry.where)
        served_now = not routes.isdisjoint(SERVED_ROUTES)
        if entry.provider is None:
            provider = entry.model.partition("/")[0]
            skipped = f"realtime, but the sidecar relays only openai/, azure/ and xai/ models, not {provider}/"
            return False, skipped if served_now else ""
        if not routes:
            return False, ""
        deployment = entry.deployment(index)
        for route in (r for r in ROUTES if r in routes):
            served = self.served.setdefault(route, _Served())
            if served.head is None:
                kind = _route_kind(route, info, entry.provider)
                served.head = (kind, _price(kind, info, entry.where), price_key)
            served.deployments.append(deployment)
        return served_now, ""

    def transcriber(self) -> Transcriber | None:
        if self.transcription_price is None:
            return None
        return Transcriber(self.name, self.transcription_price, tuple(self.transcription_deployments))

    def build(self, route: Route) -> RealtimeModel | None:
        served = self.served.get(route)
        if served is None or served.head is None:
            return None
        kind, price, price_key = served.head
        return RealtimeModel(self.name, kind, price, price_key, tuple(served.deployments))


def _effective_info(
    entry: _Entry, price_map: Mapping[str, Mapping[str, Any]], override: Mapping[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """(price-map key or "", the price-map entry, or `override` in its place, overridden by model_info)."""
    price_key = next((key for key in entry.lookup_keys() if key in price_map), "")
    info = dict(price_map[price_key]) if price_key else {}
    if override is not None:
        info = dict(override)
    # An explicit audio-time price in one unit replaces the price map's price in the other unit, so
    # model_info {input_cost_per_minute: ...} alone switches the model to per-minute billing.
    for unit_field, other in _OTHER_TIME_UNIT.items():
        if entry.info.get(unit_field) is not None and other not in entry.info:
            info.pop(other, None)
    info.update(entry.info)
    return price_key, info


def family_route(name: str) -> Route | None:
    """The route whose protocol the model `name` speaks, from its bare name (`azure/gpt-live-1` ->
    /v1/live/sessions); None for a name of neither the GPT-Live nor the translation family."""
    bare = name.rsplit("/", 1)[-1]
    return next((route for pattern, route in _FAMILY_ROUTES if pattern.match(bare)), None)


def _routes(info: Mapping[str, Any], model_info: Mapping[str, Any], name: str, where: str) -> frozenset[Route]:
    """The routes one entry serves (docs/api.md, "Models"). Raises ConfigError for a malformed override.

    LiteLLM decides no such thing per model: its proxy picks the protocol from the URL path alone
    (litellm/proxy/proxy_server.py `realtime_websocket_endpoint`: `is_translation =
    websocket.url.path.endswith("/realtime/translations")`; `live_sessions_websocket_endpoint` takes the
    model from `session.start`), checks only that the key may call the model (`can_key_call_resolved_model`)
    and then the provider (litellm/realtime_api/main.py `_arealtime`: `_live_session_rejection` wants
    openai, `_translation_rejection` openai or Azure); its `supported_endpoints` filter
    (litellm/router_utils/endpoint_eligibility.py) covers chat-style calls only, and its realtime health
    check reads `supported_endpoints` just to learn that Live models are served "through other endpoints"
    (`_cost_map_lists_outside_realtime`). Its price map gives gpt-live-1 and gpt-realtime-translate
    `mode: realtime` and no `supported_endpoints`. So the sidecar, which must refuse a model on another
    protocol's route before the upgrade, takes the protocol from the model's name (`family_route`), and
    otherwise LiteLLM's price-map convention: the routes `supported_endpoints` lists.
    """
    flag = model_info.get("realtime")
    if flag is False:
        return frozenset()
    endpoints = info.get("supported_endpoints") or []
    if not isinstance(endpoints, list):
        raise ConfigError(f"{where}: supported_endpoints must be a list")
    family = family_route(name)
    routes = {family} if family is not None else {route for route in ROUTES if route in endpoints}
    if flag is True:
        return frozenset(routes or {REALTIME_ENDPOINT})
    if flag is None:
        return frozenset(routes)
    if not isinstance(flag, Mapping):
        raise ConfigError(f"{where}.model_info.realtime must be true, false or a mapping of route to true/false")
    for route, on in flag.items():
        if route not in ROUTES or not isinstance(on, bool):
            raise ConfigError(
                f"{where}.model_info.realtime: each key is one of {', '.join(ROUTES)}, each value true/false"
            )
        if on:
            routes.add(route)
        else:
            routes.discard(route)
    return frozenset(routes)


def _kind(info: Mapping[str, Any]) -> Kind:
    """docs/api.md: transcription when the effective mode is audio_transcription, else conversation."""
    return "realtime-transcription" if info.get("mode") == "audio_transcription" else "realtime-conversation"


def _route_kind(route: Route, info: Mapping[str, Any], provider: ProviderName | None = None) -> Kind:
    """The model's kind on `route`: by mode on /v1/realtime (an xAI conversation: realtime-session, billed by
    session time and text messages as xAI bills it); the route's own kind on the other two."""
    if route == LIVE_ENDPOINT:
        return "live-session"
    if route == TRANSLATION_ENDPOINT:
        return "realtime-translation"
    kind = _kind(info)
    return "realtime-session" if provider == "xai" and kind == "realtime-conversation" else kind


def _price(kind: Kind, info: Mapping[str, Any], where: str) -> Price:
    """The model's price from its effective info: tokens for a conversation model, else audio or session
    time (input_cost_per_second / input_cost_per_minute). Raises ConfigError for a non-numeric price."""
    if kind == "realtime-conversation":
        tokens = {attr: _decimal(info, name, where) for attr, name in _TOKEN_FIELDS}
        return Price(unit="token", **tokens)
    per_minute = _decimal(info, _TIME_FIELDS["minute"], where)
    per_second = _decimal(info, _TIME_FIELDS["second"], where)
    per_message = _decimal(info, _TEXT_MESSAGE_FIELD, where) if kind == "realtime-session" else None
    if per_minute is not None and per_second is None:
        return Price(unit="minute", per_unit=per_minute, per_text_message=per_message)
    return Price(unit="second", per_unit=per_second, per_text_message=per_message)


def _transcription_price(info: Mapping[str, Any], where: str) -> Price:
    """A transcription model's time price with its token prices beside (its usage may come as either)."""
    time = _price("realtime-transcription", info, where)
    tokens = {attr: _decimal(info, name, where) for attr, name in _TOKEN_FIELDS}
    return Price(unit=time.unit, per_unit=time.per_unit, **tokens)


def _decimal(info: Mapping[str, Any], name: str, where: str) -> Decimal | None:
    try:
        return to_decimal(info.get(name))
    except (ValueError, ArithmeticError) as exc:
        raise ConfigError(f"{where}: {name} must be a number") from exc


# --- presenting -------------------------------------------------------------------------------------


def _price_fields(price: Price) -> dict[str, Decimal | None]:
    """describe()'s pricing names -> the Decimal (None when unpriced)."""
    if price.unit == "token":
        return {name: getattr(price, attr) for attr, name in _TOKEN_FIELDS}
    fields = {_TIME_FIELDS[price.unit]: price.per_unit}
    if price.per_text_message is not None:
        fields[_TEXT_MESSAGE_FIELD] = price.per_text_message
    return fields


def _plain(value: Decimal) -> str:
    """A Decimal as a plain decimal string (never scientific notation)."""
    return format(value, "f")


def describe(catalog: Catalog) -> list[dict[str, Any]]:
    """Public rows for GET /v1/realtime/models and `sidecar models --json`: one per model any route serves, the
    /v1/realtime models first in config order, then the others route by route (ROUTES order). `routes` names the
    routes that serve the model; kind, unit and price are those of the first of them.

    Carries no api_base, api_key or upstream deployment name.
    """
    rows: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        for name, model in catalog.served(route).items():
            if name not in rows:
                rows[name] = _describe_model(model, routes=catalog.routes_of(name))
    return list(rows.values())


def _describe_model(model: RealtimeModel, *, routes: tuple[Route, ...]) -> dict[str, Any]:
    fields = _price_fields(model.price)
    return {
        "id": model.name,
        "object": "model",
        "kind": model.kind,
        "unit": model.price.unit,
        "pricing": {name: _plain(value) for name, value in fields.items() if value is not None},
        "deployments": len(model.deployments),
        "providers": sorted({d.provider for d in model.deployments}),
        "routes": list(routes),
    }


_SHORT_NAMES: Final[dict[str, str]] = {
    "input_cost_per_second": "per second",
    "input_cost_per_minute": "per minute",
    "input_cost_per_text_message": "per text message",
    "input_cost_per_token": "in",
    "output_cost_per_token": "out",
    "input_cost_per_audio_token": "audio in",
    "output_cost_per_audio_token": "audio out",
    "cache_read_input_token_cost": "cached in",
    "cache_read_input_audio_token_cost": "cached audio in",
}
_PER_MILLION: Final = Decimal(1_000_000)


def _price_text(unit: Unit, pricing: Mapping[str, str]) -> str:
    """`$0.000283333333333 per second`, or token prices per 1M tokens; `-` when unpriced."""
    if not pricing:
        return "-"
    if unit != "token":
        return "; ".join(f"${value} {_SHORT_NAMES.get(name, name)}" for name, value in pricing.items())
    parts = [f"{_SHORT_NAMES.get(n, n)} ${_plain((Decimal(v) * _PER_MILLION).normalize())}" for n, v in pricing.items()]
    return ", ".join(parts) + " per 1M tokens"


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of describe() rows for `sidecar models`."""
    header = ("MODEL", "KIND", "UNIT", "DEPLOYMENTS", "PROVIDERS", "PRICE")
    lines = [header] + [
        (
            str(row["id"]),
            str(row["kind"]),
            str(row["unit"]),
            str(row["deployments"]),
            ",".join(row["providers"]),
            _price_text(row["unit"], row["pricing"]),
        )
        for row in rows
    ]
    widths = [max(len(line[col]) for line in lines) for col in range(len(header) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(line, widths, strict=False)), line[-1]]).rstrip()
        for line in lines
    )
