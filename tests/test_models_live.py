"""A real `sidecar serve` on LiteLLM's database (issue 16, item 1): a model added in LiteLLM's admin UI (a row in its
real schema, sealed by LiteLLM's own helper) is served; deleted, it is refused after `POST /admin/models/reload`;
added again, it is served after the periodic refresh; its credential never shows."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from openai import AsyncOpenAI
from psycopg.types.json import Jsonb
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from sidecar.billing import make_engine
from sidecar.catalog import load_price_map
from sidecar.proxy_models import DatabaseModels, ProxyModelRow, build_merged_catalog
from sidecar.testing.fake_litellm import FakeLiteLLM, LiteLLMServer
from sidecar.testing.fake_provider import DEFAULT_TRANSCRIPT, FakeProvider
from tests import litellm_crypto
from tests.billing_support import MODEL, SidecarProcess, free_port, next_event, poll, read_billing, serve_env
from tests.relay_stack import MASTER_KEY
from tests.support import TRANSCRIBE, sdk_transcript

SALT = "sk-salt-live-0123456789"
UI_KEY = "sk-ui-added-upstream-secret-4242"
UI_MODEL = "ui-whisper"
ROW_ID = "ui-row-1"
MASTER = {"Authorization": f"Bearer {MASTER_KEY}"}


def seal(value: str) -> str:
    """`value` sealed by LiteLLM's own helper under the proxy's salt key, as /model/new seals it."""
    return litellm_crypto.encrypt_value_helper(value, new_encryption_key=SALT)


@pytest.fixture
def conn(litellm_db: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to a fresh clone of LiteLLM's schema."""
    with psycopg.connect(litellm_db, autocommit=True) as connection:
        yield connection


def add_row(conn: psycopg.Connection[Any], ui: FakeProvider) -> dict[str, str]:
    """The UI-added model as the proxy's `_add_model_to_db` stores it; returns its sealed litellm_params."""
    params = {"model": f"openai/{MODEL}", "api_base": ui.url, "api_key": UI_KEY}
    sealed = {name: seal(value) for name, value in params.items()}
    conn.execute(
        'INSERT INTO "LiteLLM_ProxyModelTable" (model_id, model_name, litellm_params, model_info, created_by,'
        " updated_by) VALUES (%s, %s, %s, %s, 'admin', 'admin')",
        (ROW_ID, UI_MODEL, Jsonb(sealed), Jsonb({"id": ROW_ID})),
    )
    return sealed


def delete_row(conn: psycopg.Connection[Any]) -> None:
    conn.execute('DELETE FROM "LiteLLM_ProxyModelTable" WHERE model_id = %s', (ROW_ID,))


@asynccontextmanager
async def serving(
    tmp_path: Path, litellm_db: str, provider: FakeProvider, *, refresh_s: str
) -> AsyncIterator[tuple[SidecarProcess, dict[str, str]]]:
    """`sidecar serve` on the config's provider and LiteLLM's database (store_model_in_db on, a salt key)."""
    env = serve_env(tmp_path, provider, litellm_database_url=litellm_db, models_refresh_s=refresh_s)
    env |= {"LITELLM_SALT_KEY": SALT, "STORE_MODEL_IN_DB": "true"}
    sidecar = SidecarProcess(env, workdir=tmp_path / "serve")
    await sidecar.start()
    try:
        yield sidecar, env
    finally:
        await sidecar.terminate()


async def served_names(http: httpx.AsyncClient) -> set[str]:
    body = (await http.get("/v1/realtime/models")).json()
    return {row["id"] for row in body["data"]}


async def transcribe(sidecar: SidecarProcess) -> str:
    """Open a transcription session on the UI model; the first event's type."""
    client = AsyncOpenAI(base_url=f"{sidecar.http}/v1", api_key=MASTER_KEY, max_retries=0)
    async with client.realtime.connect(model=UI_MODEL, extra_query=TRANSCRIBE) as session:
        event = await next_event(session, "session.created")
        return str(event.type)


async def refused(sidecar: SidecarProcess) -> tuple[int, dict[str, Any]]:
    """A session on the UI model must be refused before the upgrade: its status and body."""
    url = f"ws://127.0.0.1:{sidecar.port}/v1/realtime?model={UI_MODEL}&intent=transcription"
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, additional_headers=MASTER):
            pass
    return info.value.response.status_code, orjson.loads(info.value.response.body or b"{}")


def assert_secret_free(text: str, sealed: dict[str, str]) -> None:
    assert UI_KEY not in text
    assert sealed["api_key"] not in text


async def test_a_ui_model_is_served_then_refused_after_a_reload(
    tmp_path: Path,
    litellm_db: str,
    conn: psycopg.Connection[Any],
) -> None:
    """A DB row is served; deleted, `POST /admin/models/reload` (master key only) says so and it is refused."""
    async with FakeProvider() as provider, FakeProvider(api_key=UI_KEY) as ui:
        sealed = add_row(conn, ui)
        async with serving(tmp_path, litellm_db, provider, refresh_s="3600") as (sidecar, _):
            async with httpx.AsyncClient(base_url=sidecar.http, timeout=10) as http:
                assert {MODEL, UI_MODEL} <= await served_names(http)
                assert await transcribe(sidecar) == "session.created"
                assert len(ui.sessions) == 1  # relayed to the UI-added deployment

                delete_row(conn)
                anonymous = await http.post("/admin/models/reload")
                assert anonymous.status_code == 401
                assert UI_MODEL in await served_names(http)
                reload = await http.post("/admin/models/reload", headers=MASTER)
                assert reload.status_code == 200, reload.text
                body = reload.json()
                assert (body["removed"], body["added"], body["models"]) == ([UI_MODEL], [], 1)
                status, error = await refused(sidecar)
                assert (status, error["error"]["code"]) == (404, "model_not_found")
                assert UI_MODEL not in await served_names(http)
                admin = await http.get("/admin/sessions", headers=MASTER)
                for text in (reload.text, admin.text, (await http.get("/v1/realtime/models")).text):
                    assert_secret_free(text, sealed)

            add_row(conn, ui)
            models = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sidecar.cli", "models", "--json", env=sidecar.env, stdout=-1, stderr=-1
            )
            out, err = await models.communicate()
            assert models.returncode == 0, err.decode()
            assert UI_MODEL in {row["id"] for row in orjson.loads(out)}
            assert_secret_free(out.decode() + err.decode(), sealed)
        assert_secret_free(sidecar.log.read_text(), sealed)


async def test_a_reload_that_fails_keeps_the_models_in_force(
    tmp_path: Path,
    litellm_db: str,
    conn: psycopg.Connection[Any],
) -> None:
    """LiteLLM's database unreadable at reload: 503 `service_unavailable`, the UI model still served."""
    async with FakeProvider() as provider, FakeProvider(api_key=UI_KEY) as ui:
        sealed = add_row(conn, ui)
        async with serving(tmp_path, litellm_db, provider, refresh_s="3600") as (sidecar, _):
            conn.execute('ALTER TABLE "LiteLLM_ProxyModelTable" RENAME TO "moved_away"')
            try:
                async with httpx.AsyncClient(base_url=sidecar.http, timeout=10) as http:
                    reload = await http.post("/admin/models/reload", headers=MASTER)
                    assert reload.status_code == 503
                    assert reload.json()["error"]["code"] == "service_unavailable"
                    assert_secret_free(reload.text, sealed)
                    assert UI_MODEL in await served_names(http)
                assert await transcribe(sidecar) == "session.created"
            finally:
                conn.execute('ALTER TABLE "moved_away" RENAME TO "LiteLLM_ProxyModelTable"')


async def test_the_periodic_refresh_follows_the_database(
    tmp_path: Path,
    litellm_db: str,
    conn: psycopg.Connection[Any],
) -> None:
    """With a short SIDECAR_MODELS_REFRESH_S, a deleted row stops being served and a re-added one is served again."""
    async with FakeProvider() as provider, FakeProvider(api_key=UI_KEY) as ui:
        sealed = add_row(conn, ui)
        async with serving(tmp_path, litellm_db, provider, refresh_s="0.1") as (sidecar, _):
            async with httpx.AsyncClient(base_url=sidecar.http, timeout=10) as http:

                async def listed(expected: bool) -> bool:
                    return (UI_MODEL in await served_names(http)) == expected

                delete_row(conn)
                await poll(lambda: listed(False), what="the deleted model to be dropped")
                status, _ = await refused(sidecar)
                assert status == 404
                add_row(conn, ui)
                await poll(lambda: listed(True), what="the re-added model to be served")
            assert await transcribe(sidecar) == "session.created"
        assert_secret_free(sidecar.log.read_text(), sealed)


@pytest.mark.parametrize("allow_unpriced", [False, True])
def test_an_unpriced_ui_model_is_dropped_with_one_warning(allow_unpriced: bool) -> None:
    """A realtime model only the database serves, priced by nothing: not served (one warning) unless allowed; a
    priced config model beside it is untouched, so it never blocks a reload."""
    config = {
        "model_list": [{"model_name": MODEL, "litellm_params": {"model": f"openai/{MODEL}", "api_key": "k"}}],
        "general_settings": {"master_key": MASTER_KEY},
    }
    row = ProxyModelRow(
        "row-free",
        "my-free-voice",
        {"model": "openai/gpt-realtime-unknown", "api_key": "k"},
        {"realtime": True},
    )
    catalog = build_merged_catalog(
        config,
        DatabaseModels(enabled=True, rows=(row,)),
        price_map=load_price_map(),
        environ={},
        default_transcription_model=MODEL,
        drop_unpriced=not allow_unpriced,
    )
    assert ("my-free-voice" in catalog.models) is allow_unpriced
    assert MODEL in catalog.models
    dropped = [w for w in catalog.warnings if "my-free-voice" in w and "not served" in w]
    assert len(dropped) == (0 if allow_unpriced else 1)
    assert catalog.unpriced() == (["my-free-voice"] if allow_unpriced else [])


async def test_a_reload_message_reloads_every_other_replica() -> None:
    """`reload_models` on the control channel reloads each other replica once, never the one that sent it."""
    from sidecar.auth import KeyChecker
    from sidecar.control import MemoryStore, Supervisor
    from sidecar.metrics import Metrics

    store = MemoryStore()
    reloads: list[str] = []

    def replica(name: str) -> Supervisor:
        supervisor = Supervisor(
            store=store,
            checker=KeyChecker(master_key=MASTER_KEY, client=None),
            metrics=Metrics(),
            replica=name,
            key_recheck_s=60.0,
            max_sessions=10,
            max_sessions_per_key=10,
        )
        supervisor.on_reload = lambda: reloads.append(name)
        return supervisor

    sender, other = replica("r1"), replica("r2")
    await sender.reload_models()
    message = await anext(store.messages())
    assert message == {"action": "reload_models", "replica": "r1"}
    assert (sender.apply(message), other.apply(message)) == (0, 0)
    assert reloads == ["r2"]


async def run_models_json(env: dict[str, str]) -> list[dict[str, Any]]:
    """`sidecar models --json` with `env`; its rows."""
    models = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar.cli", "models", "--json", env=env, stdout=-1, stderr=-1
    )
    out, err = await models.communicate()
    assert models.returncode == 0, err.decode()
    rows: list[dict[str, Any]] = orjson.loads(out)
    return rows


async def test_the_proxys_price_wins_and_serve_says_where_each_price_came_from(
    tmp_path: Path, speech_pcm16: bytes
) -> None:
    """The proxy reachable: its /model/info price (not the bundled map's) prices the model in `sidecar models
    --json` (price_source `proxy`) and in serve (/v1/realtime/models, the sidecar_model_price_source metric, the
    bill); the proxy down: the price map prices it (`bundled_map` here, LITELLM_LOCAL_MODEL_COST_MAP)."""
    fake = FakeLiteLLM(master_key=MASTER_KEY)
    info = {"input_cost_per_second": 0.005, "mode": "audio_transcription", "supported_endpoints": ["/v1/realtime"]}
    fake.deployments.append({"model_name": MODEL, "litellm_params": {"model": f"openai/{MODEL}"}, "model_info": info})
    async with FakeProvider() as provider, LiteLLMServer(fake) as proxy:
        env = serve_env(tmp_path, provider, litellm_url=proxy.url)
        sidecar = SidecarProcess(env, workdir=tmp_path / "serve")
        [row] = await run_models_json(sidecar.env)
        assert (row["id"], row["price_source"], row["pricing"]) == (MODEL, "proxy", {"input_cost_per_second": "0.005"})
        await sidecar.start()
        try:
            async with httpx.AsyncClient(base_url=sidecar.http, timeout=10) as http:
                [served] = (await http.get("/v1/realtime/models")).json()["data"]
                assert served["pricing"] == {"input_cost_per_second": "0.005"}
                metrics = (await http.get("/metrics")).text
                assert f'sidecar_model_price_source{{model="{MODEL}",source="proxy"}} 1.0' in metrics
                client = AsyncOpenAI(base_url=f"{sidecar.http}/v1", api_key=MASTER_KEY, max_retries=0)
                assert await sdk_transcript(client, speech_pcm16, model=MODEL) == DEFAULT_TRANSCRIPT
                fake.down = True  # a proxy that stops answering keeps its last prices across a reload
                assert (await http.post("/admin/models/reload", headers=MASTER)).status_code == 200
                [served] = (await http.get("/v1/realtime/models")).json()["data"]
                assert served["pricing"] == {"input_cost_per_second": "0.005"}
        finally:
            await sidecar.terminate()
        engine = make_engine(env["SIDECAR_DATABASE_URL"])
        [billed] = read_billing(engine).rows
        engine.dispose()
        assert billed.audio_seconds > 0 and billed.cost_usd == billed.audio_seconds * Decimal("0.005")
        [row] = await run_models_json(sidecar.env)
        assert (row["price_source"], row["pricing"]) == ("bundled_map", {"input_cost_per_second": "0.000283333333333"})


async def test_an_unreadable_database_at_start_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """`sidecar serve` whose LiteLLM database cannot be read stops at once: one line (no password), status 2."""
    async with FakeProvider() as provider:
        url = f"postgresql://litellm:pw-not-shown-77@127.0.0.1:{free_port()}/litellm"
        env = SidecarProcess(serve_env(tmp_path, provider, litellm_database_url=url), workdir=tmp_path).env
        serve = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar.cli", "serve", env=env, stdout=-1, stderr=-1
        )
        out, err = await serve.communicate()
    lines = err.decode().strip().splitlines()
    assert serve.returncode == 2 and len(lines) == 1, err.decode()
    assert lines[0].startswith("sidecar: cannot read LiteLLM's models from its database")
    assert "pw-not-shown-77" not in err.decode() + out.decode()
