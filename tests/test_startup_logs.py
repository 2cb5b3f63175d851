"""What the sidecar says at start and on the way: the master-key check against LiteLLM (and LiteLLM's own
LITELLM_MASTER_KEY fallback), the access line of a refusal before the upgrade, and the billing consumer's
start, progress and stop lines and its wait for a database that is down at start."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from sidecar.app import create_app
from sidecar.auth import MasterKeyCheck
from sidecar.billing import BillingWriter, make_engine
from sidecar.billing.consumer import UsageConsumer, upgrade_when_reachable
from sidecar.catalog import build_catalog
from sidecar.config import Settings
from sidecar.testing.factories import usage_event
from sidecar.testing.fake_litellm import FakeLiteLLM, LiteLLMServer
from tests.relay_stack import MASTER_KEY, PRICE_MAP, catalog_for, entry, stack
from tests.support import serve
from tests.test_billing_consumer import publish


class Lines(logging.Handler):
    """Every record of the loggers it is attached to, and a way to wait for one (no sleeping)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._loop = asyncio.get_running_loop()
        self._arrived = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._loop.call_soon_threadsafe(self._arrived.set)

    def messages(self, level: int = logging.DEBUG) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]

    async def wait_for(self, text: str) -> str:
        """The first message containing `text`, once it is logged."""
        while True:
            found = [m for m in self.messages() if text in m]
            if found:
                return found[0]
            self._arrived.clear()
            await self._arrived.wait()


@contextlib.asynccontextmanager
async def captured(*names: str) -> AsyncIterator[Lines]:
    """A Lines handler on the named loggers (at DEBUG) for the block."""
    lines = Lines()
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(lines)
        logger.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(lines)
            logger.setLevel(level)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    yield port


# --- the master key -----------------------------------------------------------------------------------


def test_litellm_master_key_variable_is_the_fallback() -> None:
    """Without general_settings.master_key the master key is LITELLM_MASTER_KEY, as for LiteLLM itself."""
    env = {"LITELLM_MASTER_KEY": "sk-from-env"}
    assert build_catalog({"model_list": []}, price_map=PRICE_MAP, environ=env).master_key == "sk-from-env"
    settings = {"general_settings": {"store_model_in_db": True}}
    assert build_catalog(settings, price_map=PRICE_MAP, environ=env).master_key == "sk-from-env"
    own = {"general_settings": {"master_key": "sk-from-config"}}
    assert build_catalog(own, price_map=PRICE_MAP, environ=env).master_key == "sk-from-config"
    assert build_catalog({}, price_map=PRICE_MAP, environ={}).master_key is None


@contextlib.asynccontextmanager
async def sidecar_asking(tmp_path: Path, litellm_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, MasterKeyCheck]]:
    """The sidecar app, served, with SIDECAR_LITELLM_URL (its own LiteLLM clients); its master-key check."""
    settings = Settings(
        litellm_config=tmp_path / "unused.yaml",
        litellm_url=litellm_url,
        database_url=f"sqlite:///{tmp_path / 'billing.db'}",
        spool_dir=tmp_path / "spool",
    )
    app = create_app(settings, catalog=catalog_for([entry("m", "openai/gpt-realtime", "ws://127.0.0.1:9", "k")]))
    async with serve(app) as running, httpx.AsyncClient(base_url=running.http) as http:
        await http.get("/healthz")  # answered once the lifespan has started (the socket queues until then)
        check = app.state.services.master_key_check
        assert check is not None
        yield http, check


async def test_a_rejected_master_key_fails_readiness_with_one_error_then_recovers(tmp_path: Path) -> None:
    """LiteLLM answering 401 to the master key: one ERROR line saying so (not the key), /readyz 503
    `litellm rejects the master key`; once LiteLLM accepts it, ready again."""
    fake = FakeLiteLLM(master_key="sk-litellm-has-another-key")
    async with captured("sidecar.auth") as lines, LiteLLMServer(fake) as litellm:
        url = litellm.url
        async with sidecar_asking(tmp_path, url) as (http, check):
            await check.checked.wait()
            answer = await http.get("/readyz")
            assert (answer.status_code, answer.json()) == (503, {"status": "litellm rejects the master key"})
            while check.verdicts < 2:  # asked again, still rejected: not logged twice
                await check.changed.wait()
            fake.master_key = MASTER_KEY  # LiteLLM fixed
            while check.rejected:
                await check.changed.wait()
            assert (await http.get("/readyz")).json()["status"] == "ready"
    errors = lines.messages(logging.ERROR)
    assert errors == [
        f"LiteLLM at {url} rejects the master key (it answered 401): every virtual key will be refused "
        "401 until general_settings.master_key (or LITELLM_MASTER_KEY) is the proxy's own; /readyz fails"
    ]
    assert f"LiteLLM at {url} now accepts the master key: ready" in lines.messages(logging.INFO)
    assert MASTER_KEY not in "".join(lines.messages())


async def test_an_unreachable_litellm_warns_and_stays_ready(tmp_path: Path, closed_port: int) -> None:
    """LiteLLM unreachable at start: a warning per attempt, and readiness is not failed for it."""
    url = f"http://127.0.0.1:{closed_port}"
    async with captured("sidecar.auth") as lines, sidecar_asking(tmp_path, url) as (http, check):
        await check.checked.wait()
        answer = await http.get("/readyz")
        assert (answer.status_code, answer.json()["status"]) == (200, "ready")
    assert lines.messages(logging.WARNING)[0] == (
        f"LiteLLM at {url} unreachable for the master-key check (ConnectError); retrying in 1s"
    )


async def test_the_check_stops_once_litellm_accepts() -> None:
    """Unreachable, then up: the check asks again with its back-off and stops at the first acceptance."""
    fake = FakeLiteLLM(master_key=MASTER_KEY, down=True)
    async with fake.client() as client:
        check = MasterKeyCheck(client, MASTER_KEY, backoff_s=0.01)
        task = asyncio.create_task(check.run())
        await check.checked.wait()
        assert not check.rejected and not task.done()
        fake.down = False
        await task
    assert (check.rejected, fake.count("/key/info")) == (False, 2)


# --- a refusal before the upgrade ---------------------------------------------------------------------


async def test_a_refusal_is_one_info_access_line_and_no_error(tmp_path: Path) -> None:
    """A pre-upgrade refusal logs one INFO access line with status and code, without the query string, and
    never uvicorn's ERROR "ASGI callable returned without completing handshake"."""
    async with captured("sidecar.access", "uvicorn.error") as lines:
        async with stack(tmp_path) as running:
            with pytest.raises(InvalidStatus) as refusal:
                await connect(f"{running.sidecar.ws}/v1/realtime?model=gpt-realtime&api_key=sk-in-the-query")
            assert refusal.value.response.status_code == 401
    access = [r for r in lines.records if r.name == "sidecar.access"]
    assert len(access) == 1 and access[0].levelno == logging.INFO
    assert access[0].getMessage().endswith(' - "WebSocket /v1/realtime" 401 invalid_api_key')
    assert [m for m in lines.messages() if "handshake" in m or "/v1/realtime" in m] == [access[0].getMessage()]


# --- the billing consumer -----------------------------------------------------------------------------


async def test_consumer_logs_start_progress_and_stop(
    redis_client: aioredis.Redis, usage_stream: str, pg_url: str
) -> None:
    """`run` logs its start, a progress line (events written, the group's lag and pending) and its stop."""
    engine = make_engine(pg_url)
    stop = asyncio.Event()
    async with captured("sidecar.billing") as lines:
        assert await upgrade_when_reachable(engine, stop)
        await publish(redis_client, usage_stream, [usage_event("s1", 1), usage_event("s1", 2)])
        consumer = UsageConsumer(
            redis_client, BillingWriter(engine), stream=usage_stream, consumer="c1", block_ms=0, progress_every_s=0
        )
        task = asyncio.create_task(consumer.run(stop))
        progress = await lines.wait_for("events written in the last")
        stop.set()
        await task
    engine.dispose()
    assert lines.messages()[0] == f"billing consumer c1 started: stream {usage_stream}, group billing"
    assert progress == "billing consumer c1: 2 events written in the last 0s; lag 0, 0 pending"
    assert lines.messages()[-1] == "billing consumer c1 stopped: 2 events written"


async def test_consumer_waits_at_start_for_the_database_to_come_up(pg_url: str, closed_port: int) -> None:
    """The database down at start: each attempt is logged, and the tables are created once it answers."""
    pg = make_url(pg_url)
    engine = make_engine(pg.set(port=closed_port).render_as_string(hide_password=False))
    stop = asyncio.Event()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(pg.host, pg.port)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async with captured("sidecar.billing") as lines:
        task = asyncio.create_task(upgrade_when_reachable(engine, stop, backoff_s=0.01, max_backoff_s=0.05))
        await lines.wait_for("billing database not ready at start")
        server = await asyncio.start_server(forward, "127.0.0.1", closed_port)  # the database comes up
        try:
            assert await task
        finally:
            engine.dispose()
            server.close()
    assert lines.messages(logging.WARNING)[0].startswith("billing database not ready at start: billing upgrade:")
    tables = inspect(make_engine(pg_url)).get_table_names()
    assert {"realtime_usage", "realtime_usage_event"} <= set(tables)
