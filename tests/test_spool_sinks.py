"""Every usage event reaches the ledger it was written for (issue 14): a spool file names its sink, a sidecar
adopts only the dead files of its own sink and leaves the others in place, reported by a warning and a gauge."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from sidecar.app import _default_publisher, create_app
from sidecar.billing.writer import make_engine
from sidecar.config import Settings
from sidecar.publisher import SpoolingPublisher, database_sink, redis_sink
from sidecar.testing.factories import usage_event
from sidecar.testing.fake_litellm import FakeLiteLLM
from sidecar.usage import UsageEvent
from tests.billing_support import read_billing
from tests.relay_stack import MASTER_KEY, catalog_for
from tests.support import serve

ROOT = Path(__file__).resolve().parents[1]
GUARD_S = 30.0  # a hang guard, never a pass/fail threshold
DIES_WITH_SPOOLED = (
    "import os, sys\n"
    "from pathlib import Path\n"
    "import orjson\n"
    "from sidecar.spool import Spool\n"
    "from sidecar.usage import UsageEvent\n"
    "spool = Spool(Path(sys.argv[1]), sink=sys.argv[2])\n"
    "spool.append([UsageEvent.from_fields(orjson.loads(line)) for line in sys.stdin.buffer])\n"
    "os._exit(0)  # dies without close(): the kernel releases its lock\n"
)


def die_with_spooled(directory: Path, sink: str, events: Sequence[UsageEvent]) -> None:
    """A process that spools `events` for `sink` in `directory` and dies holding them."""
    payload = b"".join(orjson.dumps(e.to_fields()) + b"\n" for e in events)
    subprocess.run([sys.executable, "-c", DIES_WITH_SPOOLED, str(directory), sink], input=payload, cwd=ROOT, check=True)


def spool_bytes(directory: Path) -> dict[str, bytes]:
    """Every spool data file in `directory` and its content."""
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.jsonl"))}


async def stream_events(redis: aioredis.Redis, stream: str) -> list[UsageEvent]:
    """Every event in `stream`, in stream order."""
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(stream))
    return [UsageEvent.from_fields(fields) for _, fields in entries]


async def test_embedded_sidecar_leaves_a_dead_redis_sidecars_spool_to_the_next_redis_sidecar(
    tmp_path: Path, redis_client: aioredis.Redis, usage_stream: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's scenario: an embedded sidecar bills none of a dead Redis-mode sidecar's spooled events into its
    SQLite and warns; the next Redis-mode sidecar publishes them to the stream exactly once."""
    spool_dir = tmp_path / "spool"
    events = [usage_event("sess_redis", 1), usage_event("sess_redis", 2, final=True)]
    sink = redis_sink(redis_client, stream=usage_stream)
    die_with_spooled(spool_dir, sink, events)
    left = spool_bytes(spool_dir)
    sqlite_url = f"sqlite:///{tmp_path / 'billing.db'}"
    embedded = Settings(litellm_config=tmp_path / "unused.yaml", database_url=sqlite_url, spool_dir=spool_dir)

    with caplog.at_level(logging.WARNING, logger="sidecar.spool"):
        async with _default_publisher(embedded, None) as publisher:
            assert isinstance(publisher, SpoolingPublisher)
            assert (publisher.spool_depth, publisher.foreign_spool_files) == (0, 1)
    engine = make_engine(sqlite_url)
    billed = read_billing(engine)
    engine.dispose()
    assert (billed.rows, billed.events) == ([], []), "nothing billed into the embedded SQLite"
    assert spool_bytes(spool_dir) == left, "the Redis sidecar's file is left untouched"
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "sidecar.spool"]
    assert f"holds 2 usage events for another sink ({sink})" in warning

    async with _default_publisher(embedded.replace(usage_stream=usage_stream), redis_client) as publisher:
        assert isinstance(publisher, SpoolingPublisher)
        assert publisher.foreign_spool_files == 0
        async with asyncio.timeout(GUARD_S):
            await publisher.drained()
    assert await stream_events(redis_client, usage_stream) == events, "published once, in order"
    assert spool_bytes(spool_dir) == {}, "adopted and emptied"


async def test_metrics_count_the_foreign_files_found_at_start(tmp_path: Path) -> None:
    """`sidecar_usage_spool_foreign_files` counts the dead processes' files of other sinks the spool left in place."""
    spool_dir = tmp_path / "spool"
    die_with_spooled(spool_dir, "redis:redis.example:6379/0#realtime:usage", [usage_event("a", 1)])
    die_with_spooled(spool_dir, "db:postgresql://db.example:5432/billing", [usage_event("b", 1)])
    sqlite_url = f"sqlite:///{tmp_path / 'billing.db'}"
    die_with_spooled(spool_dir, database_sink(sqlite_url), [usage_event("c", 1)])  # its own sink: adopted
    settings = Settings(litellm_config=tmp_path / "unused.yaml", database_url=sqlite_url, spool_dir=spool_dir)
    app = create_app(settings, catalog=catalog_for([]), key_client=FakeLiteLLM(master_key=MASTER_KEY).client())
    async with serve(app) as running:
        async with httpx.AsyncClient(base_url=running.http) as http:
            text = (await http.get("/metrics")).text
    assert "\nsidecar_usage_spool_foreign_files 2.0\n" in text
