"""The live catalog: rebuilt on demand and periodically; a failed rebuild keeps the catalog in force."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

import pytest

from sidecar.catalog import Catalog, build_catalog
from sidecar.catalog_reload import CatalogReloader
from sidecar.errors import ConfigError, ModelNotFound
from sidecar.proxy_models import ProxyModelsUnavailable

PRICES: dict[str, dict[str, Any]] = {"gpt-realtime": {"mode": "chat", "supported_endpoints": ["/v1/realtime"]}}


def catalog(*names: str, warnings: tuple[str, ...] = ()) -> Catalog:
    """A catalog serving `names` (each a gpt-realtime deployment), with extra warnings."""
    entries = [{"model_name": n, "litellm_params": {"model": "openai/gpt-realtime", "api_key": "k"}} for n in names]
    built = build_catalog({"model_list": entries}, price_map=PRICES, environ={})
    return replace(built, warnings=warnings)


class Loads:
    """A fake `load`: hands out the given catalogs (or raises the given errors) in turn."""

    def __init__(self, *results: Catalog | Exception) -> None:
        self.results = list(results)
        self.calls = 0

    def __call__(self) -> Catalog:
        self.calls += 1
        result = self.results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result


async def test_a_reload_puts_the_new_catalog_in_force_and_says_what_changed() -> None:
    """Added and removed names, the model count; the new catalog resolves, the old name is refused."""
    seen: list[Catalog] = []
    reloader = CatalogReloader(Loads(catalog("a", "c")), catalog("a", "b"), on_change=seen.append)
    result = await reloader.reload()
    assert (result.added, result.removed, result.models) == (("c",), ("b",), 2)
    assert result.to_json() == {"models": 2, "added": ["c"], "removed": ["b"], "warnings": []}
    assert seen == [reloader.catalog]
    reloader.catalog.resolve("c")
    with pytest.raises(ModelNotFound):
        reloader.catalog.resolve("b")


async def test_a_failed_reload_keeps_the_catalog_in_force() -> None:
    """A database or config failure, or a refused catalog, raises and changes nothing."""
    first = catalog("a")

    def refuse(candidate: Catalog) -> None:
        raise ConfigError("realtime model z has no price")

    reloader = CatalogReloader(Loads(ProxyModelsUnavailable("down"), catalog("z")), first, check=refuse)
    with pytest.raises(ProxyModelsUnavailable):
        await reloader.reload()
    with pytest.raises(ConfigError):
        await reloader.reload()
    assert reloader.catalog is first


async def test_only_new_warnings_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A warning already in force is not logged again on every refresh."""
    reloader = CatalogReloader(Loads(catalog("a", warnings=("old", "new"))), catalog("a", warnings=("old",)))
    with caplog.at_level(logging.WARNING, logger="sidecar.catalog_reload"):
        result = await reloader.reload()
    assert result.warnings == ("new",)
    assert [r.getMessage() for r in caplog.records] == ["models: new"]


async def test_the_periodic_refresh_reloads_and_survives_failures(caplog: pytest.LogCaptureFixture) -> None:
    """run() reloads every period; a repeated failure is logged once, and the next success is put in force."""
    loads = Loads(ProxyModelsUnavailable("down"), ProxyModelsUnavailable("down"), catalog("b"))
    put_in_force = asyncio.Event()
    reloader = CatalogReloader(loads, catalog("a"), on_change=lambda _: put_in_force.set())
    with caplog.at_level(logging.WARNING, logger="sidecar.catalog_reload"):
        task = asyncio.create_task(reloader.run(0.001))
        await asyncio.wait_for(put_in_force.wait(), 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert loads.calls == 3 and list(reloader.catalog.models) == ["b"]
    assert [r.getMessage() for r in caplog.records] == ["models: reload failed, keeping the catalog in force: down"]
