"""The catalog `sidecar serve` and `sidecar models` run on: config.yaml and LiteLLM's DB-stored models
(proxy_models.py), priced as the proxy prices them (proxy_prices.py: its `/model/info` when it answers, else
the remote price map per LITELLM_MODEL_COST_MAP_URL unless LITELLM_LOCAL_MODEL_COST_MAP, else the bundled
map), and which source priced each model (`sidecar models --json`, `sidecar_model_price_source`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from sidecar.catalog import Catalog, load_price_map, master_key, read_config
from sidecar.config import Settings
from sidecar.proxy_models import load_models
from sidecar.proxy_prices import PriceMap, Prices, PriceSource, load_prices, price_sources


class ModelSource:
    """Builds the catalog with the prices in force (`prices`, set by whoever refreshes them: the app's
    `PriceRefresher` before each reload, or `load_with_prices` once) and keeps which source priced each model
    (`sources`). Calling it blocks (from the event loop, run it in a thread); it raises as
    `proxy_models.load_catalog`."""

    def __init__(
        self,
        settings: Settings,
        *,
        environ: Mapping[str, str],
        bundled: Callable[[], Mapping[str, Mapping[str, Any]]] = load_price_map,
    ) -> None:
        self.settings = settings
        self.environ = environ
        self.prices: Prices | None = None
        self.sources: Mapping[str, PriceSource] = {}
        self._read_bundled = bundled
        self._bundled: Mapping[str, Mapping[str, Any]] | None = None

    def bundled(self) -> Mapping[str, Mapping[str, Any]]:
        """The bundled price map, read once. Raises ConfigError when it cannot be read."""
        if self._bundled is None:
            self._bundled = self._read_bundled()
        return self._bundled

    def master_key(self) -> str | None:
        """The proxy's master key (config.yaml, else LITELLM_MASTER_KEY): what `/model/info` is asked with."""
        return master_key(read_config(self.settings.litellm_config), self.environ)

    def __call__(self) -> Catalog:
        prices = self.prices or Prices(PriceMap(self.bundled(), "bundled_map"))
        catalog, infos = load_models(
            self.settings, environ=self.environ, price_map=prices.map.entries, price_overrides=prices.overrides
        )
        self.sources = price_sources(catalog, prices, infos)
        return catalog

    def load_with_prices(self) -> Catalog:
        """Ask for the prices once (the CLI: no event loop runs), then build the catalog. Blocks."""
        self.prices = asyncio.run(self._prices(self.master_key()))
        return self()

    async def _prices(self, master: str | None) -> Prices:
        async with httpx.AsyncClient() as client:
            return await load_prices(
                client,
                master_key=master,
                proxy_url=self.settings.litellm_url,
                environ=self.environ,
                bundled=self.bundled,
            )


__all__ = ["ModelSource"]
