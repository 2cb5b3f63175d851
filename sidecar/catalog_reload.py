"""The live catalog: rebuilt from config.yaml and LiteLLM's database at start, every `refresh_s` and on demand
(`POST /admin/models/reload`), so a model added or removed in LiteLLM's admin UI is served or refused without a
restart. A failed rebuild keeps the catalog in force (the proxy, too, keeps its deployments when its database
read fails: `_update_llm_router`).

The rebuild (`load`, e.g. `proxy_models.load_catalog` bound to the settings) blocks, so it runs in a worker
thread; reloads never overlap. Sessions already open keep the deployment they were relayed to.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from sidecar.catalog import ROUTES, Catalog
from sidecar.errors import SidecarError

log = logging.getLogger(__name__)

#: How often the running app rebuilds its catalog (the proxy polls its database every 30 s by default too).
DEFAULT_REFRESH_S: Final = 30.0


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What one rebuild changed: models now served that were not, models no longer served, new warnings."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    warnings: tuple[str, ...]
    models: int

    def to_json(self) -> dict[str, Any]:
        """The body of `POST /admin/models/reload`: names and warnings only (no deployment, no credential)."""
        return {
            "models": self.models,
            "added": list(self.added),
            "removed": list(self.removed),
            "warnings": list(self.warnings),
        }


def served_names(catalog: Catalog) -> frozenset[str]:
    """Every model name some route serves."""
    return frozenset(name for route in ROUTES for name in catalog.served(route))


class CatalogReloader:
    """Holds the catalog in force and rebuilds it.

    `load` builds a fresh catalog (blocking; raises a SidecarError when it cannot). `prepare` is awaited
    first, on the event loop (e.g. refreshing the proxy's prices `load` builds with). `check` may refuse one
    (e.g. `cli.check_prices`: a model with no price); `on_change` receives each catalog put in force.
    """

    def __init__(
        self,
        load: Callable[[], Catalog],
        catalog: Catalog,
        *,
        check: Callable[[Catalog], None] | None = None,
        on_change: Callable[[Catalog], None] | None = None,
        prepare: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self._load = load
        self._prepare = prepare
        self._catalog = catalog
        self._check = check
        self._on_change = on_change
        self._lock = asyncio.Lock()
        self._last_failure: str | None = None

    @property
    def catalog(self) -> Catalog:
        """The catalog in force."""
        return self._catalog

    async def reload(self) -> ReloadResult:
        """Rebuild the catalog and put it in force; log its new warnings once each.

        Raises SidecarError (ConfigError, proxy_models.ProxyModelsUnavailable, or what `check` raises); the
        catalog in force is then unchanged.
        """
        async with self._lock:
            if self._prepare is not None:
                await self._prepare()
            fresh = await asyncio.to_thread(self._load)
            if self._check is not None:
                self._check(fresh)
            before, self._catalog = self._catalog, fresh
            if self._on_change is not None:
                self._on_change(fresh)
        new_warnings = tuple(w for w in fresh.warnings if w not in before.warnings)
        for warning in new_warnings:
            log.warning("models: %s", warning)
        old, now = served_names(before), served_names(fresh)
        return ReloadResult(tuple(sorted(now - old)), tuple(sorted(old - now)), new_warnings, len(now))

    async def run(self, refresh_s: float = DEFAULT_REFRESH_S) -> None:
        """Reload every `refresh_s` until cancelled; a failure is logged (once while it repeats) and retried."""
        while True:
            await asyncio.sleep(refresh_s)
            try:
                result = await self.reload()
            except SidecarError as exc:
                if str(exc) != self._last_failure:
                    log.warning("models: reload failed, keeping the catalog in force: %s", exc)
                self._last_failure = str(exc)
                continue
            if self._last_failure is not None:
                log.info("models: reload works again")
            self._last_failure = None
            if result.added or result.removed:
                log.info("models: added %s; removed %s", list(result.added), list(result.removed))


__all__ = ["DEFAULT_REFRESH_S", "CatalogReloader", "ReloadResult", "served_names"]
