"""Shared fixtures: real Redis and PostgreSQL on this machine, fresh names per test.

Redis runs at 127.0.0.1:6379 and PostgreSQL at 127.0.0.1:5432 (trust auth, database `test`).
Each test gets its own stream names and its own PostgreSQL database, so tests never see each other.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
import redis.asyncio as aioredis

from tests.litellm_schema import apply_migrations

# Prices come from the bundled map unless a test says otherwise: no test (nor a `sidecar` it starts) fetches
# LiteLLM's remote price map (sidecar/proxy_prices.py; tests/test_proxy_prices.py serves its own).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_ADMIN_DSN = os.environ.get("TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
DATA = Path(__file__).resolve().parents[1] / "examples" / "audio"
SPEECH_WAV = DATA / "speech_24k_pcm16.wav"
SPEECH_ULAW = DATA / "speech_8k_ulaw.raw"


@pytest.fixture
def unique() -> str:
    """A short unique token for names (streams, channels, databases)."""
    return uuid.uuid4().hex[:12]


@pytest.fixture
def redis_url() -> str:
    """The real Redis server's URL."""
    return REDIS_URL


@pytest.fixture
def usage_stream(unique: str) -> str:
    """A stream name no other test uses (its dead-letter stream is `<name>:dead`)."""
    return f"test:{unique}:realtime:usage"


@pytest.fixture
async def redis_client(redis_url: str, usage_stream: str) -> AsyncIterator[aioredis.Redis]:
    """An async Redis client; deletes this test's keys afterwards."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    keys = [k async for k in client.scan_iter(match=f"{usage_stream.rsplit(':realtime:', 1)[0]}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
def pg_url(unique: str) -> Iterator[str]:
    """A fresh PostgreSQL database for this test, as a SQLAlchemy URL (psycopg 3 driver)."""
    name = f"sidecar_test_{unique}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def litellm_template() -> Iterator[str]:
    """LiteLLM's schema (tests/litellm_schema.py) built once per session; left idle to be a TEMPLATE."""
    name = f"sidecar_litellm_template_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        apply_migrations(f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{name}")
        yield name
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def litellm_db(litellm_template: str, unique: str) -> Iterator[str]:
    """A fresh clone of LiteLLM's schema for this test, as a psycopg DSN (`CREATE DATABASE ... TEMPLATE`)."""
    name = f"sidecar_litellm_{unique}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{litellm_template}"')
    yield f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{name}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite file database."""
    return f"sqlite:///{tmp_path / 'billing.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each billing-DB test runs on both SQLite and PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'billing.db'}"
        return
    yield request.getfixturevalue("pg_url")


@pytest.fixture
def speech_pcm16() -> bytes:
    """The shared test speech as raw 24 kHz PCM16 (WAV header removed): 6.667125 s."""
    data = SPEECH_WAV.read_bytes()
    return data[44:]


@pytest.fixture
def speech_ulaw() -> bytes:
    """The shared test speech as 8 kHz G.711 mu-law: 6.667125 s."""
    return SPEECH_ULAW.read_bytes()
