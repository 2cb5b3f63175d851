"""A whole sidecar for contract tests: fake provider(s), fake LiteLLM, real billing sink, real socket."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from sidecar.app import create_app
from sidecar.billing.writer import BillingWriter, make_engine, upgrade
from sidecar.catalog import Catalog, build_catalog, load_price_map
from sidecar.config import Settings
from sidecar.publisher import EmbeddedPublisher, UsagePublisher
from sidecar.spool import Spool
from sidecar.testing.fake_litellm import FakeLiteLLM
from sidecar.testing.fake_provider import FakeProvider
from tests.support import Running, serve

MASTER_KEY = "sk-sidecar-master-test"
USER_KEY = "sk-user-key-test-0001"
PRICE_MAP = load_price_map()


def entry(name: str, model: str, api_base: str, api_key: str, **params: Any) -> dict[str, Any]:
    """One model_list entry of a LiteLLM config."""
    info = params.pop("model_info", None)
    out: dict[str, Any] = {
        "model_name": name,
        "litellm_params": {"model": model, "api_base": api_base, "api_key": api_key, **params},
    }
    if info:
        out["model_info"] = info
    return out


def catalog_for(entries: Sequence[dict[str, Any]]) -> Catalog:
    """A catalog from model_list entries and the real price map."""
    config = {"model_list": list(entries), "general_settings": {"master_key": MASTER_KEY}}
    return build_catalog(config, price_map=PRICE_MAP, environ={})


@dataclass
class Stack:
    """Everything one contract test talks to."""

    sidecar: Running
    provider: FakeProvider
    litellm: FakeLiteLLM
    writer: BillingWriter

    def rows(self) -> list[Any]:
        """The realtime_usage rows billed so far."""
        from sqlmodel import Session, select

        from sidecar.billing.tables import RealtimeUsage

        with Session(self.writer.engine) as db:
            return list(db.exec(select(RealtimeUsage)).all())

    async def final_row(self) -> Any:
        """The one billed row, once every session has ended and its final is written."""
        services = self.sidecar.app.state.services
        await services.supervisor.live_empty()
        await services.publisher.settled()
        rows = self.rows()
        assert len(rows) == 1 and rows[0].status == "final"
        return rows[0]


@contextlib.asynccontextmanager
async def stack(
    tmp_path: Path,
    *,
    entries: Sequence[dict[str, Any]] | None = None,
    provider: FakeProvider | None = None,
    openai_hosts: Sequence[str] = ("api.openai.com",),
    publisher: UsagePublisher | None = None,
    litellm: FakeLiteLLM | None = None,
    redis: Any = None,
    replica: str | None = None,
    ws_ping_interval: float | None = 20.0,
    clock_ns: Callable[[], int] = time.monotonic_ns,
    catalog: Catalog | None = None,
    **settings: Any,
) -> AsyncIterator[Stack]:
    """Start a fake provider (unless given), a fake LiteLLM with USER_KEY, and the sidecar (its catalog: `catalog`,
    else that of `entries`)."""
    async with contextlib.AsyncExitStack() as exits:
        if provider is None:
            provider = await exits.enter_async_context(FakeProvider())
        if entries is None:
            entries = [
                entry("gpt-realtime-whisper", "openai/gpt-realtime-whisper", provider.url, provider.api_key),
                entry("gpt-realtime", "openai/gpt-realtime", provider.url, provider.api_key),
                entry("whisper-1", "openai/whisper-1", provider.url, provider.api_key),
            ]
        if litellm is None:
            litellm = FakeLiteLLM(master_key=MASTER_KEY)
            litellm.add_key(USER_KEY, key_alias="alice-key", user_id="alice", team_id="")
        engine = make_engine(f"sqlite:///{tmp_path / 'billing.db'}")
        upgrade(engine)
        writer = BillingWriter(engine)
        spool = exits.enter_context(Spool(tmp_path / "spool"))
        pub = publisher or EmbeddedPublisher(lambda events: writer.write(events, now=datetime.now(UTC)), spool=spool)
        settings.setdefault("drain_grace_s", 1.0)
        config = Settings(litellm_config=tmp_path / "unused.yaml", spool_dir=tmp_path / "spool").replace(**settings)
        app = create_app(
            config,
            catalog=catalog or catalog_for(entries),
            key_client=litellm.client(),
            publisher=pub,
            openai_hosts=openai_hosts,
            redis=redis,
            replica=replica,
            clock_ns=clock_ns,
        )
        if publisher is None:
            await pub.start()
            exits.push_async_callback(pub.aclose)
        running = await exits.enter_async_context(
            serve(
                app,
                max_frame_bytes=config.max_frame_bytes,
                grace_s=config.drain_grace_s,
                ws_ping_interval=ws_ping_interval,
            )
        )
        yield Stack(running, provider, litellm, writer)


@dataclass
class Pair:
    """Two replicas over one Redis, one fake provider, one fake LiteLLM."""

    a: Stack
    b: Stack
    litellm: FakeLiteLLM


@contextlib.asynccontextmanager
async def replicas(tmp_path: Path, redis_url: str, unique: str, **settings: Any) -> AsyncIterator[Pair]:
    """Start replicas A and B sharing Redis (unique key prefix and channel for this test)."""
    litellm = FakeLiteLLM(master_key=MASTER_KEY)
    litellm.add_key(USER_KEY, key_alias="alice-key", user_id="alice", team_id="team-1")
    shared = {"control_prefix": f"test:{unique}", "control_channel": f"test:{unique}:control", **settings}
    async with contextlib.AsyncExitStack() as exits:
        provider = await exits.enter_async_context(FakeProvider())
        stacks = []
        for name in ("a", "b"):
            client = aioredis.Redis.from_url(redis_url)
            exits.push_async_callback(client.aclose)
            (tmp_path / name).mkdir()
            stacks.append(
                await exits.enter_async_context(
                    stack(tmp_path / name, provider=provider, litellm=litellm, redis=client, replica=name, **shared)
                )
            )
        yield Pair(stacks[0], stacks[1], litellm)
        cleanup = aioredis.Redis.from_url(redis_url)
        keys = [k async for k in cleanup.scan_iter(match=f"test:{unique}*")]
        if keys:
            await cleanup.delete(*keys)
        await cleanup.aclose()
