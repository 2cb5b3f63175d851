"""The proxy's prices: each model priced as the LiteLLM proxy prices it, and which source priced it.

Sources, in order (`load_prices`):
    proxy        `GET /model/info` with the master key: one row per deployment, its `model_info` already merged
                 by the proxy with its own price map (litellm/proxy/proxy_server.py `model_info_v1` ->
                 `_enrich_model_info_with_litellm_data`: the deployment's model_info and the pricing keys of its
                 litellm_params win, the price map fills the rest; `pricing_overrides` names the price fields the
                 deployment set itself; litellm_params pass `remove_sensitive_info_from_deployment`, which drops
                 api_key and masks the rest). Only the fields the catalog reads are kept (`KEPT_FIELDS`):
                 nothing of litellm_params, so no credential, masked or not, is ever held here.
    remote_map   when the proxy cannot be asked: the price map the proxy itself loads at start
                 (litellm/litellm_core_utils/get_model_cost_map.py `get_model_cost_map`):
                 LITELLM_MODEL_COST_MAP_URL, default `DEFAULT_COST_MAP_URL`, fetched once within
                 `FETCH_TIMEOUT_S` and accepted only when it is a JSON object of at least `MIN_MODEL_COUNT`
                 models and at least `MAX_SHRINK_RATIO` of the bundled map's count (LiteLLM's integrity check).
    bundled_map  LITELLM_LOCAL_MODEL_COST_MAP=True or LITELLM_OFFLINE_MODE=true (as in LiteLLM), or a remote map
                 that could not be fetched or failed the check (one warning): the JSON file inside the installed
                 litellm package (`catalog.load_price_map`).
A model whose first deployment sets a price field in its own model_info is labelled `model_info`; one priced by
nothing, `none`. A running sidecar refreshes with `PriceRefresher` (a proxy that goes down keeps its last prices).
Everything here is pure except `fetch_model_info`, `fetch_remote_map`, `load_map`, `load_prices` and `PriceRefresher`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import httpx
import orjson

from sidecar.catalog import ROUTES, Catalog, load_price_map
from sidecar.errors import ConfigError, SidecarError

log = logging.getLogger(__name__)

PriceSource = Literal["proxy", "model_info", "remote_map", "bundled_map", "none"]
MapSource = Literal["remote_map", "bundled_map"]

MODEL_INFO_PATH: Final = "/model/info"
#: LiteLLM's default (litellm/__init__.py `model_cost_map_url`).
DEFAULT_COST_MAP_URL: Final = (
    "https://raw.githubusercontent.com/BerriAI/litellm/main/model_prices_and_context_window.json"
)
COST_MAP_URL_VARIABLE: Final = "LITELLM_MODEL_COST_MAP_URL"
LOCAL_COST_MAP_VARIABLE: Final = "LITELLM_LOCAL_MODEL_COST_MAP"
OFFLINE_VARIABLE: Final = "LITELLM_OFFLINE_MODE"
#: LiteLLM's fetch timeout and integrity check (litellm/constants.py MODEL_COST_MAP_MIN_MODEL_COUNT,
#: MODEL_COST_MAP_MAX_SHRINK_RATIO); its reserved top-level keys are not models.
FETCH_TIMEOUT_S: Final = 5.0
MIN_MODEL_COUNT: Final = 50
MAX_SHRINK_RATIO: Final = 0.5
_RESERVED_KEYS: Final = frozenset({"sample_spec", "fallback_generalizations"})

#: The price fields the catalog reads (catalog._TOKEN_FIELDS and _TIME_FIELDS).
PRICE_FIELDS: Final = (
    "input_cost_per_token",
    "output_cost_per_token",
    "input_cost_per_audio_token",
    "output_cost_per_audio_token",
    "cache_read_input_token_cost",
    "cache_read_input_audio_token_cost",
    "input_cost_per_second",
    "input_cost_per_minute",
)
#: What is kept of a deployment's merged model_info: its prices and what the catalog derives kind and routes from.
KEPT_FIELDS: Final = frozenset({*PRICE_FIELDS, "mode", "supported_endpoints"})


class PricesUnavailable(SidecarError):
    """The proxy's /model/info or a remote price map could not be read. The message names no credential."""


@dataclass(frozen=True, slots=True)
class ProxyPrices:
    """The proxy's answer reduced to what prices a model: model_name -> merged info (`KEPT_FIELDS` only) of its
    first deployment, and the price fields that deployment set itself (the proxy's `pricing_overrides`)."""

    infos: Mapping[str, Mapping[str, Any]]
    overridden: Mapping[str, frozenset[str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PriceMap:
    """A LiteLLM price map and where it came from (`url` for a remote one)."""

    entries: Mapping[str, Mapping[str, Any]] = field(repr=False)
    source: MapSource
    url: str | None = None


@dataclass(frozen=True, slots=True)
class Prices:
    """What the catalog is built with: `build_catalog(price_map=map.entries, price_overrides=proxy.infos)`."""

    map: PriceMap
    proxy: ProxyPrices | None = None

    @property
    def overrides(self) -> Mapping[str, Mapping[str, Any]]:
        """build_catalog's `price_overrides`: the proxy's infos, or none."""
        return {} if self.proxy is None else self.proxy.infos


# --- parsing (pure) ---------------------------------------------------------------------------------


def parse_model_info(body: Any) -> ProxyPrices:
    """The proxy's `/model/info` answer (`{"data": [deployment, ...]}`) as ProxyPrices. Pure.

    Raises PricesUnavailable for an answer of another shape. Rows that are not objects, have no model_name, or
    carry no price at all (a model the proxy's map does not know: the price map then prices it, not $0) are
    skipped; of a model_name's other rows, the first (the proxy's routing order) prices it.
    """
    data = body.get("data") if isinstance(body, Mapping) else None
    if not isinstance(data, list):
        raise PricesUnavailable("the proxy's /model/info answer has no data list")
    infos: dict[str, Mapping[str, Any]] = {}
    overridden: dict[str, frozenset[str]] = {}
    for row in data:
        name = row.get("model_name") if isinstance(row, Mapping) else None
        if not isinstance(name, str) or not name or name in infos:
            continue
        info = row.get("model_info")
        info = info if isinstance(info, Mapping) else {}
        if all(info.get(f) is None for f in PRICE_FIELDS):
            continue
        infos[name] = {key: value for key, value in info.items() if key in KEPT_FIELDS}
        own = info.get("pricing_overrides")
        overridden[name] = frozenset(f for f in own if f in PRICE_FIELDS) if isinstance(own, list) else frozenset()
    return ProxyPrices(infos, overridden)


def parse_price_map(content: bytes, *, bundled_count: int | None = None) -> dict[str, dict[str, Any]]:
    """A fetched price map, checked as LiteLLM checks it. Pure.

    Raises PricesUnavailable when it is not a JSON object, has fewer than MIN_MODEL_COUNT models, or fewer than
    MAX_SHRINK_RATIO of `bundled_count`. Entries that are not objects are dropped (as `load_price_map` does).
    """
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        raise PricesUnavailable("not JSON") from exc
    if not isinstance(data, dict):
        raise PricesUnavailable(f"a JSON {type(data).__name__}, not an object")
    models = sum(1 for key in data if key not in _RESERVED_KEYS)
    if models < MIN_MODEL_COUNT:
        raise PricesUnavailable(f"{models} models (fewer than {MIN_MODEL_COUNT})")
    if bundled_count and models < bundled_count * MAX_SHRINK_RATIO:
        raise PricesUnavailable(f"{models} models, less than half of the bundled map's {bundled_count}")
    return {key: info for key, info in data.items() if isinstance(info, dict)}


def local_forced(environ: Mapping[str, str]) -> bool:
    """True when LiteLLM would use its bundled map without fetching (LITELLM_LOCAL_MODEL_COST_MAP=True or
    LITELLM_OFFLINE_MODE=true, case-insensitive)."""
    return (
        environ.get(LOCAL_COST_MAP_VARIABLE, "").lower() == "true"
        or environ.get(OFFLINE_VARIABLE, "").strip().lower() == "true"
    )


def cost_map_url(environ: Mapping[str, str]) -> str:
    """The remote price map LiteLLM loads: LITELLM_MODEL_COST_MAP_URL, else LiteLLM's default."""
    return environ.get(COST_MAP_URL_VARIABLE) or DEFAULT_COST_MAP_URL


def price_sources(catalog: Catalog, prices: Prices, model_list: Sequence[Any]) -> dict[str, PriceSource]:
    """Which source priced each model the catalog serves. Pure.

    `model_list` is the config's (merged) model_list: a model whose first entry sets a price field in its own
    model_info is `model_info`, as is one the proxy says its deployment priced itself (`pricing_overrides`).
    """
    own: dict[str, bool] = {}
    for entry in model_list:
        if isinstance(entry, Mapping) and isinstance(entry.get("model_name"), str):
            info = entry.get("model_info")
            sets = isinstance(info, Mapping) and any(info.get(f) is not None for f in PRICE_FIELDS)
            own.setdefault(entry["model_name"], sets)
    proxy = prices.proxy
    sources: dict[str, PriceSource] = {}
    for name in (n for route in ROUTES for n in catalog.served(route)):
        if own.get(name) or (proxy is not None and proxy.overridden.get(name)):
            sources[name] = "model_info"
        elif proxy is not None and name in proxy.infos:
            sources[name] = "proxy"
        elif _priced_by_map(catalog, name):
            sources[name] = prices.map.source
        else:
            sources[name] = "none"
    return sources


def with_sources(rows: list[dict[str, Any]], sources: Mapping[str, PriceSource]) -> list[dict[str, Any]]:
    """`catalog.describe` rows with `price_source` added (for `sidecar models --json`)."""
    return [{**row, "price_source": sources.get(row["id"], "none")} for row in rows]


def _priced_by_map(catalog: Catalog, name: str) -> bool:
    model = next((m for route in ROUTES if (m := catalog.served(route).get(name)) is not None), None)
    return model is not None and bool(model.price_key)


# --- fetching (I/O) ---------------------------------------------------------------------------------


async def fetch_model_info(
    client: httpx.AsyncClient, proxy_url: str, master_key: str, *, timeout_s: float = FETCH_TIMEOUT_S
) -> ProxyPrices:
    """The proxy's prices from `GET <proxy_url>/model/info`, asked with the master key.

    Raises PricesUnavailable naming the cause (transport error class or status), never the answer's text.
    """
    headers = {"Authorization": f"Bearer {master_key}"}
    try:
        response = await client.get(f"{proxy_url.rstrip('/')}{MODEL_INFO_PATH}", headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise PricesUnavailable(f"the proxy's {MODEL_INFO_PATH} is unreachable ({type(exc).__name__})") from exc
    if response.status_code != 200:
        raise PricesUnavailable(f"the proxy answered {response.status_code} for {MODEL_INFO_PATH}")
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError as exc:
        raise PricesUnavailable(f"the proxy's {MODEL_INFO_PATH} answer is not JSON") from exc
    return parse_model_info(body)


async def fetch_remote_map(
    client: httpx.AsyncClient, url: str, *, bundled_count: int | None = None, timeout_s: float = FETCH_TIMEOUT_S
) -> PriceMap:
    """The remote price map at `url`, fetched once within `timeout_s` and checked (`parse_price_map`).

    Raises PricesUnavailable naming the cause.
    """
    try:
        response = await client.get(url, timeout=timeout_s)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise PricesUnavailable(f"{type(exc).__name__} fetching the price map") from exc
    if response.status_code != 200:
        raise PricesUnavailable(f"HTTP {response.status_code} for the price map")
    return PriceMap(parse_price_map(response.content, bundled_count=bundled_count), "remote_map", url)


async def load_map(
    client: httpx.AsyncClient,
    *,
    environ: Mapping[str, str],
    bundled: Callable[[], Mapping[str, Mapping[str, Any]]] = load_price_map,
    timeout_s: float = FETCH_TIMEOUT_S,
) -> PriceMap:
    """The price map the proxy would load (module docstring): the remote one, else the bundled one with one warning.

    Raises ConfigError (from `bundled`) only when the bundled map is needed and cannot be read.
    """
    if local_forced(environ):
        return PriceMap(bundled(), "bundled_map")
    url = cost_map_url(environ)
    local = bundled()
    try:
        return await fetch_remote_map(client, url, bundled_count=len(local), timeout_s=timeout_s)
    except PricesUnavailable as exc:
        log.warning("prices: the remote price map %s was not used (%s); using the bundled map", url, exc)
    return PriceMap(local, "bundled_map")


async def load_prices(
    client: httpx.AsyncClient,
    *,
    master_key: str | None,
    proxy_url: str | None,
    environ: Mapping[str, str],
    bundled: Callable[[], Mapping[str, Mapping[str, Any]]] = load_price_map,
    timeout_s: float = FETCH_TIMEOUT_S,
) -> Prices:
    """The prices to build the catalog with, once (`PriceRefresher.refresh` of a new refresher).

    Raises ConfigError only when the bundled map is needed and cannot be read.
    """
    refresher = PriceRefresher(
        client, master_key=master_key, proxy_url=proxy_url, environ=environ, bundled=bundled, timeout_s=timeout_s
    )
    return await refresher.refresh()


class PriceRefresher:
    """The prices in force, refreshed before each catalog rebuild (`refresh`).

    The proxy answers `/model/info`: its prices (the bundled map beside, for models it does not list). It does
    not: its last answer is kept when there was one (a proxy that is down has not changed its prices), else the
    price map the proxy would load (`load_map`), loaded once and kept, as LiteLLM loads it once at start. A
    failure is logged once while it repeats; the recovery once. `client` asks the proxy at `proxy_url` (absolute
    URLs, so any client will do) and fetches the remote map.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        master_key: str | None,
        proxy_url: str | None,
        environ: Mapping[str, str],
        bundled: Callable[[], Mapping[str, Mapping[str, Any]]] = load_price_map,
        timeout_s: float = FETCH_TIMEOUT_S,
    ) -> None:
        self._client = client
        self._master_key = master_key
        self._proxy_url = proxy_url
        self._environ = environ
        self._bundled = bundled
        self._timeout_s = timeout_s
        self._prices: Prices | None = None
        self._map: PriceMap | None = None
        self._failure: str | None = None

    @property
    def prices(self) -> Prices | None:
        """The prices of the last refresh (None before the first)."""
        return self._prices

    async def refresh(self) -> Prices:
        """Ask the proxy again and return the prices now in force (module docstring for the order).

        Raises ConfigError only when the bundled map is needed and cannot be read.
        """
        if self._proxy_url and self._master_key:
            try:
                proxy = await fetch_model_info(
                    self._client, self._proxy_url, self._master_key, timeout_s=self._timeout_s
                )
            except PricesUnavailable as exc:
                self._failed(str(exc))
            else:
                if self._failure is not None:
                    log.info("prices: the proxy's %s answers again", MODEL_INFO_PATH)
                self._failure = None
                self._prices = Prices(PriceMap(_bundled_if_any(self._bundled), "bundled_map"), proxy)
                return self._prices
        if self._prices is not None and self._prices.proxy is not None:
            return self._prices
        if self._map is None:
            self._map = await load_map(
                self._client, environ=self._environ, bundled=self._bundled, timeout_s=self._timeout_s
            )
        self._prices = Prices(self._map)
        return self._prices

    def _failed(self, reason: str) -> None:
        if reason != self._failure:
            kept = self._prices is not None and self._prices.proxy is not None
            log.warning("prices: %s; %s", reason, "keeping its last prices" if kept else "pricing from the price map")
        self._failure = reason


def _bundled_if_any(bundled: Callable[[], Mapping[str, Mapping[str, Any]]]) -> Mapping[str, Mapping[str, Any]]:
    """The bundled map beside the proxy's prices, or none when litellm is not installed (the proxy priced)."""
    try:
        return bundled()
    except ConfigError:
        return {}


__all__ = [
    "DEFAULT_COST_MAP_URL",
    "KEPT_FIELDS",
    "PRICE_FIELDS",
    "PriceMap",
    "PriceRefresher",
    "PriceSource",
    "Prices",
    "PricesUnavailable",
    "ProxyPrices",
    "cost_map_url",
    "fetch_model_info",
    "fetch_remote_map",
    "load_map",
    "load_prices",
    "local_forced",
    "parse_model_info",
    "parse_price_map",
    "price_sources",
    "with_sources",
]
