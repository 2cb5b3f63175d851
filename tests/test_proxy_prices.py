"""The proxy's prices (sidecar/proxy_prices.py): /model/info first, then the remote price map, then the bundled one."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sidecar.catalog import Catalog, build_catalog, describe, load_price_map
from sidecar.errors import ConfigError
from sidecar.metering import bill_time
from sidecar.metrics import Metrics
from sidecar.proxy_prices import (
    KEPT_FIELDS,
    PriceRefresher,
    Prices,
    load_map,
    load_prices,
    parse_model_info,
    price_sources,
    with_sources,
)
from sidecar.testing.fake_litellm import FakeLiteLLM, LiteLLMServer
from sidecar.testing.fake_provider import FakeProvider
from tests.relay_stack import MASTER_KEY as STACK_MASTER_KEY
from tests.relay_stack import USER_KEY, stack
from tests.relay_stack import entry as relay_entry
from tests.support import sdk_transcript, serve

MASTER_KEY = "sk-master-prices-test"
SECRET = "sk-upstream-SECRET-do-not-leak"
BUNDLED = load_price_map()
WHISPER = "gpt-realtime-whisper"
BUNDLED_PER_SECOND = Decimal("0.000283333333333")
MODEL_LIST = [
    {
        "model_name": "w",
        "litellm_params": {"model": f"openai/{WHISPER}", "api_base": "https://up.example.com", "api_key": "sk-1"},
    }
]


def deployment(per_second: float, *, overrides: list[str] | None = None) -> dict[str, Any]:
    """One /model/info row for model `w` as the proxy answers it: credentials in litellm_params, merged model_info."""
    info = {**BUNDLED[WHISPER], "input_cost_per_second": per_second, "id": "w-1", "db_model": False}
    info["pricing_overrides"] = overrides or []
    info["note"] = SECRET  # anything outside the price fields is dropped, whatever it holds
    params = {"model": f"openai/{WHISPER}", "api_base": f"https://user:{SECRET}@up.example.com", "api_key": SECRET}
    return {"model_name": "w", "litellm_params": params, "model_info": info}


def catalog_with(prices: Prices) -> Catalog:
    """The catalog of MODEL_LIST built with `prices`."""
    config = {"model_list": MODEL_LIST}
    return build_catalog(config, price_map=prices.map.entries, price_overrides=prices.overrides, environ={})


def remote_map(per_second: float) -> bytes:
    """A remote price map: the bundled one with another whisper price."""
    return orjson.dumps({**BUNDLED, WHISPER: {**BUNDLED[WHISPER], "input_cost_per_second": per_second}})


@contextlib.asynccontextmanager
async def map_server(content: bytes) -> AsyncIterator[tuple[str, list[str]]]:
    """Serve `content` as /prices.json on a real socket; yields its URL and the paths requested."""
    requested: list[str] = []

    async def prices(request: Request) -> Response:
        requested.append(request.url.path)
        return Response(content, media_type="application/json")

    async with serve(Starlette(routes=[Route("/prices.json", prices)])) as running:
        yield f"{running.http}/prices.json", requested


@contextlib.asynccontextmanager
async def proxy(*rows: dict[str, Any], down: bool = False) -> AsyncIterator[str]:
    """A fake LiteLLM serving `rows` on /model/info (or closing every connection when `down`); yields its URL."""
    fake = FakeLiteLLM(master_key=MASTER_KEY, deployments=list(rows), down=down)
    async with LiteLLMServer(fake) as server:
        yield server.url


async def test_proxy_price_wins_over_the_bundled_map_and_is_billed() -> None:
    """A price from the proxy's /model/info replaces the bundled map's, and a session is billed at it."""
    async with proxy(deployment(0.001)) as url, httpx.AsyncClient() as client:
        prices = await load_prices(client, master_key=MASTER_KEY, proxy_url=url, environ={})
    model = catalog_with(prices).resolve("w")
    assert model.kind == "realtime-transcription"
    assert model.price.per_unit == Decimal("0.001") != BUNDLED_PER_SECOND
    assert bill_time(Fraction(10), model.price) == (Decimal("10"), Decimal("0.01"))
    assert price_sources(catalog_with(prices), prices, MODEL_LIST) == {"w": "proxy"}
    assert with_sources(describe(catalog_with(prices)), {"w": "proxy"})[0]["price_source"] == "proxy"


async def test_a_deployment_priced_by_its_own_model_info_is_labelled_so() -> None:
    """A price the proxy says the deployment set itself (pricing_overrides) is labelled model_info."""
    async with proxy(deployment(0.002, overrides=["input_cost_per_second"])) as url, httpx.AsyncClient() as client:
        prices = await load_prices(client, master_key=MASTER_KEY, proxy_url=url, environ={})
    assert catalog_with(prices).resolve("w").price.per_unit == Decimal("0.002")
    assert price_sources(catalog_with(prices), prices, MODEL_LIST) == {"w": "model_info"}


async def test_proxy_unreachable_falls_back_to_the_remote_map() -> None:
    """With the proxy down, the map at LITELLM_MODEL_COST_MAP_URL prices the model."""
    async with proxy(down=True) as url, map_server(remote_map(0.0005)) as (map_url, _), httpx.AsyncClient() as client:
        environ = {"LITELLM_MODEL_COST_MAP_URL": map_url}
        prices = await load_prices(client, master_key=MASTER_KEY, proxy_url=url, environ=environ)
    assert (prices.proxy, prices.map.source, prices.map.url) == (None, "remote_map", map_url)
    assert catalog_with(prices).resolve("w").price.per_unit == Decimal("0.0005")
    assert price_sources(catalog_with(prices), prices, MODEL_LIST) == {"w": "remote_map"}


async def test_a_rejected_master_key_falls_back_too() -> None:
    """A proxy that refuses the master key (401) is not a price source."""
    async with proxy(deployment(0.001)) as url, map_server(remote_map(0.0005)) as (map_url, _):
        async with httpx.AsyncClient() as client:
            environ = {"LITELLM_MODEL_COST_MAP_URL": map_url}
            prices = await load_prices(client, master_key="sk-wrong", proxy_url=url, environ=environ)
    assert (prices.proxy, prices.map.source) == (None, "remote_map")


async def test_proxy_and_remote_map_unreachable_fall_back_to_the_bundled_map(caplog: pytest.LogCaptureFixture) -> None:
    """With neither the proxy nor the remote map reachable, the bundled map prices the model; one warning each."""
    async with proxy(down=True) as url, proxy(down=True) as map_url, httpx.AsyncClient() as client:
        environ = {"LITELLM_MODEL_COST_MAP_URL": f"{map_url}/prices.json"}
        with caplog.at_level(logging.WARNING, logger="sidecar.proxy_prices"):
            prices = await load_prices(client, master_key=MASTER_KEY, proxy_url=url, environ=environ)
    assert prices.map.source == "bundled_map"
    assert catalog_with(prices).resolve("w").price.per_unit == BUNDLED_PER_SECOND
    assert price_sources(catalog_with(prices), prices, MODEL_LIST) == {"w": "bundled_map"}
    assert len([r for r in caplog.records if r.name == "sidecar.proxy_prices"]) == 2


@pytest.mark.parametrize("value", ["True", "true"])
async def test_local_cost_map_forces_the_bundled_map(value: str) -> None:
    """LITELLM_LOCAL_MODEL_COST_MAP=True: the bundled map, and the remote map is never fetched."""
    async with map_server(remote_map(0.0005)) as (map_url, requested), httpx.AsyncClient() as client:
        environ = {"LITELLM_MODEL_COST_MAP_URL": map_url, "LITELLM_LOCAL_MODEL_COST_MAP": value}
        prices = await load_prices(client, master_key=None, proxy_url=None, environ=environ)
    assert (prices.map.source, requested) == ("bundled_map", [])
    assert catalog_with(prices).resolve("w").price.per_unit == BUNDLED_PER_SECOND


@pytest.mark.parametrize(
    "content",
    [
        b"<html>not json</html>",
        b"[]",
        orjson.dumps({"gpt-x": {"mode": "chat"}}),
        orjson.dumps(dict(list(BUNDLED.items())[:100])),
    ],
    ids=["not-json", "not-an-object", "too-few-models", "shrunk"],
)
async def test_a_malformed_remote_map_falls_back_with_one_warning(
    content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A remote map that is not a JSON object of enough models is not used: the bundled map, one warning."""
    async with map_server(content) as (map_url, requested), httpx.AsyncClient() as client:
        with caplog.at_level(logging.WARNING, logger="sidecar.proxy_prices"):
            price_map = await load_map(client, environ={"LITELLM_MODEL_COST_MAP_URL": map_url})
    assert (price_map.source, requested) == ("bundled_map", ["/prices.json"])
    warnings = [r for r in caplog.records if r.name == "sidecar.proxy_prices"]
    assert len(warnings) == 1 and "bundled map" in warnings[0].getMessage()


async def test_no_credential_from_model_info_is_kept_or_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing of litellm_params, nor any model_info field outside the price fields, is kept, shown or logged."""
    async with proxy(deployment(0.001)) as url, httpx.AsyncClient() as client:
        with caplog.at_level(logging.DEBUG):
            prices = await load_prices(client, master_key=MASTER_KEY, proxy_url=url, environ={})
    assert prices.proxy is not None and set(prices.proxy.infos["w"]) <= KEPT_FIELDS
    assert SECRET not in repr(prices) and SECRET not in repr(prices.proxy.infos)
    assert SECRET not in caplog.text and MASTER_KEY not in caplog.text


async def test_a_session_is_billed_at_the_proxys_price(tmp_path: Path, speech_pcm16: bytes) -> None:
    """A transcription session relayed by a sidecar whose catalog the proxy priced is billed at the proxy's price."""
    async with FakeProvider() as provider, httpx.AsyncClient() as client:
        row = {**deployment(0.001), "model_name": WHISPER}
        async with proxy(row) as url:
            prices = await load_prices(client, master_key=MASTER_KEY, proxy_url=url, environ={})
        entries = [relay_entry(WHISPER, f"openai/{WHISPER}", provider.url, provider.api_key)]
        config = {"model_list": entries, "general_settings": {"master_key": STACK_MASTER_KEY}}
        catalog = build_catalog(config, price_map=prices.map.entries, price_overrides=prices.overrides, environ={})
        async with stack(tmp_path, provider=provider, catalog=catalog) as s:
            assert await sdk_transcript(s.sidecar.openai(USER_KEY), speech_pcm16)
            billed = await s.final_row()
    assert billed.audio_seconds > 0
    assert billed.cost_usd == bill_time(Fraction(billed.audio_seconds), catalog.resolve(WHISPER).price)[1]
    assert billed.cost_usd == (billed.audio_seconds * Decimal("0.001")).quantize(billed.cost_usd)


async def test_a_proxy_that_goes_down_keeps_its_last_prices(caplog: pytest.LogCaptureFixture) -> None:
    """Refreshes while the proxy is down keep its last answer (one warning); its next answer is in force again."""
    fake = FakeLiteLLM(master_key=MASTER_KEY, deployments=[deployment(0.001)])
    async with LiteLLMServer(fake) as server, httpx.AsyncClient() as client:
        refresher = PriceRefresher(client, master_key=MASTER_KEY, proxy_url=server.url, environ={})
        await refresher.refresh()
        fake.down = True
        with caplog.at_level(logging.INFO, logger="sidecar.proxy_prices"):
            down = [await refresher.refresh(), await refresher.refresh()]
            fake.down, fake.deployments = False, [deployment(0.003)]
            back = await refresher.refresh()
    assert [catalog_with(p).resolve("w").price.per_unit for p in down] == [Decimal("0.001")] * 2
    assert catalog_with(back).resolve("w").price.per_unit == Decimal("0.003")
    levels = [r.levelname for r in caplog.records if r.name == "sidecar.proxy_prices"]
    assert levels == ["WARNING", "INFO"]


async def test_the_fallback_map_is_loaded_once() -> None:
    """With the proxy never answering, the remote map is fetched at the first refresh only (as LiteLLM, at start)."""
    async with proxy(down=True) as url, map_server(remote_map(0.0005)) as (map_url, requested):
        async with httpx.AsyncClient() as client:
            environ = {"LITELLM_MODEL_COST_MAP_URL": map_url}
            refresher = PriceRefresher(client, master_key=MASTER_KEY, proxy_url=url, environ=environ)
            sources = [(await refresher.refresh()).map.source for _ in range(2)]
    assert (sources, requested) == (["remote_map", "remote_map"], ["/prices.json"])


def test_the_first_deployment_of_a_model_name_prices_it() -> None:
    """Of a model_name's deployments, the first in the proxy's answer prices it; malformed rows are skipped."""
    body = {"data": [deployment(0.001), deployment(0.009), "junk", {"model_info": {}}]}
    prices = parse_model_info(body)
    assert prices.infos["w"]["input_cost_per_second"] == 0.001
    assert list(prices.infos) == ["w"]


def test_a_deployment_the_proxy_cannot_price_is_left_to_the_price_map() -> None:
    """A /model/info row with no price at all (a model the proxy's map lacks) does not price its model at $0."""
    unpriced = {**deployment(0.001), "model_info": {"id": "w-1", "mode": "audio_transcription"}}
    assert parse_model_info({"data": [unpriced]}).infos == {}
    assert parse_model_info({"data": [unpriced, deployment(0.002)]}).infos["w"]["input_cost_per_second"] == 0.002


async def test_the_proxy_prices_without_litellm_installed() -> None:
    """When the proxy answers, a missing bundled map (litellm not installed) is no error."""

    def missing() -> dict[str, dict[str, Any]]:
        raise ConfigError("the litellm package (needed for its price map) is not installed")

    async with proxy(deployment(0.001)) as url, httpx.AsyncClient() as client:
        prices = await load_prices(client, master_key=MASTER_KEY, proxy_url=url, environ={}, bundled=missing)
    assert catalog_with(prices).resolve("w").price.per_unit == Decimal("0.001")


def test_the_price_source_metric_shows_one_series_per_model() -> None:
    """sidecar_model_price_source{model, source} is 1 for each model's current source only."""
    metrics = Metrics()
    metrics.show_price_sources({"w": "bundled_map"})
    metrics.show_price_sources({"w": "proxy"})
    text = metrics.render().decode()
    assert 'sidecar_model_price_source{model="w",source="proxy"} 1.0' in text
    assert 'source="bundled_map"' not in text
